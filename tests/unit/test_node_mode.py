"""The node redirect mode and switching modes on a live node, over fakes of every edge.

Real here: the NodeAgent and its queues, the InpodMode and the NodeMode. The kernel of
node mode is a fake that journals each call (the e2e tests drive the real one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.agent.inpod import InpodMode
from ambient_cni.agent.node_mode import NodeMode
from ambient_cni.agent.reconciler import AgentOptions, NodeAgent
from ambient_cni.api.models import Workload
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import NO_CHANGES, Change, Changes
from ambient_cni.dataplane.node_plan import TunnelKind, ZtunnelPath
from ambient_cni.dataplane.node_rules import NodeHost
from tests.unit.test_agent import (
    FakeHandles,
    FakeHost,
    FakeNodeEvents,
    FakePodApi,
    FakePods,
    FakeResolver,
    FakeStatus,
    FakeZtunnel,
    Journal,
    node_object,
    wait_for,
)

ZTUNNEL = {"name": "ztunnel-x", "namespace": "istio-system", "uid": "zt-1", "ip": "10.244.0.99"}


@dataclass
class FakeNodeKernel:
    journal: Journal
    pods: dict[str, str] = field(default_factory=dict)  # what the set holds
    veth: str | None = "veth0"  # None: the ztunnel pod sits behind a bridge
    drift: list[Change] = field(default_factory=list)  # what the next tunnels pass repairs
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tunnel_kind(self) -> TunnelKind:
        return "vxlan"

    def ztunnel_path(self, ztunnel_ip: str) -> ZtunnelPath:
        if self.veth is None:
            raise DataplaneError("ZtunnelNotOnVeth", f"the route to ztunnel {ztunnel_ip} ...")
        return ZtunnelPath(veth=self.veth, host_ip="10.244.0.1")

    def ensure_rules(self, host: NodeHost) -> Changes:
        return NO_CHANGES

    def sync_set(self, pods: Mapping[str, str]) -> Changes:
        with self.lock:
            self.pods = dict(pods)
        return NO_CHANGES

    def ensure_tunnels(self, host: NodeHost, pods: Mapping[str, str]) -> Changes:
        with self.lock:
            drift, self.drift = self.drift, []
        return Changes(tuple(drift))

    def ensure_ztunnel(self, netns: Path, ztunnel_ip: str, host_ip: str, port: int) -> Changes:
        self.journal.note("ztunnel-side", ztunnel_ip)
        return NO_CHANGES

    def add_pod(self, ip: str, uid: str, host: NodeHost) -> Changes:
        self.journal.note("node-add", uid)
        with self.lock:
            self.pods[ip] = uid
        return Changes((Change("routing", f"{ip} added"),))

    def remove_pod(self, ip: str) -> bool:
        with self.lock:
            uid = self.pods.pop(ip, None)
        self.journal.note("node-remove", uid or "?")
        return uid is not None

    def uninstall(self) -> bool:
        self.journal.note("node-uninstall", "node")
        return True


@dataclass
class UninstallNoting(FakeHost):
    def uninstall(self) -> bool:
        self.journal.note("inpod-uninstall", "node")
        return True


@dataclass
class Node:
    agent: NodeAgent
    journal: Journal
    kernel: FakeNodeKernel
    pods: FakePods
    annotator: FakePodApi
    status: FakeStatus
    ztunnel: FakeZtunnel
    events: FakeNodeEvents
    generation: int = 0

    def spec(self, indexes: list[int], mode: str, ztunnel: dict[str, Any] | None = None) -> None:
        self.generation += 1
        obj = node_object(self.generation, indexes, mode)
        if ztunnel is not None:
            obj["spec"]["ztunnel"] = {**ztunnel, "ready": True}
        self.agent.on_object(obj)

    def workload(self, index: int) -> dict[str, Any]:
        return self.status.workload(f"pod-{index}") or {}

    def condition(self, kind: str) -> dict[str, Any]:
        found = [c for c in self.status.read().get("conditions") or [] if c["type"] == kind]
        return found[0] if found else {}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    journal = Journal()
    netns = {f"uid-{i}": tmp_path / f"netns-{i}" for i in range(4)}
    netns["zt-1"] = tmp_path / "netns-ztunnel"
    for path in netns.values():
        path.touch()
    pods = FakePods(journal, {path: uid for uid, path in netns.items()})
    ztunnel = FakeZtunnel(journal)
    annotator = FakePodApi(journal)
    resolver = FakeResolver(netns)
    inpod = InpodMode(
        pods=pods,
        host=UninstallNoting(journal),
        resolver=resolver,
        handles=FakeHandles(),
        ztunnel=ztunnel,
        pod_api=annotator,
    )
    kernel = FakeNodeKernel(journal)
    node_mode = NodeMode(
        dataplane=kernel, resolver=resolver, pod_api=annotator, backend="iptables-nft"
    )
    status = FakeStatus()
    events = FakeNodeEvents()
    agent = NodeAgent(
        AgentOptions(node="node-1", zds_socket=tmp_path / "zds.sock", drift_interval=3600),
        {"inpod": inpod, "node": node_mode},
        ztunnel,
        status,
        "iptables-nft",
        events=events,
    )
    agent.start()
    try:
        yield Node(agent, journal, kernel, pods, annotator, status, ztunnel, events)
    finally:
        agent.stop()


def test_a_pod_waits_for_the_ztunnel_pod_then_is_enrolled_with_nothing_in_its_netns(
    node: Node,
) -> None:
    node.spec([], "node")
    wait_for("waiting", lambda: node.condition("TunnelsReady").get("reason") == "WaitingForZtunnel")
    node.spec([0], "node")
    wait_for("pending", lambda: node.workload(0).get("reason") == "NodeRulesNotReady")
    assert node.condition("Ready")["status"] == "False"

    node.spec([0], "node", ZTUNNEL)
    wait_for("enrolled", lambda: node.workload(0).get("state") == "Enrolled")
    assert node.journal.of("uid-0") == ["node-add", "annotation=enabled"]
    assert node.journal.of("10.244.0.99") == ["ztunnel-side"]
    wait_for("Ready", lambda: node.condition("Ready").get("status") == "True")
    assert node.condition("TunnelsReady")["reason"] == "Vxlan"
    assert node.condition("ZtunnelConnected")["reason"] == "Ready"
    assert node.pods.applied == set()  # no rules in any pod

    node.spec([], "node", ZTUNNEL)
    wait_for("gone", lambda: not node.workload(0))
    assert node.journal.of("uid-0")[2:] == ["node-remove", "annotation=None"]
    assert node.kernel.pods == {}


def test_a_ztunnel_behind_a_bridge_is_said_plainly(node: Node) -> None:
    node.kernel.veth = None
    node.spec([0], "node", ZTUNNEL)
    wait_for(
        "the reason in status",
        lambda: node.condition("HostRulesReady").get("reason") == "ZtunnelNotOnVeth",
    )
    assert node.workload(0)["state"] == "Pending"


def test_switching_modes_takes_each_pod_in_the_new_way_before_out_of_the_old(
    node: Node,
) -> None:
    node.spec([0], "inpod", ZTUNNEL)
    wait_for("enrolled in-pod", lambda: node.workload(0).get("state") == "Enrolled")
    # Started in in-pod mode: whatever node mode had left on the node went first.
    assert node.journal.of("node") == ["node-uninstall"]
    before = len(node.journal.of("uid-0"))

    node.spec([0], "node", ZTUNNEL)
    wait_for("in-pod rules out", lambda: "rules-removed" in node.journal.of("uid-0"))
    wait_for("the in-pod node side gone", lambda: "inpod-uninstall" in node.journal.of("node"))
    # In the new way first; then out of the old one, the annotation kept all along.
    assert node.journal.of("uid-0")[before:] == [
        "node-add",
        "rules-removed",
        "ipset-removed",
        "zds-del",
    ]
    assert node.annotator.values["uid-0"] == "enabled"
    wait_for("in sync", lambda: node.condition("InSync").get("status") == "True")
    assert node.workload(0)["state"] == "Enrolled"

    before = len(node.journal.of("uid-0"))
    node.spec([0], "inpod", ZTUNNEL)
    wait_for("node mode's side gone", lambda: node.journal.of("node")[-1] == "node-uninstall")
    assert node.journal.of("uid-0")[before:] == ["rules", "zds-add", "ipset", "node-remove"]
    assert node.annotator.values["uid-0"] == "enabled"


def test_a_repair_of_a_pods_route_on_the_node_is_credited_to_the_pod(node: Node) -> None:
    node.spec([0], "node", ZTUNNEL)
    wait_for("enrolled", lambda: node.workload(0).get("state") == "Enrolled")
    wait_for("Ready", lambda: node.condition("Ready").get("status") == "True")
    node.kernel.drift = [
        Change("tunnels", "istioin (vxlan) created"),
        Change("routing", "table 100 10.244.0.2/32 via 192.168.126.2 dev istioin: added"),
    ]
    node.spec([0, 1], "node", ZTUNNEL)  # any change brings a pass over the node
    repair = wait_for("the pod's repair", lambda: node.workload(0).get("lastRepair"))
    assert repair["reason"] == "DriftRepaired"
    assert "10.244.0.2/32 via 192.168.126.2" in repair["message"]
    tunnels = node.condition("TunnelsReady")
    assert "repaired: istioin (vxlan) created" in tunnels["message"]
    assert tunnels["status"] == "True"
    # An Event for the node's side, each time; the pod's own repair is one more.
    said = "the node's rules repaired: TunnelsReady: istioin (vxlan) created"
    wait_for("the node's repair Event", lambda: len(told(node, said)) == 1)
    node.kernel.drift = [Change("tunnels", "istioin (vxlan) created")]
    node.spec([0, 1, 2], "node", ZTUNNEL)
    wait_for("a second Event for the same repair", lambda: len(told(node, said)) == 2)


def told(node: Node, prefix: str) -> list[str]:
    with node.events.lock:
        return [n.message for _, n in node.events.recorded if n.message.startswith(prefix)]


def test_a_cni_add_in_node_mode_answers_once_the_pods_entry_and_route_are_in(
    node: Node,
) -> None:
    node.spec([], "node", ZTUNNEL)
    wait_for("Ready", lambda: node.condition("TunnelsReady").get("status") == "True")
    new = Workload(uid="uid-3", name="pod-3", namespace="shop", ips=["10.244.0.5"])
    answer = node.agent.enrol_now(new, timeout=5)
    assert answer.state == "Enrolled"
    assert node.kernel.pods == {"10.244.0.5": "uid-3"}
    assert node.journal.of("uid-3") == ["node-add", "annotation=enabled"]


def test_after_a_restart_in_node_mode_in_pod_leftovers_go_once_node_mode_holds_the_pod(
    node: Node,
) -> None:
    node.spec([0], "node", ZTUNNEL)  # the first spec this agent sees
    wait_for("in sync", lambda: node.condition("InSync").get("status") == "True")
    assert node.journal.of("uid-0") == [
        "node-add",
        "annotation=enabled",
        "rules-removed",
        "zds-del",
    ]
    assert node.annotator.values["uid-0"] == "enabled"


def test_a_pod_the_old_mode_only_half_took_is_cleaned_out_of_it_on_a_switch(node: Node) -> None:
    node.ztunnel.connected = False
    node.spec([0], "inpod", ZTUNNEL)
    wait_for("pending with its rules in", lambda: node.workload(0).get("state") == "Pending")
    assert "rules" in node.journal.of("uid-0")
    node.spec([0], "node", ZTUNNEL)
    wait_for("in-pod rules out", lambda: "rules-removed" in node.journal.of("uid-0"))
    wait_for("enrolled", lambda: node.workload(0).get("state") == "Enrolled")
    assert node.pods.applied == set()


def test_a_new_address_for_a_pod_replaces_its_old_one_on_the_node(node: Node) -> None:
    node.spec([0], "node", ZTUNNEL)
    wait_for("enrolled", lambda: node.kernel.pods == {"10.244.0.2": "uid-0"})
    moved = node_object(node.generation + 1, [0], "node")
    moved["spec"]["ztunnel"] = {**ZTUNNEL, "ready": True}
    moved["spec"]["workloads"][0]["ips"] = ["10.244.0.7"]
    node.generation += 1
    node.agent.on_object(moved)
    wait_for("the old address gone", lambda: node.kernel.pods == {"10.244.0.7": "uid-0"})


def test_a_pod_that_leaves_the_mesh_during_a_switch_is_taken_out_of_both(node: Node) -> None:
    node.spec([0], "inpod", ZTUNNEL)
    wait_for("enrolled in-pod", lambda: node.workload(0).get("state") == "Enrolled")
    node.pods.delay = lambda: 0.2  # the in-pod rules come out slowly
    node.spec([0], "node", ZTUNNEL)
    wait_for("node mode holds it", lambda: "node-add" in node.journal.of("uid-0"))
    node.spec([], "node", ZTUNNEL)
    wait_for("gone from status", lambda: not node.workload(0))
    assert node.kernel.pods == {}
    assert node.pods.applied == set()
    assert node.annotator.values["uid-0"] is None
