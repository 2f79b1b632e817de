"""Where the sandbox's scheduler puts a pod: pure functions.

A pod that names a node (`spec.nodeName`, or a DaemonSet-style required node
affinity on `metadata.name`) goes there; otherwise pods go round-robin over
the Ready, schedulable nodes that match its nodeSelector and required affinity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

Pod = Mapping[str, Any]


class NodeView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    ready: bool
    unschedulable: bool = False
    labels: dict[str, str] = {}


def node_view(node: Mapping[str, Any]) -> NodeView:
    """Reduce a Node object (API JSON form) to what scheduling needs."""
    conditions = node.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    meta = node.get("metadata", {})
    return NodeView(
        name=meta.get("name", ""),
        ready=ready,
        unschedulable=bool(node.get("spec", {}).get("unschedulable")),
        labels=dict(meta.get("labels") or {}),
    )


def _match_expression(expr: Mapping[str, Any], value: str | None) -> bool:
    op = expr.get("operator")
    values = expr.get("values") or []
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    return False  # Gt/Lt and unknown operators: not supported, so never matched


def _matches_term(term: Mapping[str, Any], node: NodeView) -> bool:
    for expr in term.get("matchExpressions") or []:
        if not _match_expression(expr, node.labels.get(expr.get("key", ""))):
            return False
    for expr in term.get("matchFields") or []:
        value = node.name if expr.get("key") == "metadata.name" else None
        if not _match_expression(expr, value):
            return False
    return True


def fits(pod: Pod, node: NodeView) -> bool:
    spec = pod.get("spec", {})
    for key, value in (spec.get("nodeSelector") or {}).items():
        if node.labels.get(key) != value:
            return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    terms = (required or {}).get("nodeSelectorTerms") or []
    # Terms are ORed; an empty list means no constraint.
    return not terms or any(_matches_term(t, node) for t in terms)


def choose_node(pod: Pod, nodes: Sequence[NodeView], turn: int) -> str | None:
    """The node for `pod` on scheduling turn `turn`, or None if no node can take it now."""
    candidates = sorted(
        (n.name for n in nodes if n.ready and not n.unschedulable and fits(pod, n)),
    )
    if not candidates:
        return None
    return candidates[turn % len(candidates)]
