"""`kubectl ambient status`: the cluster at a glance, and whether all of it is Ready."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping

from ambient_cni.api.models import RedirectMode
from ambient_cni.selection import PodView, SelectionConfig

from .objects import ControllerInfo, NodeObject, Report
from .why import WhyReport, explain

MAX_NAMED_PODS = 5  # per group of pods not enrolled; the rest are counted


class ControllerLine(Report):
    found: bool  # its Lease could be read
    problem: str | None = None  # why not
    leading: bool = False
    holder: str | None = None
    version: str | None = None


class NodeLine(Report):
    name: str
    mode: RedirectMode | None = None
    backend: str | None = None
    ztunnel: str = "-"  # the connected ztunnel pod, "no" when none
    enrolled: int = 0
    sidecars: int = 0
    pending: int = 0
    failed: int = 0
    ready: bool = False
    idle: bool = False  # no agent reports, and no pod is to be redirected here
    why_not_ready: str | None = None
    agent_version: str | None = None


class NotEnrolledGroup(Report):
    """Pods whose redirection is not as selected, for one reason."""

    state: str  # the pods' verdict: Failed, Pending or Inconsistent
    reason: str
    example: str  # one message, so the reason reads in words
    count: int
    pods: tuple[str, ...]  # namespace/name, the first MAX_NAMED_PODS


class Overview(Report):
    ready: bool
    controller: ControllerLine
    nodes: tuple[NodeLine, ...]
    not_enrolled: tuple[NotEnrolledGroup, ...]
    orphans: tuple[str, ...]
    problems: tuple[str, ...]  # why not ready, one line each


def _node_line(node: NodeObject) -> NodeLine:
    status = node.status
    if status is None:
        # Nothing to redirect and no agent (the chart's agent.nodeSelector leaves the node
        # out, say): shown, never counted against the cluster.
        idle = node.problem is None and node.spec is not None and not node.spec.workloads
        return NodeLine(
            name=node.name,
            mode=node.spec.redirect_mode if node.spec else None,
            idle=idle,
            why_not_ready=node.problem
            or "no agent has reported on this node"
            + (" (nothing to redirect on it)" if idle else ""),
        )
    ready = node.condition("Ready")
    why: str | None = None
    if not node.in_sync:
        why = (
            f"the agent reported on generation {status.observed_generation}, "
            f"the spec is at {node.generation}"
        )
    elif ready is None or ready.status != "True":
        why = ready.message if ready is not None and ready.message else "not Ready"
    connected = status.ztunnel is not None and status.ztunnel.connected
    return NodeLine(
        name=node.name,
        mode=status.mode,
        backend=status.backend,
        ztunnel=(status.ztunnel.pod or "yes") if connected and status.ztunnel else "no",
        enrolled=status.enrolled,
        sidecars=status.sidecars,
        pending=status.pending,
        failed=status.failed,
        ready=node.ready,
        why_not_ready=why,
        agent_version=node.agent_version,
    )


def _group_key(report: WhyReport) -> tuple[str, str]:
    """(reason, example) under which a pod that is not as selected is counted: the agent's
    reason when it has one, else the first finding's code."""
    status = report.status
    behind = any(f.code == "AgentBehind" for f in report.findings)
    agents_word = status is not None and status.reason and report.verdict in ("Failed", "Pending")
    if status is not None and agents_word and not behind:
        return str(status.reason), status.message or status.state
    if report.findings:
        return report.findings[0].code, report.findings[0].message
    return report.verdict, report.summary


def _groups(
    pods: Iterable[PodView],
    namespace_labels: Mapping[str, Mapping[str, str]],
    config: SelectionConfig,
    by_name: Mapping[str, NodeObject],
) -> list[NotEnrolledGroup]:
    """Pods whose redirection is not what selection says, each explained as `why` would
    (the same function, so `status` and `why` never disagree), grouped by reason."""
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for pod in pods:
        node = by_name.get(pod.node_name or "")
        report = explain(pod, namespace_labels.get(pod.namespace), config, node)
        if report.ok:
            continue
        reason, example = _group_key(report)
        grouped.setdefault((report.verdict, reason), []).append(
            (f"{pod.namespace}/{pod.name}", example)
        )
    groups = []
    for (verdict, reason), members in grouped.items():
        members.sort()
        groups.append(
            NotEnrolledGroup(
                state=verdict,
                reason=reason,
                example=members[0][1],
                count=len(members),
                pods=tuple(name for name, _ in members[:MAX_NAMED_PODS]),
            )
        )
    return sorted(groups, key=lambda g: (-g.count, g.state, g.reason))


def overview(
    nodes: Iterable[NodeObject],
    *,
    node_names: Iterable[str],
    pods: Iterable[PodView],
    namespace_labels: Mapping[str, Mapping[str, str]],
    config: SelectionConfig,
    controller: ControllerInfo,
    now: datetime.datetime,
) -> Overview:
    objects = sorted(nodes, key=lambda n: n.name)
    by_name = {n.name: n for n in objects}
    existing = set(node_names)
    problems: list[str] = []
    orphans = [
        f"AmbientNodeConfig {n.name}: its Node does not exist"
        for n in objects
        if n.orphaned or n.name not in existing
    ]
    orphans += [f"Node {name}: no AmbientNodeConfig" for name in sorted(existing - set(by_name))]
    line = ControllerLine(found=False, problem=controller.problem)
    if controller.found:
        line = ControllerLine(
            found=True,
            leading=controller.leading(now),
            holder=controller.holder,
            version=controller.version,
        )
        if not line.leading:
            problems.append("controller: no replica holds its Lease (is it running?)")
    lines = [_node_line(n) for n in objects if n.name in existing and not n.orphaned]
    problems += [f"node {n.name}: {n.why_not_ready}" for n in lines if not n.ready and not n.idle]
    groups = _groups(pods, namespace_labels, config, by_name)
    problems += [f"{g.count} pod(s) not as selected: {g.state} {g.reason}" for g in groups]
    problems += orphans
    return Overview(
        ready=not problems,
        controller=line,
        nodes=tuple(lines),
        not_enrolled=tuple(groups),
        orphans=tuple(orphans),
        problems=tuple(problems),
    )
