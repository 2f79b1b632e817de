"""Where the sandbox's scheduler puts a pod: pure functions.

Pods go round-robin over the Ready, schedulable nodes that match their
nodeSelector and required node affinity (a DaemonSet-style affinity on
`metadata.name` names one node) and whose NoSchedule/NoExecute taints they
tolerate, with Kubernetes' toleration rules. Why no node fits is said the way
the real scheduler says it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

Pod = Mapping[str, Any]


class Taint(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    value: str = ""
    effect: str

    def __str__(self) -> str:
        return f"{{{self.key}: {self.value}}}"


class NodeView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    ready: bool
    unschedulable: bool = False
    labels: dict[str, str] = {}
    taints: tuple[Taint, ...] = ()


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
        taints=tuple(
            Taint(key=t["key"], value=t.get("value") or "", effect=t["effect"])
            for t in node.get("spec", {}).get("taints") or []
        ),
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


def tolerates(toleration: Mapping[str, Any], taint: Taint) -> bool:
    """Kubernetes' rule: an empty effect matches every effect, an empty key with Exists
    every key; Exists ignores the value, Equal (the default) compares it."""
    if toleration.get("effect") and toleration["effect"] != taint.effect:
        return False
    operator = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return operator == "Exists"
    if toleration["key"] != taint.key:
        return False
    return operator == "Exists" or (toleration.get("value") or "") == taint.value


def untolerated(pod: Pod, node: NodeView) -> Taint | None:
    """The first taint of `node` that keeps `pod` off it (PreferNoSchedule never does)."""
    tolerations = pod.get("spec", {}).get("tolerations") or []
    for taint in node.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not any(
            tolerates(t, taint) for t in tolerations
        ):
            return taint
    return None


def unfit_reason(pod: Pod, node: NodeView) -> str | None:
    """Why `pod` cannot go to `node` now, in the real scheduler's words; None if it can."""
    if not node.ready:
        return "node(s) were not ready"
    if node.unschedulable:
        return "node(s) were unschedulable"
    if not fits(pod, node):
        return "node(s) didn't match Pod's node affinity/selector"
    taint = untolerated(pod, node)
    if taint is not None:
        return f"node(s) had untolerated taint {taint}"
    return None


def choose_node(pod: Pod, nodes: Sequence[NodeView], turn: int) -> str | None:
    """The node for `pod` on scheduling turn `turn`, or None if no node can take it now."""
    candidates = sorted(n.name for n in nodes if unfit_reason(pod, n) is None)
    if not candidates:
        return None
    return candidates[turn % len(candidates)]


def unschedulable_message(pod: Pod, nodes: Sequence[NodeView]) -> str:
    """`0/2 nodes are available: 1 node(s) had untolerated taint {k: v}, ...` (reasons in
    name order, counted)."""
    reasons: dict[str, int] = {}
    for reason in sorted(r for n in nodes if (r := unfit_reason(pod, n)) is not None):
        reasons[reason] = reasons.get(reason, 0) + 1
    counted = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
    return f"0/{len(nodes)} nodes are available: {counted}."
