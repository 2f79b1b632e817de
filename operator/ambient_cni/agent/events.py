"""Which Kubernetes Events a change of the node's status deserves: a pure diff of two statuses.

The agent records them on its node's AmbientNodeConfig, so `kubectl describe anc NODE` tells
the recent story: pods that failed, drift put right, ztunnel coming and going, the node's
own pieces failing. `previous` is the status last told (at start, the one the server held),
so a restart does not tell again what was already so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from ambient_cni.api.models import (
    AmbientNodeConfigStatus,
    Condition,
    ConditionType,
    Repair,
    ZtunnelStatus,
)

EventType = Literal["Normal", "Warning"]

# The node's own pieces, each a condition of its own (Ready, ZtunnelConnected and InSync
# sum up the rest, and tell nothing these do not).
NODE_CONDITIONS: tuple[ConditionType, ...] = (
    "HostRulesReady",
    "TunnelsReady",
    "ZtunnelRulesReady",
    "CniPluginInstalled",
)


@dataclass(frozen=True)
class EventNote:
    """One Event to record on the node's AmbientNodeConfig."""

    type: EventType
    reason: str
    message: str
    count: int = 1  # occurrences it stands for (the recorder counts them on one Event)


def notes(previous: AmbientNodeConfigStatus, current: AmbientNodeConfigStatus) -> list[EventNote]:
    """What changed from `previous` to `current` that a person should hear of, in order:
    ztunnel, the node's pieces, then pods (in the status's order)."""
    return [
        *_ztunnel(previous, current),
        *_conditions(previous, current),
        *_workloads(previous, current),
    ]


def _ztunnel(
    previous: AmbientNodeConfigStatus, current: AmbientNodeConfigStatus
) -> Iterator[EventNote]:
    before = previous.ztunnel or ZtunnelStatus()
    now = current.ztunnel or ZtunnelStatus()
    if now.connected and (not before.connected or before.pod != now.pod):
        who = f"ztunnel {now.pod}" if now.pod else "ztunnel"
        yield EventNote("Normal", "ZtunnelConnected", f"{who} connected")
    elif before.connected and not now.connected:
        who = f"ztunnel {before.pod}" if before.pod else "ztunnel"
        said = _condition(current, "ZtunnelConnected")
        why = f": {said.message}" if said is not None and said.message else ""
        yield EventNote("Warning", "ZtunnelDisconnected", f"{who} disconnected{why}")


def _conditions(
    previous: AmbientNodeConfigStatus, current: AmbientNodeConfigStatus
) -> Iterator[EventNote]:
    for kind in NODE_CONDITIONS:
        before, now = _condition(previous, kind), _condition(current, kind)
        if now is None:
            continue
        was_false = before is not None and before.status == "False"
        if now.status == "False" and (not was_false or _reason(before) != now.reason):
            yield EventNote("Warning", now.reason, f"{kind} is False: {now.message}")
        elif now.status == "True" and was_false:
            again = f"{kind} is True again"
            yield EventNote(
                "Normal", now.reason, f"{again}: {now.message}" if now.message else again
            )


def _workloads(
    previous: AmbientNodeConfigStatus, current: AmbientNodeConfigStatus
) -> Iterator[EventNote]:
    before = {w.uid: w for w in previous.workloads}
    for now in current.workloads:
        was = before.get(now.uid)
        pod = f"pod {now.namespace}/{now.name}"
        if now.state == "Failed" and (
            was is None or was.state != "Failed" or was.reason != now.reason
        ):
            message = f"{pod}: {now.message}" if now.message else f"{pod} failed"
            yield EventNote("Warning", now.reason or "Failed", message)
        repair = now.last_repair
        if repair is not None:
            said = f"{pod}: redirection repaired"
            repairs = _repairs_since(was.last_repair if was else None, repair)
            if repairs:
                message = f"{said}: {repair.message}" if repair.message else said
                yield EventNote("Warning", repair.reason, message, count=repairs)


def _repairs_since(before: Repair | None, now: Repair) -> int:
    """Repairs between two statuses: as many as the count moved by; when it went back (the
    pod was enrolled anew, or the agent restarted and counts from 1 again), this one
    repair is all that can be told for sure."""
    if before is None or now.times < before.times:
        return 1
    if now.times == before.times:
        return 1 if now != before else 0
    return now.times - before.times


def _condition(status: AmbientNodeConfigStatus, kind: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def _reason(condition: Condition | None) -> str | None:
    return None if condition is None else condition.reason
