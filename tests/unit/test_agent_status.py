from __future__ import annotations

import datetime
from typing import Any

from ambient_cni.agent.status import NodeFacts, PodOutcome, render
from ambient_cni.api.models import AmbientNodeConfigStatus
from ambient_cni.install_report import InstallReport

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)
FACTS = NodeFacts(
    generation=3,
    mode="inpod",
    backend="iptables-nft",
    ztunnel_connected=True,
    ztunnel_pod="istio-system/ztunnel-abc",
    ztunnel_since=T0,
    host_rules_ok=True,
    in_sync=True,
)


def pod(name: str, state: str, reason: str | None = None) -> PodOutcome:
    return PodOutcome.model_validate(
        {
            "uid": f"u-{name}",
            "name": name,
            "namespace": "shop",
            "state": state,
            "reason": reason,
            "since": T0,
        }
    )


def conditions(
    status: dict[str, Any] | AmbientNodeConfigStatus,
) -> dict[str, tuple[str, str, str]]:
    wire = status.to_wire() if isinstance(status, AmbientNodeConfigStatus) else status
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in wire["conditions"]}


def test_all_enrolled_is_ready() -> None:
    status = render(FACTS, [pod("b", "Enrolled"), pod("a", "Enrolled")], [], T0).to_wire()
    assert (status["enrolled"], status["pending"], status["failed"]) == (2, 0, 0)
    assert [w["name"] for w in status["workloads"]] == ["a", "b"]
    assert conditions(status) == {
        "Ready": ("True", "AllEnrolled", "2 workload(s) enrolled"),
        "ZtunnelConnected": ("True", "Connected", "ztunnel istio-system/ztunnel-abc connected"),
        "HostRulesReady": ("True", "Applied", ""),
        "InSync": ("True", "Reconciled", ""),
    }
    assert status["observedGeneration"] == 3
    assert status["ztunnel"] == {
        "connected": True,
        "pod": "istio-system/ztunnel-abc",
        "since": "2026-01-01T00:00:00Z",
    }


def test_problems_make_ready_false_and_say_why() -> None:
    facts = FACTS.model_copy(update={"ztunnel_connected": False})
    outcomes = [
        pod("a", "Pending", "ZtunnelNotConnected"),
        pod("b", "Failed", "NetnsNotFound"),
        pod("c", "Enrolled"),
    ]
    status = render(facts, outcomes, [], T0).to_wire()
    assert (status["enrolled"], status["pending"], status["failed"]) == (1, 1, 1)
    ready = conditions(status)["Ready"]
    assert ready[:2] == ("False", "NotReady")
    assert ready[2] == "ztunnel not connected; 1 workload(s) failed; 1 workload(s) pending"
    assert status["ztunnel"] == {"connected": False}


def test_transition_time_holds_while_status_holds() -> None:
    first = render(FACTS, [], [], T0)
    again = render(FACTS, [], first.conditions, T1)
    assert {c.last_transition_time for c in again.conditions} == {T0}
    flipped = render(FACTS.model_copy(update={"in_sync": False}), [], again.conditions, T1)
    times = {c.type: c.last_transition_time for c in flipped.conditions}
    assert times["InSync"] == T1
    assert times["Ready"] == T1
    assert times["ZtunnelConnected"] == T0


def test_an_unsupported_mode_says_so_and_that_nothing_is_removed() -> None:
    facts = FACTS.model_copy(update={"mode": "node", "mode_supported": False, "in_sync": False})
    status = render(facts, [pod("a", "Enrolled")], [], T0).to_wire()
    assert status["mode"] == "node"
    found = conditions(status)
    assert found["Ready"] == (
        "False",
        "RedirectModeNotSupported",
        "redirectMode node is not supported by this agent; "
        "every pod is kept as it was and nothing is removed",
    )
    assert found["InSync"][:2] == ("False", "RedirectModeNotSupported")
    assert status["enrolled"] == 1  # what the kernel still holds


def test_a_node_with_the_cni_plugin_is_ready_only_when_it_is_installed() -> None:
    installed = InstallReport(installed=True, message="istio-cni is chained in /x.conflist")
    found = conditions(render(FACTS.model_copy(update={"cni_plugin": installed}), [], [], T0))
    assert found["CniPluginInstalled"] == (
        "True",
        "Installed",
        "istio-cni is chained in /x.conflist",
    )
    assert found["Ready"][0] == "True"

    missing = InstallReport(installed=False, message="no primary CNI config")
    found = conditions(render(FACTS.model_copy(update={"cni_plugin": missing}), [], [], T0))
    assert found["CniPluginInstalled"] == ("False", "NotInstalled", "no primary CNI config")
    assert found["Ready"] == (
        "False",
        "NotReady",
        "CNI plugin not installed: no primary CNI config",
    )
    # A node without the plugin has no such condition.
    assert "CniPluginInstalled" not in conditions(render(FACTS, [], [], T0))


def test_a_stopped_agent_leaves_the_node_not_ready() -> None:
    found = conditions(render(FACTS.model_copy(update={"agent_stopped": True}), [], [], T0))
    assert found["Ready"] == (
        "False",
        "AgentStopped",
        "the node agent is stopped; new pods on this node wait for it",
    )


def test_the_agents_version_is_reported_as_given() -> None:
    facts = FACTS.model_copy(update={"agent_version": "0.1.0"})
    assert render(facts, [], [], T0).to_wire()["agentVersion"] == "0.1.0"
    assert "agentVersion" not in render(FACTS, [], [], T0).to_wire()
