"""Which Events a change of the node's status deserves: the pure diff, as a table."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from ambient_cni.agent.events import EventNote, notes
from ambient_cni.api.models import AmbientNodeConfigStatus

T0 = "2026-01-01T00:00:00Z"
ZT = "istio-system/ztunnel-abc"


def pod(name: str, state: str, reason: str | None = None, **more: Any) -> dict[str, Any]:
    return {
        "uid": f"u-{name}",
        "name": name,
        "namespace": "shop",
        "state": state,
        **({"reason": reason} if reason else {}),
        **more,
    }


def repair(message: str, minute: int = 0, count: int | None = None) -> dict[str, Any]:
    when = datetime.datetime(2026, 1, 1, 0, minute, tzinfo=datetime.UTC)
    said = {"time": when.isoformat(), "reason": "DriftRepaired", "message": message}
    return said if count is None else {**said, "count": count}


def cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": T0,
    }


def status(
    *,
    connected: bool = True,
    ztunnel: str | None = ZT,
    workloads: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> AmbientNodeConfigStatus:
    return AmbientNodeConfigStatus.model_validate(
        {
            "ztunnel": {"connected": connected, **({"pod": ztunnel} if connected else {})},
            "workloads": workloads or [],
            "conditions": conditions or [],
        }
    )


def warning(reason: str, message: str, count: int = 1) -> EventNote:
    return EventNote("Warning", reason, message, count)


def normal(reason: str, message: str) -> EventNote:
    return EventNote("Normal", reason, message)


HOST_OK = cond("HostRulesReady", "True", "Applied")
HOST_FAILED = cond("HostRulesReady", "False", "HostRulesFailed", "RuleRejected: line 3")
FAILED = pod("web", "Failed", "RuleRejected", message="iptables-restore: line 3 failed")
ENROLLED = pod("web", "Enrolled")
TUNNELS = "tunnels to ztunnel at 10.0.0.5 in place"

CASES: list[tuple[str, AmbientNodeConfigStatus, AmbientNodeConfigStatus, list[EventNote]]] = [
    ("nothing changed", status(), status(), []),
    (
        "status equal but for lastSyncTime and counts",
        status(workloads=[ENROLLED]),
        status(workloads=[ENROLLED]).model_copy(update={"enrolled": 1}),
        [],
    ),
    # -- ztunnel --
    (
        "ztunnel connects",
        status(connected=False),
        status(),
        [normal("ZtunnelConnected", f"ztunnel {ZT} connected")],
    ),
    (
        "ztunnel connects, first status ever",
        AmbientNodeConfigStatus(),
        status(),
        [normal("ZtunnelConnected", f"ztunnel {ZT} connected")],
    ),
    (
        "another ztunnel pod takes over",
        status(ztunnel="istio-system/ztunnel-old"),
        status(),
        [normal("ZtunnelConnected", f"ztunnel {ZT} connected")],
    ),
    (
        "ztunnel disconnects, with the condition's words",
        status(),
        status(
            connected=False,
            conditions=[
                cond(
                    "ZtunnelConnected",
                    "False",
                    "NotConnected",
                    "no ztunnel is connected to the ZDS socket",
                )
            ],
        ),
        [
            warning(
                "ZtunnelDisconnected",
                f"ztunnel {ZT} disconnected: no ztunnel is connected to the ZDS socket",
            )
        ],
    ),
    ("ztunnel stays away", status(connected=False), status(connected=False), []),
    # -- the node's own pieces --
    (
        "host rules fail",
        status(conditions=[HOST_OK]),
        status(conditions=[HOST_FAILED]),
        [warning("HostRulesFailed", "HostRulesReady is False: RuleRejected: line 3")],
    ),
    (
        "host rules fail, first status ever",
        AmbientNodeConfigStatus(),
        status(conditions=[HOST_FAILED]),
        [
            normal("ZtunnelConnected", f"ztunnel {ZT} connected"),
            warning("HostRulesFailed", "HostRulesReady is False: RuleRejected: line 3"),
        ],
    ),
    (
        "host rules still failing for the same reason: told once",
        status(conditions=[HOST_FAILED]),
        status(conditions=[{**HOST_FAILED, "message": "RuleRejected: line 4"}]),
        [],
    ),
    (
        "host rules failing for another reason",
        status(conditions=[HOST_FAILED]),
        status(conditions=[cond("HostRulesReady", "False", "NetnsNotFound", "gone")]),
        [warning("NetnsNotFound", "HostRulesReady is False: gone")],
    ),
    (
        "host rules back",
        status(conditions=[HOST_FAILED]),
        status(conditions=[HOST_OK]),
        [normal("Applied", "HostRulesReady is True again")],
    ),
    (
        "the CNI plugin is taken out of the chain",
        status(conditions=[cond("CniPluginInstalled", "True", "Installed", "in 10-bridge")]),
        status(conditions=[cond("CniPluginInstalled", "False", "NotInstalled", "not in chain")]),
        [warning("NotInstalled", "CniPluginInstalled is False: not in chain")],
    ),
    (
        "node mode: every piece waits for ztunnel",
        status(
            conditions=[
                cond("TunnelsReady", "True", "Applied", TUNNELS),
                cond("ZtunnelRulesReady", "True", "Applied", "in place"),
            ]
        ),
        status(
            conditions=[
                cond("TunnelsReady", "False", "WaitingForZtunnel", "no ztunnel pod"),
                cond("ZtunnelRulesReady", "False", "WaitingForZtunnel", "no ztunnel pod"),
            ]
        ),
        [
            warning("WaitingForZtunnel", "TunnelsReady is False: no ztunnel pod"),
            warning("WaitingForZtunnel", "ZtunnelRulesReady is False: no ztunnel pod"),
        ],
    ),
    (
        # The host pass tells a repair of the node's side itself, each time it happens.
        "node mode: a repair in a condition's message is not told from the status",
        status(conditions=[cond("TunnelsReady", "True", "Applied", TUNNELS)]),
        status(
            conditions=[
                cond("TunnelsReady", "True", "Applied", f"{TUNNELS}; repaired: geneve0 re-created")
            ]
        ),
        [],
    ),
    (
        "node mode: the last repair kept in the message is not told again",
        status(conditions=[cond("TunnelsReady", "True", "Applied", f"{TUNNELS}; repaired: x")]),
        status(conditions=[cond("TunnelsReady", "True", "Applied", f"{TUNNELS}; repaired: x")]),
        [],
    ),
    (
        "Ready, InSync and ZtunnelConnected are summaries: no Event of their own",
        status(conditions=[cond("Ready", "True", "AllEnrolled"), cond("InSync", "True", "Ok")]),
        status(conditions=[cond("Ready", "False", "NotReady"), cond("InSync", "False", "Re")]),
        [],
    ),
    # -- pods --
    (
        "a pod fails",
        status(workloads=[pod("web", "Pending", "Enrolling")]),
        status(workloads=[FAILED]),
        [warning("RuleRejected", "pod shop/web: iptables-restore: line 3 failed")],
    ),
    (
        "a new pod fails at once",
        status(),
        status(workloads=[FAILED]),
        [warning("RuleRejected", "pod shop/web: iptables-restore: line 3 failed")],
    ),
    (
        "a failed pod fails again with other words: told once",
        status(workloads=[FAILED]),
        status(workloads=[{**FAILED, "message": "iptables-restore: line 4 failed"}]),
        [],
    ),
    (
        "a failed pod fails for another reason",
        status(workloads=[FAILED]),
        status(workloads=[pod("web", "Failed", "NetnsNotFound", message="gone")]),
        [warning("NetnsNotFound", "pod shop/web: gone")],
    ),
    (
        "a pod fails without a message",
        status(),
        status(workloads=[pod("web", "Failed")]),
        [warning("Failed", "pod shop/web failed")],
    ),
    (
        "a failed pod recovers (its state tells it)",
        status(workloads=[FAILED]),
        status(workloads=[ENROLLED]),
        [],
    ),
    (
        "a pending pod is not a failure",
        status(),
        status(workloads=[pod("web", "Pending", "ZtunnelNotConnected")]),
        [],
    ),
    (
        "a pod's redirection is repaired",
        status(workloads=[ENROLLED]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("IPv4 nat: 9 rules missing")}]),
        [warning("DriftRepaired", "pod shop/web: redirection repaired: IPv4 nat: 9 rules missing")],
    ),
    (
        "repaired again later",
        status(workloads=[{**ENROLLED, "lastRepair": repair("IPv4 nat: 9 rules missing")}]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("IPv4 nat: 9 rules missing", 5)}]),
        [warning("DriftRepaired", "pod shop/web: redirection repaired: IPv4 nat: 9 rules missing")],
    ),
    (
        "repaired again within the same second: the count tells it",
        status(workloads=[{**ENROLLED, "lastRepair": repair("x", count=1)}]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("x", count=2)}]),
        [warning("DriftRepaired", "pod shop/web: redirection repaired: x")],
    ),
    (
        "three repairs between two status writes are one note counting three",
        status(workloads=[{**ENROLLED, "lastRepair": repair("x", count=2)}]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("x", 1, count=5)}]),
        [warning("DriftRepaired", "pod shop/web: redirection repaired: x", 3)],
    ),
    (
        "a status from before counts (no count) is one repair",
        status(workloads=[{**ENROLLED, "lastRepair": repair("x")}]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("x", 1, count=2)}]),
        [warning("DriftRepaired", "pod shop/web: redirection repaired: x")],
    ),
    (
        "counted anew after re-enrolment",
        status(workloads=[{**ENROLLED, "lastRepair": repair("x", count=4)}]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("y", 1, count=1)}]),
        [warning("DriftRepaired", "pod shop/web: redirection repaired: y")],
    ),
    (
        "the same repair is not told twice",
        status(workloads=[{**ENROLLED, "lastRepair": repair("x")}]),
        status(workloads=[{**ENROLLED, "lastRepair": repair("x")}]),
        [],
    ),
    (
        "a repair forgotten (the agent restarted) is no Event",
        status(workloads=[{**ENROLLED, "lastRepair": repair("x")}]),
        status(workloads=[ENROLLED]),
        [],
    ),
    (
        "a pod that leaves is no Event",
        status(workloads=[FAILED]),
        status(),
        [],
    ),
    # -- together, in order: ztunnel, the node, pods --
    (
        "all at once",
        status(conditions=[HOST_OK], workloads=[ENROLLED]),
        status(
            connected=False,
            conditions=[HOST_FAILED],
            workloads=[FAILED, pod("api", "Failed", "NoSpec")],
        ),
        [
            warning("ZtunnelDisconnected", f"ztunnel {ZT} disconnected"),
            warning("HostRulesFailed", "HostRulesReady is False: RuleRejected: line 3"),
            warning("RuleRejected", "pod shop/web: iptables-restore: line 3 failed"),
            warning("NoSpec", "pod shop/api failed"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [pytest.param(p, c, e, id=name) for name, p, c, e in CASES],
)
def test_notes(
    previous: AmbientNodeConfigStatus,
    current: AmbientNodeConfigStatus,
    expected: list[EventNote],
) -> None:
    assert notes(previous, current) == expected
