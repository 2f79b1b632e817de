"""The AmbientNodeConfig status the agent reports: pure rendering from what it knows."""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from ambient_cni.api.models import (
    AmbientNodeConfigStatus,
    Backend,
    Condition,
    ConditionStatus,
    ConditionType,
    RedirectMode,
    Repair,
    WorkloadState,
    WorkloadStatus,
    ZtunnelStatus,
)
from ambient_cni.install_report import InstallReport

# How a node-side condition's message says what was last put back (node mode keeps it there
# until the next repair): "<what is in place>; repaired: <what was wrong>".
REPAIRED = "; repaired: "


class PodOutcome(BaseModel):
    """Where one workload stands, as the reconciler last left it."""

    model_config = ConfigDict(frozen=True)

    uid: str
    name: str
    namespace: str
    state: WorkloadState
    reason: str | None = None
    message: str | None = None
    since: datetime.datetime
    last_repair: Repair | None = None
    capture: str | None = None  # a sidecar pod's capture in effect; None for ambient pods


class HostPart(BaseModel):
    """One piece of the node's side a mode checks, as a status condition of its own."""

    model_config = ConfigDict(frozen=True)

    condition: ConditionType
    ok: bool
    reason: str
    message: str


class NodeFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    generation: int
    mode: RedirectMode
    mode_supported: bool = True  # False: the agent holds every pod as it is, touching nothing
    backend: Backend
    ztunnel_connected: bool
    ztunnel_pod: str | None = None
    ztunnel_since: datetime.datetime | None = None
    host_rules_ok: bool
    host_rules_message: str = ""
    in_sync: bool  # every desired workload was reconciled against this generation
    cni_plugin: InstallReport | None = None  # None: this node runs no CNI plugin
    agent_stopped: bool = False  # the agent's last word: no new pod can be enrolled here
    host_parts: tuple[HostPart, ...] = ()  # the mode's own node-side conditions
    ztunnel_by_api: bool = False  # node mode: ztunnel learns pods from the API, not over ZDS
    agent_version: str | None = None  # the agent's own version, for `status.agentVersion`


class _Conditions:
    """KEP-1623 conditions that keep lastTransitionTime while their status holds."""

    def __init__(self, generation: int, now: datetime.datetime, previous: Iterable[Condition]):
        self.generation = generation
        self.now = now
        self.previous = {c.type: c for c in previous}

    def make(self, kind: ConditionType, ok: bool, reason: str, message: str) -> Condition:
        status: ConditionStatus = "True" if ok else "False"
        before = self.previous.get(kind)
        since = before.last_transition_time if before and before.status == status else self.now
        return Condition(
            type=kind,
            status=status,
            reason=reason,
            message=message,
            observed_generation=self.generation,
            last_transition_time=since,
        )


def render(
    facts: NodeFacts,
    outcomes: Iterable[PodOutcome],
    previous: Iterable[Condition],
    now: datetime.datetime,
) -> AmbientNodeConfigStatus:
    pods = sorted(outcomes, key=lambda o: (o.namespace, o.name, o.uid))
    counts = {
        state: sum(1 for p in pods if p.state == state)
        for state in ("Enrolled", "Pending", "Failed")
    }
    sidecars = sum(1 for p in pods if p.state == "Enrolled" and p.capture is not None)
    counts["Enrolled"] -= sidecars  # `enrolled` counts ambient pods, `sidecars` the others
    make = _Conditions(facts.generation, now, previous).make
    zt_reason = "Connected" if facts.ztunnel_connected else "NotConnected"
    if facts.ztunnel_by_api:
        zt_reason = "Ready" if facts.ztunnel_connected else "NotReady"
        zt_message = (
            f"node mode: ztunnel {facts.ztunnel_pod} is ready and its rules are in place "
            "(it learns pods from the API server, not over ZDS)"
            if facts.ztunnel_connected
            else f"node mode: ztunnel {facts.ztunnel_pod or '(none scheduled)'} is not ready "
            "or its rules are not in place"
        )
    elif not facts.ztunnel_connected:
        zt_message = "no ztunnel is connected to the ZDS socket"
    elif facts.ztunnel_pod:
        zt_message = f"ztunnel {facts.ztunnel_pod} connected"
    else:
        zt_message = "ztunnel connected"
    host_reason = "Applied" if facts.host_rules_ok else "HostRulesFailed"
    host_message = facts.host_rules_message
    for part in facts.host_parts:
        if part.condition == "HostRulesReady":
            host_reason, host_message = part.reason, part.message
    sync_reason = "Reconciled" if facts.in_sync else "Reconciling"
    not_ready = "NotReady" if facts.mode_supported else "RedirectModeNotSupported"
    if not facts.mode_supported:
        sync_reason = not_ready
    problems = []
    if facts.agent_stopped:
        not_ready = "AgentStopped"
        problems.append("the node agent is stopped; new pods on this node wait for it")
    if not facts.mode_supported:
        problems.append(
            f"redirectMode {facts.mode} is not supported by this agent; "
            "every pod is kept as it was and nothing is removed"
        )
    if not facts.ztunnel_connected:
        problems.append("ztunnel not connected")
    parts = [p for p in facts.host_parts if p.condition != "HostRulesReady"]
    if not facts.host_rules_ok:
        problems.append("host rules failed")
    for part in parts:
        if not part.ok:
            problems.append(f"{part.condition}: {part.message}")
    if facts.cni_plugin is not None and not facts.cni_plugin.installed:
        problems.append(f"CNI plugin not installed: {facts.cni_plugin.message}")
    if counts["Failed"]:
        problems.append(f"{counts['Failed']} workload(s) failed")
    if counts["Pending"]:
        problems.append(f"{counts['Pending']} workload(s) pending")
    if not facts.in_sync and facts.mode_supported:
        problems.append("reconciling")
    ready = not problems
    conditions = [
        make(
            "Ready",
            ready,
            "AllEnrolled" if ready else not_ready,
            _enrolled(counts["Enrolled"], sidecars) if ready else "; ".join(problems),
        ),
        make("ZtunnelConnected", facts.ztunnel_connected, zt_reason, zt_message),
        make("HostRulesReady", facts.host_rules_ok, host_reason, host_message),
        make("InSync", facts.in_sync, sync_reason, ""),
        *(make(p.condition, p.ok, p.reason, p.message) for p in parts),
    ]
    if facts.cni_plugin is not None:
        installed = facts.cni_plugin.installed
        conditions.append(
            make(
                "CniPluginInstalled",
                installed,
                "Installed" if installed else "NotInstalled",
                facts.cni_plugin.message,
            )
        )
    return AmbientNodeConfigStatus(
        observed_generation=facts.generation,
        mode=facts.mode,
        backend=facts.backend,
        ztunnel=ZtunnelStatus(
            connected=facts.ztunnel_connected,
            pod=facts.ztunnel_pod if facts.ztunnel_connected else None,
            since=facts.ztunnel_since if facts.ztunnel_connected else None,
        ),
        enrolled=counts["Enrolled"],
        sidecars=sidecars,
        pending=counts["Pending"],
        failed=counts["Failed"],
        workloads=[
            WorkloadStatus(
                uid=p.uid,
                name=p.name,
                namespace=p.namespace,
                state=p.state,
                reason=p.reason,
                message=p.message,
                since=p.since,
                last_repair=p.last_repair,
                capture=p.capture,
            )
            for p in pods
        ],
        conditions=conditions,
        last_sync_time=now,
        agent_version=facts.agent_version,
    )


def _enrolled(ambient: int, sidecars: int) -> str:
    said = f"{ambient} workload(s) enrolled"
    return f"{said}, {sidecars} sidecar pod(s) captured" if sidecars else said
