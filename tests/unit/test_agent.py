"""The node agent's orchestration and the in-pod mode over fakes of every edge, no root.

What is real here: the NodeAgent and its queues, the InpodMode, and in the
race test the ZdsServer with a ZDS client over a real Unix socket (regular
files stand in for network namespaces: any fd can travel as SCM_RIGHTS).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.agent import reconciler
from ambient_cni.agent.events import EventNote
from ambient_cni.agent.inpod import InpodMode
from ambient_cni.agent.interfaces import NetnsNotFoundError, ZdsError
from ambient_cni.agent.reconciler import AgentOptions, NodeAgent
from ambient_cni.agent.sidecar_mode import SidecarMode
from ambient_cni.agent.zds_server import ZdsServer
from ambient_cni.api.models import Backend, SidecarCapture, Workload
from ambient_cni.api.version import operator_version
from ambient_cni.dataplane.constants import Family
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import NO_CHANGES, Change, Changes
from ambient_cni.dataplane.redirection import PodRedirect
from ambient_cni.zds import AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo
from ambient_cni_sandbox.zds_client import ZdsClient
from tests.unit.fake_kernel import FakeAddressSets
from tests.unit.test_mergepatch import apply as apply_merge_patch

DEADLINE = 10.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- fakes of the edges -------------------------------------------------------------------------


@dataclass
class Journal:
    """Every call the agent made to the world, in order."""

    events: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, uid: str) -> None:
        with self.lock:
            self.events.append((what, uid))

    def of(self, uid: str) -> list[str]:
        with self.lock:
            return [what for what, who in self.events if who == uid]


@dataclass
class FakePods:
    journal: Journal
    netns_of: dict[Path, str]  # netns -> uid, for the journal
    refuse: set[str] = field(default_factory=set)  # uids whose ruleset the kernel refuses
    drifted: set[str] = field(default_factory=set)  # uids whose rules someone changed
    missing: set[Path] = field(default_factory=set)  # namespaces that are gone
    applied: set[str] = field(default_factory=set)
    delay: Callable[[], float] = lambda: 0.0

    @property
    def backend(self) -> Backend:
        return "iptables-nft"

    def ensure(self, netns: Path, redirects: Sequence[PodRedirect]) -> Changes:
        time.sleep(self.delay())
        uid = self.netns_of[netns]
        if uid in self.refuse:
            raise DataplaneError("RuleRejected", "iptables-restore: line 3 failed")
        self.journal.note("rules", uid)
        if uid not in self.applied:
            self.applied.add(uid)
            return Changes((Change("rules", "IPv4: the ruleset applied"),))
        if uid in self.drifted:
            self.drifted.discard(uid)
            return Changes((Change("rules", "IPv4 nat: 9 of our rules missing: replaced"),))
        return NO_CHANGES

    def verify(self, netns: Path, redirects: Sequence[PodRedirect]) -> bool:
        return True

    def remove(self, netns: Path, families: Sequence[Family] = (4, 6)) -> bool:
        time.sleep(self.delay())
        if netns in self.missing:
            raise DataplaneError("NetnsNotFound", f"network namespace {netns}: gone")
        self.journal.note("rules-removed", self.netns_of[netns])
        self.applied.discard(self.netns_of[netns])
        return True


@dataclass
class FakeHost:
    journal: Journal
    sets: FakeAddressSets = field(default_factory=FakeAddressSets)

    @property
    def addresses(self) -> FakeAddressSets:
        journal, sets = self.journal, self.sets

        class Noting(FakeAddressSets):
            def add(self, ips: Sequence[str], uid: str) -> None:
                journal.note("ipset", uid)
                sets.add(ips, uid)

            def delete(self, ips: Sequence[str]) -> None:
                for ip in ips:
                    journal.note("ipset-removed", sets.members.get(ip, "?"))
                sets.delete(ips)

            def entries(self) -> dict[str, str]:
                return sets.entries()

        return Noting()

    drift: list[Change] = field(default_factory=list)  # found (and put back) by the next pass

    def ensure(self) -> Changes:
        found, self.drift = Changes(tuple(self.drift)), []
        return found

    def verify(self) -> bool:
        return True

    def uninstall(self) -> bool:
        return True


@dataclass
class FakeResolver:
    netns: dict[str, Path]  # uid -> netns

    def resolve(self, uid: str, ips: Iterable[str]) -> Path:
        if uid not in self.netns:
            raise NetnsNotFoundError(f"no network namespace holds {', '.join(ips)}")
        return self.netns[uid]


@dataclass
class FakeZtunnel:
    journal: Journal
    connected: bool = True
    connected_since: float | None = 0.0
    held: set[str] = field(default_factory=set)

    def add(self, uid: str, info: WorkloadInfo, netns_path: Path) -> None:
        if not self.connected:
            raise ZdsError("ZtunnelNotConnected", "no ztunnel is connected")
        self.journal.note("zds-add", uid)
        self.held.add(uid)

    def holds(self, uid: str) -> bool:
        return self.connected and uid in self.held

    def delete(self, uid: str) -> None:
        self.journal.note("zds-del", uid)
        self.held.discard(uid)


@dataclass
class FakePodApi:
    journal: Journal
    values: dict[str, str | None] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # pods deleted, or terminated: no sandbox
    delay: float = 0.0  # an API round trip

    def annotate(self, workload: Any, value: str | None) -> None:
        time.sleep(self.delay)
        self.journal.note(f"annotation={value}", workload.uid)
        self.values[workload.uid] = value

    def has_sandbox(self, workload: Any) -> bool:
        return workload.uid not in self.gone


@dataclass
class FakeHandles:
    held_paths: dict[str, Path] = field(default_factory=dict)

    def hold(self, uid: str, netns: Path) -> Path:
        self.held_paths[uid] = netns
        return netns

    def held(self, uid: str) -> Path | None:
        return self.held_paths.get(uid)

    def release(self, uid: str) -> None:
        self.held_paths.pop(uid, None)


@dataclass
class FakeStatus:
    """The status subresource: merge patches applied to a document."""

    document: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    writes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, patch: dict[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            self.document = apply_merge_patch(self.document, patch)
            self.version += 1
            self.writes += 1
            return {"metadata": {"resourceVersion": str(self.version)}, "status": self.document}

    def read(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.document)

    def workload(self, name: str) -> dict[str, Any] | None:
        for entry in self.read().get("workloads") or []:
            if entry["name"] == name:
                return dict(entry)
        return None

    def condition(self, kind: str) -> tuple[str, str]:
        for c in self.read().get("conditions") or []:
            if c["type"] == kind:
                return c["status"], c["reason"]
        return "?", "?"


@dataclass
class FakeNodeEvents:
    """The Events recorded on the node's object, by its UID."""

    recorded: list[tuple[str, EventNote]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, uid: str, notes: Sequence[EventNote]) -> None:
        with self.lock:
            self.recorded.extend((uid, note) for note in notes)

    def reasons(self) -> list[str]:
        with self.lock:
            return [note.reason for _, note in self.recorded]


# -- a node with pods ---------------------------------------------------------------------------


def workload(index: int) -> dict[str, Any]:
    return {
        "uid": f"uid-{index}",
        "name": f"pod-{index}",
        "namespace": "shop",
        "ips": [f"10.244.0.{index + 2}"],
    }


def node_object(
    generation: int, indexes: Iterable[int], mode: str = "inpod", sidecars: Iterable[int] = ()
) -> dict[str, Any]:
    with_sidecar = set(sidecars)
    return {
        "metadata": {"name": "node-1", "generation": generation, "uid": "anc-uid-1"},
        "spec": {
            "nodeName": "node-1",
            "redirectMode": mode,
            "workloads": [
                {**workload(i), **({"sidecar": {}} if i in with_sidecar else {})} for i in indexes
            ],
        },
    }


@dataclass
class FakeSidecars:
    journal: Journal
    netns_of: dict[Path, str]
    backend: Backend = "iptables-nft"

    def ensure(self, netns: Path, capture: SidecarCapture, families: Sequence[int]) -> Changes:
        self.journal.note("sidecar-rules", self.netns_of[netns])
        return NO_CHANGES


@dataclass
class Node:
    agent: NodeAgent
    journal: Journal
    pods: FakePods
    ztunnel: FakeZtunnel
    annotator: FakePodApi
    status: FakeStatus
    resolver: FakeResolver
    handles: FakeHandles
    events: FakeNodeEvents
    generation: int = 0
    indexes: tuple[int, ...] = ()

    def spec(
        self, indexes: Iterable[int], *, mode: str = "inpod", sidecars: Iterable[int] = ()
    ) -> None:
        self.generation += 1
        self.indexes = tuple(indexes)
        self.agent.on_object(node_object(self.generation, self.indexes, mode, sidecars))

    def status_edited(self, status: dict[str, Any]) -> None:
        """Someone else writes the status; the watch brings it to the agent."""
        with self.status.lock:
            self.status.document = status
            self.status.version += 1
            version = self.status.version
        obj = node_object(self.generation, self.indexes)
        obj["metadata"]["resourceVersion"] = str(version)
        self.agent.on_object({**obj, "status": status})

    def state(self, index: int) -> str | None:
        entry = self.status.workload(f"pod-{index}")
        return None if entry is None else str(entry["state"])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    journal = Journal()
    netns = {f"uid-{i}": tmp_path / f"netns-{i}" for i in range(8)}
    for path in netns.values():
        path.touch()
    pods = FakePods(journal, {path: uid for uid, path in netns.items()})
    ztunnel = FakeZtunnel(journal)
    annotator = FakePodApi(journal)
    resolver = FakeResolver(netns)
    handles = FakeHandles()
    mode = InpodMode(
        pods=pods,
        host=FakeHost(journal),
        resolver=resolver,
        handles=handles,
        ztunnel=ztunnel,
        pod_api=annotator,
    )
    status = FakeStatus()
    events = FakeNodeEvents()
    agent = NodeAgent(
        AgentOptions(node="node-1", zds_socket=tmp_path / "zds.sock", drift_interval=3600),
        {"inpod": mode},
        ztunnel,
        status,
        "iptables-nft",
        sidecar=SidecarMode(
            dataplane=FakeSidecars(journal, pods.netns_of), resolver=resolver, handles=handles
        ),
        events=events,
    )
    agent.start()
    try:
        yield Node(agent, journal, pods, ztunnel, annotator, status, resolver, handles, events)
    finally:
        agent.stop()


def test_a_pod_is_enrolled_in_istios_order_and_removed_in_reverse(node: Node) -> None:
    node.spec([0])
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    assert node.journal.of("uid-0") == ["rules", "zds-add", "ipset", "annotation=enabled"]
    assert node.status.read()["backend"] == "iptables-nft"

    node.spec([])
    wait_for("pod-0 gone from status", lambda: node.state(0) is None)
    # The rules first: until they are verifiably out, nothing else is taken away.
    assert node.journal.of("uid-0")[4:] == [
        "rules-removed",
        "ipset-removed",
        "zds-del",
        "annotation=None",
    ]


def test_a_pod_that_becomes_a_sidecar_pod_leaves_ambient_first_and_counts_apart(
    node: Node,
) -> None:
    node.spec([0, 1])
    wait_for("both Enrolled", lambda: node.state(0) == node.state(1) == "Enrolled")
    node.spec([0, 1], sidecars=[0])
    wait_for("pod-0 captured", lambda: "sidecar-rules" in node.journal.of("uid-0"))
    assert node.journal.of("uid-0")[4:] == [
        "rules-removed",
        "ipset-removed",
        "zds-del",
        "annotation=None",
        "sidecar-rules",
    ]
    wait_for("counted apart", lambda: node.status.read().get("sidecars") == 1)
    assert node.status.read()["enrolled"] == 1
    assert node.ztunnel.holds("uid-0") is False


def test_a_burst_puts_every_pods_rules_in_before_any_api_write(node: Node) -> None:
    # The kernel's part is quick; an API write is slower. Without the pods' kernel steps
    # first, the last pods' rules would wait behind the first pods' writes.
    node.pods.delay = lambda: 0.002
    node.annotator.delay = 0.02
    node.spec(range(8))
    wait_for("all Enrolled", lambda: all(node.state(i) == "Enrolled" for i in range(8)))
    events = [what for what, _ in node.journal.events]
    last_rules = max(i for i, what in enumerate(events) if what == "rules")
    first_write = min(i for i, what in enumerate(events) if what.startswith("annotation="))
    assert last_rules < first_write


def test_a_pass_over_an_enrolled_pod_changes_nothing_outside_the_kernel(node: Node) -> None:
    node.spec([0])
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    node.spec([0])  # a new generation, the same pod: rules re-checked, nothing else
    wait_for("the pass", lambda: node.journal.of("uid-0").count("rules") == 2)
    wait_for("InSync", lambda: node.status.read().get("observedGeneration") == 2)
    assert node.journal.of("uid-0").count("annotation=enabled") == 1
    assert node.journal.of("uid-0").count("zds-add") == 1


def test_a_pod_that_fails_fails_alone_and_is_retried(node: Node) -> None:
    del node.resolver.netns["uid-1"]
    node.pods.refuse.add("uid-2")
    node.spec([0, 1, 2, 3])
    wait_for("healthy pods Enrolled", lambda: node.state(0) == node.state(3) == "Enrolled")
    lost = wait_for("pod-1 Failed", lambda: node.status.workload("pod-1"))
    refused = wait_for("pod-2 Failed", lambda: node.status.workload("pod-2"))
    assert (lost["state"], lost["reason"]) == ("Failed", "NetnsNotFound")
    assert "10.244.0.3" in lost["message"]
    assert (refused["state"], refused["reason"]) == ("Failed", "RuleRejected")
    assert "uid-2" not in node.annotator.values  # never announced as redirected
    assert node.status.condition("Ready") == ("False", "NotReady")

    node.pods.refuse.clear()  # the kernel takes it now: the retry succeeds on its own
    wait_for("pod-2 Enrolled after a retry", lambda: node.state(2) == "Enrolled")


def test_without_ztunnel_a_pod_is_pending_and_completes_once_ztunnel_is_back(node: Node) -> None:
    node.ztunnel.connected = False
    node.spec([0])
    entry = wait_for("pod-0 Pending", lambda: node.state(0) == "Pending")
    assert entry
    assert node.annotator.values["uid-0"] == "pending"
    assert node.status.workload("pod-0")["reason"] == "ZtunnelNotConnected"  # type: ignore[index]
    node.ztunnel.connected = True
    node.agent.ztunnel_changed()
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    assert node.annotator.values["uid-0"] == "enabled"


def test_status_edited_by_anyone_is_rewritten_from_what_is_true(node: Node) -> None:
    node.spec([0, 1])
    wait_for("both Enrolled", lambda: node.state(0) == node.state(1) == "Enrolled")
    node.status_edited({"failed": 0, "enrolled": 42, "workloads": None})
    wait_for(
        "status true again",
        lambda: (
            node.status.read().get("enrolled") == 2
            and [node.state(0), node.state(1)] == ["Enrolled", "Enrolled"]
        ),
    )
    node.status_edited({})  # the object was re-created: a whole status at once
    wait_for(
        "a complete status",
        lambda: (
            node.status.read().get("enrolled") == 2
            and node.status.read().get("ztunnel", {}).get("connected") is True
        ),
    )


def test_a_missing_object_holds_every_pod(node: Node) -> None:
    node.spec([0, 1])
    wait_for("both Enrolled", lambda: node.state(0) == node.state(1) == "Enrolled")
    calls = len(node.journal.events)
    node.agent.on_object(None)
    node.agent.ztunnel_changed()  # a pass is asked for while the object is away
    node.spec([0, 1])  # the controller re-creates it
    wait_for("both still Enrolled", lambda: node.status.read().get("enrolled") == 2)
    assert [e for e in node.journal.events[calls:] if e[0] != "rules"] == []
    assert node.annotator.values == {"uid-0": "enabled", "uid-1": "enabled"}


def test_a_pod_whose_netns_cannot_be_found_stays_removing_until_it_is_gone(node: Node) -> None:
    node.spec([0])
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    # The agent lost track of the netns (a restart with the bind mount gone, say).
    node.handles.release("uid-0")
    del node.resolver.netns["uid-0"]
    node.spec([])
    entry = wait_for(
        "Removing with NetnsNotFound",
        lambda: (e := node.status.workload("pod-0")) and e["reason"] == "NetnsNotFound" and e,
    )
    assert entry["state"] == "Removing"
    assert "rules-removed" not in node.journal.of("uid-0")
    assert node.annotator.values["uid-0"] == "enabled"  # still redirected, and said so
    assert node.ztunnel.holds("uid-0")
    node.annotator.gone.add("uid-0")  # the pod is deleted: its netns goes with its sandbox
    node.spec([])  # a new generation: a pass now rather than at the next backoff
    wait_for("pod-0 forgotten", lambda: node.state(0) is None)
    assert not node.ztunnel.holds("uid-0")


def test_a_drift_repair_is_reported_with_what_was_wrong(node: Node) -> None:
    node.spec([0])
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    assert "lastRepair" not in (node.status.workload("pod-0") or {})
    node.pods.drifted.add("uid-0")
    node.agent.ztunnel_changed()  # any pass over the pod finds it
    repair = wait_for(
        "lastRepair in status", lambda: (node.status.workload("pod-0") or {}).get("lastRepair")
    )
    assert repair["reason"] == "DriftRepaired"
    assert repair["message"] == "IPv4 nat: 9 of our rules missing: replaced"


def test_status_names_the_agents_version(node: Node) -> None:
    node.spec([0])
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    assert node.status.read()["agentVersion"] == operator_version()
    assert operator_version() not in ("", "unknown")  # the package is installed


def test_failures_repairs_and_ztunnel_are_told_in_events_on_the_object(node: Node) -> None:
    node.pods.refuse.add("uid-1")
    node.spec([0, 1])
    wait_for("pod-1 Failed", lambda: node.state(1) == "Failed")
    wait_for("its Event", lambda: "RuleRejected" in node.events.reasons())
    uid, failed = next((u, n) for u, n in node.events.recorded if n.reason == "RuleRejected")
    assert uid == "anc-uid-1"
    assert failed == EventNote(
        "Warning", "RuleRejected", "pod shop/pod-1: iptables-restore: line 3 failed"
    )
    # A fresh object: the connection is news too. Nothing else was.
    assert sorted(node.events.reasons()) == ["RuleRejected", "ZtunnelConnected"]

    node.pods.drifted.add("uid-0")
    node.agent.ztunnel_changed()  # any pass over the pod finds it
    wait_for("the repair's Event", lambda: "DriftRepaired" in node.events.reasons())
    assert node.events.recorded[-1][1].message == (
        "pod shop/pod-0: redirection repaired: IPv4 nat: 9 of our rules missing: replaced"
    )

    node.ztunnel.connected = False
    node.agent.ztunnel_changed()
    wait_for("ZtunnelDisconnected", lambda: "ZtunnelDisconnected" in node.events.reasons())
    # Failed once, told once: the retries of pod-1 since add nothing.
    assert node.events.reasons().count("RuleRejected") == 1


def test_a_repair_of_the_nodes_own_rules_is_an_event(node: Node) -> None:
    node.spec([0])
    wait_for("pod-0 Enrolled", lambda: node.state(0) == "Enrolled")
    host = node.agent.modes["inpod"].host  # type: ignore[attr-defined]
    host.drift = [Change("rules", "IPv4 nat: 3 of our rules missing: replaced")]
    node.spec([0, 1])  # any change brings a pass over the node
    said = "the node's rules repaired: IPv4 nat: 3 of our rules missing: replaced"
    wait_for("the repair's Event", lambda: ("Warning", "DriftRepaired", said) in told(node))


def told(node: Node) -> list[tuple[str, str, str]]:
    with node.events.lock:
        return [(n.type, n.reason, n.message) for _, n in node.events.recorded]


def test_a_restarted_agent_does_not_tell_again_what_the_server_already_says(node: Node) -> None:
    # The object as the agent before this one left it: pod-1 failed, ztunnel connected.
    node.pods.refuse.add("uid-1")
    earlier = {
        "ztunnel": {"connected": True},
        "workloads": [
            {
                "uid": "uid-1",
                "name": "pod-1",
                "namespace": "shop",
                "state": "Failed",
                "reason": "RuleRejected",
                "message": "iptables-restore: line 3 failed",
            }
        ],
    }
    node.generation = 1
    node.indexes = (0, 1)
    node.status.document = earlier
    node.agent.on_object({**node_object(1, [0, 1]), "status": earlier})
    wait_for(
        "both reconciled and reported",
        lambda: in_sync(node) and node.state(0) == "Enrolled" and node.state(1) == "Failed",
    )
    node.pods.refuse.add("uid-2")
    node.spec([0, 1, 2])  # something new fails: that is news
    wait_for("pod-2's Event", lambda: node.events.reasons() == ["RuleRejected"])
    assert "pod-2" in node.events.recorded[0][1].message


def test_an_unsupported_redirect_mode_keeps_every_pod_as_it_was(node: Node) -> None:
    node.spec([0, 1])
    wait_for("both Enrolled", lambda: node.state(0) == node.state(1) == "Enrolled")
    calls = len(node.journal.events)

    node.spec([0, 1], mode="node")
    wait_for(
        "Ready=False RedirectModeNotSupported",
        lambda: node.status.condition("Ready") == ("False", "RedirectModeNotSupported"),
    )
    assert node.status.read()["mode"] == "node"
    assert node.status.condition("InSync") == ("False", "RedirectModeNotSupported")
    node.spec([], mode="node")  # even a spec that lists no pods removes nothing
    wait_for("status caught up", lambda: node.status.read()["observedGeneration"] == 3)
    assert len(node.journal.events) == calls
    assert [node.state(0), node.state(1)] == ["Enrolled", "Enrolled"]
    assert node.annotator.values == {"uid-0": "enabled", "uid-1": "enabled"}

    node.spec([0], mode="inpod")  # back to a mode the agent has: reconciling resumes
    wait_for("pod-1 un-enrolled", lambda: node.state(1) is None)
    assert node.status.condition("Ready") == ("True", "AllEnrolled")


# -- the race: ztunnel reconnecting while pods come and go ---------------------------------------


@dataclass
class ZtunnelPeer:
    """One ztunnel process as the stand-in behaves: its snapshot replaces what it holds."""

    socket_path: Path
    inode_of: dict[str, int]
    held: set[str] = field(default_factory=set)
    named: set[str] = field(default_factory=set)
    wrong_fd: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def handle(self, request: Any, fd: int | None) -> str:
        time.sleep(0.002)  # a slow ztunnel: snapshots take long enough to race with
        with self.lock:
            if isinstance(request, AddWorkload):
                assert fd is not None
                if os.fstat(fd).st_ino != self.inode_of[request.uid]:
                    self.wrong_fd.append(request.uid)
                self.held.add(request.uid)
                self.named.add(request.uid)
            elif isinstance(request, KeepWorkload):
                self.named.add(request.uid)
            elif isinstance(request, DelWorkload):
                self.held.discard(request.uid)
            elif isinstance(request, SnapshotSent):
                self.held &= self.named
        if fd is not None:
            os.close(fd)
        return ""

    def start(self) -> ZtunnelPeer:
        client = ZdsClient(self.socket_path, self.handle)
        assert client.connect(self.stop)
        threading.Thread(target=client.serve, args=(self.stop,), daemon=True).start()
        return self

    def holding(self) -> set[str]:
        with self.lock:
            return set(self.held)


def test_ztunnel_reconnecting_during_churn_ends_holding_exactly_the_enrolled_pods(
    tmp_path: Path,
) -> None:
    count = 40
    journal = Journal()
    netns = {f"uid-{i}": tmp_path / f"netns-{i}" for i in range(count)}
    for path in netns.values():
        path.touch()
    rng = random.Random(1337)
    pods = FakePods(journal, {p: u for u, p in netns.items()}, delay=lambda: rng.random() / 500)
    zds = ZdsServer(tmp_path / "ztunnel.sock")
    mode = InpodMode(
        pods=pods,
        host=FakeHost(journal),
        resolver=FakeResolver(netns),
        handles=FakeHandles(),
        ztunnel=zds,
        pod_api=FakePodApi(journal),
    )
    status = FakeStatus()
    agent = NodeAgent(
        AgentOptions(node="node-1", zds_socket=zds.socket_path, drift_interval=3600),
        {"inpod": mode},
        zds,
        status,
        "iptables-nft",
    )
    zds.on_change = agent.ztunnel_changed
    inodes = {u: p.stat().st_ino for u, p in netns.items()}
    agent.start()
    zds.start()
    peers: list[ZtunnelPeer] = []
    try:
        wanted: list[int] = []
        for generation in range(1, 13):
            # A new ztunnel connects (the old one goes) while a different half of the pods
            # enters and the rest leaves.
            wanted = sorted(rng.sample(range(count), count // 2))
            peers.append(ZtunnelPeer(zds.socket_path, inodes).start())
            agent.on_object(node_object(generation, wanted))
            time.sleep(rng.random() / 20)  # pacing the churn, not waiting for anything
            for old in peers[:-1]:
                old.stop.set()
        final = {f"uid-{i}" for i in wanted}
        peer = peers[-1]
        wait_for(
            "every wanted pod Enrolled and no other in status",
            lambda: (
                {e["uid"] for e in status.read().get("workloads") or []} == final
                and status.read().get("enrolled") == len(final)
            ),
            timeout=30,
        )
        wait_for("ztunnel to hold exactly the enrolled pods", lambda: peer.holding() == final)
        assert peer.wrong_fd == []
        assert {e.uid for e in zds.wanted()} == final
    finally:
        for each in peers:
            each.stop.set()
        agent.stop()
        zds.stop()


def test_a_pod_enrolled_at_its_cni_add_is_whole_before_the_answer_and_not_redone(
    node: Node,
) -> None:
    node.spec([])
    wanted = Workload.model_validate(workload(1))
    result = node.agent.enrol_now(wanted, timeout=DEADLINE)
    assert result.state == "Enrolled"
    assert node.journal.of("uid-1") == ["rules", "zds-add", "ipset", "annotation=enabled"]

    node.spec([1])  # the controller lists it: a pass, and nothing applied twice
    wait_for(
        "pod-1 reconciled against the spec and reported",
        lambda: in_sync(node) and node.state(1) == "Enrolled",
    )
    # The pass re-checked the rules; ztunnel and the annotation were not asked again.
    assert node.journal.of("uid-1").count("zds-add") == 1
    assert node.journal.of("uid-1").count("annotation=enabled") == 1


def in_sync(node: Node) -> bool:
    facts = node.agent.facts()
    return facts is not None and facts[0].in_sync


def test_a_pod_the_spec_never_lists_goes_after_the_cni_grace_and_a_newer_spec(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "CNI_GRACE", 0.0)  # over at once
    node.spec([])
    assert node.agent.enrol_now(Workload.model_validate(workload(2)), DEADLINE).state == (
        "Enrolled"
    )
    # The grace is over, but no newer spec has left it out (the controller may be away).
    node.agent.pods.add("uid-2")
    wait_for("a pass", lambda: in_sync(node))
    assert "annotation=None" not in node.journal.of("uid-2")

    node.spec([])  # a newer spec without it: it left the mesh
    wait_for(
        "pod-2 un-enrolled and gone from status",
        lambda: "annotation=None" in node.journal.of("uid-2") and node.state(2) is None,
    )


def test_without_a_spec_a_cni_add_is_refused_not_applied(node: Node) -> None:
    result = node.agent.enrol_now(Workload.model_validate(workload(3)), timeout=DEADLINE)
    assert result.state == "Failed"
    assert result.reason == "NoSpec"
    assert node.journal.of("uid-3") == []


def test_a_new_sandbox_for_an_enrolled_pod_is_redirected_and_handed_to_ztunnel_anew(
    node: Node, tmp_path: Path
) -> None:
    node.spec([4])
    wait_for("pod-4 Enrolled", lambda: node.state(4) == "Enrolled")
    # The pod's sandbox is made again (new netns, new address) before the spec knows.
    fresh = tmp_path / "netns-4-again"
    fresh.touch()
    node.pods.netns_of[fresh] = "uid-4"
    node.resolver.netns["uid-4"] = fresh
    again = Workload.model_validate({**workload(4), "ips": ["10.244.0.99"]})

    assert node.agent.enrol_now(again, timeout=DEADLINE).state == "Enrolled"
    assert node.handles.held("uid-4") == fresh
    # ztunnel let go of the old sandbox and took the new one.
    assert node.journal.of("uid-4")[4:] == ["zds-del", "rules", "zds-add", "ipset"]


def test_an_earlier_outcome_never_answers_a_cni_add(node: Node) -> None:
    node.spec([5])
    wait_for("pod-5 Enrolled", lambda: node.state(5) == "Enrolled")
    node.pods.delay = lambda: 1.0  # the new sandbox's rules take longer than the answer may
    again = Workload.model_validate({**workload(5), "ips": ["10.244.0.98"]})
    result = node.agent.enrol_now(again, timeout=0.3)
    assert result.state == "Pending"  # not the Enrolled of the sandbox before
    assert result.message == "not enrolled in time"
