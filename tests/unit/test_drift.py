"""Re-checking on the kernel's word: which namespaces are watched, what a change re-checks,
what each tick of the drift thread re-checks, and the legacy backend's polling. No root: a
fake KernelChanges stands where the netlink sockets are (their reading is in
test_nft_changes.py)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ambient_cni.agent.drift import HOST, DriftSchedule, Due, Watches
from ambient_cni.agent.inpod import InpodMode
from ambient_cni.agent.interfaces import NoAnnouncements, OnChange
from ambient_cni.agent.reconciler import AgentOptions, NodeAgent
from ambient_cni.dataplane.interfaces import Changes
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

# -- the schedule -------------------------------------------------------------------------------


def test_where_changes_are_announced_a_tick_re_checks_only_what_is_not_watched() -> None:
    schedule = DriftSchedule(poll=10, resync=90, announces=True, now=0)
    assert schedule.tick == 10
    assert schedule.full_every == 90
    pods = {"a", "b", "c"}
    # The node's side is one pass, partly unannounced (ipsets): every tick.
    assert schedule.due(10, pods, watched={"a", "b", HOST}) == Due(frozenset({"c"}), host=True)
    assert schedule.due(30, pods, watched=pods | {HOST}) == Due(host=True)
    # The safety net: every pod, the host and status, every resync interval.
    assert schedule.due(90, pods, watched=pods | {HOST}) == Due(frozenset(pods), True, True)
    assert schedule.due(100, pods, watched=pods | {HOST}) == Due(host=True)
    assert schedule.due(180, pods, watched=pods | {HOST}).full


def test_legacy_iptables_announces_nothing_so_every_tick_re_checks_every_pod() -> None:
    schedule = DriftSchedule(poll=10, resync=90, announces=False, now=0)
    assert schedule.tick == schedule.full_every == 10
    for now in (10, 20, 30):
        assert schedule.due(now, {"a", "b"}, watched=set()) == Due(
            frozenset({"a", "b"}), True, True
        )
    assert "announces nothing" in schedule.describe("iptables-legacy")
    assert "every 10 s (--drift-interval)" in schedule.describe("iptables-legacy")
    announcing = DriftSchedule(poll=10, resync=90, announces=True, now=0)
    assert "every 90 s (--resync-interval)" in announcing.describe("iptables-nft")


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DriftSchedule(poll=0, resync=90, announces=True, now=0)


# -- the watches --------------------------------------------------------------------------------


@dataclass
class FakeChanges:
    """A KernelChanges whose announcements the test makes; `refuse`: namespaces that cannot
    be watched."""

    announces: bool = True
    refuse: set[Path] = field(default_factory=set)
    watched: dict[str, Path | None] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    on_change: OnChange | None = None
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, on_change: OnChange) -> None:
        self.on_change = on_change

    def watch(self, key: str, netns: Path | None) -> bool:
        with self.lock:
            self.calls.append(("watch", key))
            if netns in self.refuse:
                self.watched.pop(key, None)
                return False
            self.watched[key] = netns
            return True

    def unwatch(self, key: str) -> None:
        with self.lock:
            self.calls.append(("unwatch", key))
            self.watched.pop(key, None)

    def close(self) -> None:
        self.closed = True

    def announce(self, key: str) -> None:
        assert self.on_change is not None
        self.on_change(key)


def test_watching_a_key_where_it_is_watched_already_asks_nothing_of_the_kernel() -> None:
    source = FakeChanges(refuse={Path("/gone")})
    watches = Watches(source)
    watches.watch("a", Path("/ns/a"))
    watches.watch("a", Path("/ns/a"))
    assert source.calls == [("watch", "a")]
    watches.watch("a", Path("/ns/a2"))  # a new sandbox: its new namespace
    assert source.watched == {"a": Path("/ns/a2")}
    watches.watch("b", Path("/gone"))
    assert watches.watching() == {"a"}  # b cannot be watched: it is polled
    watches.drop("a")
    watches.drop("a")
    assert source.calls.count(("unwatch", "a")) == 1
    assert watches.watching() == set()


# -- the agent ----------------------------------------------------------------------------------


@dataclass
class Ticks:
    """Each tick's Due, as the agent's drift thread asked for it."""

    schedule: DriftSchedule
    seen: queue.SimpleQueue[Due] = field(default_factory=queue.SimpleQueue)

    @property
    def tick(self) -> float:
        return self.schedule.tick

    def due(self, now: float, pods: set[str], watched: set[str]) -> Due:
        found = self.schedule.due(now, pods, watched)
        self.seen.put(found)
        return found

    def next(self) -> Due:
        return self.seen.get(timeout=10)


@dataclass
class Agent:
    agent: NodeAgent
    journal: Journal
    pods: FakePods
    host: FakeHost
    changes: FakeChanges
    status: FakeStatus
    events: FakeNodeEvents
    ticks: Ticks | None = None

    def passes(self, uid: str) -> int:
        return self.journal.of(uid).count("rules")

    def journal_host(self) -> str:
        """What the node's rules were said to need, in the log of repairs (Events)."""
        return " ".join(note.message for _, note in self.events.recorded)


def make_agent(
    tmp_path: Path, changes: FakeChanges | None, *, drift: float = 3600, resync: float = 3600
) -> Agent:
    journal = Journal()
    netns = {f"uid-{i}": tmp_path / f"netns-{i}" for i in range(3)}
    pods = FakePods(journal, {path: uid for uid, path in netns.items()})
    host = FakeHost(journal)
    status = FakeStatus()
    events = FakeNodeEvents()
    ztunnel = FakeZtunnel(journal)
    mode = InpodMode(
        pods=pods,
        host=host,
        resolver=FakeResolver(netns),
        handles=FakeHandles(),
        ztunnel=ztunnel,
        pod_api=FakePodApi(journal),
    )
    agent = NodeAgent(
        AgentOptions(
            node="node-1",
            zds_socket=tmp_path / "zds.sock",
            drift_interval=drift,
            resync_interval=resync,
        ),
        {"inpod": mode},
        ztunnel,
        status,
        "iptables-nft",
        changes=changes,
        events=events,
    )
    return Agent(agent, journal, pods, host, changes or FakeChanges(), status, events)


@pytest.fixture
def announcing(tmp_path: Path) -> Iterator[Agent]:
    node = make_agent(tmp_path, FakeChanges())
    node.agent.start()
    try:
        node.agent.on_object(node_object(1, [0, 1]))
        wait_for("both Enrolled", lambda: node.agent.state("uid-0") == "Enrolled")
        wait_for("both Enrolled", lambda: node.agent.state("uid-1") == "Enrolled")
        yield node
    finally:
        node.agent.stop()


def test_an_enrolled_pods_namespace_and_the_node_are_watched_and_let_go_with_the_pod(
    announcing: Agent, tmp_path: Path
) -> None:
    assert announcing.changes.watched == {
        HOST: None,  # the agent's own namespace (no --host-netns)
        "uid-0": tmp_path / "netns-0",
        "uid-1": tmp_path / "netns-1",
    }
    announcing.agent.on_object(node_object(2, [1]))
    wait_for("pod-0 out", lambda: announcing.agent.state("uid-0") is None)
    assert set(announcing.changes.watched) == {HOST, "uid-1"}


def test_a_change_announced_in_a_pods_namespace_re_checks_that_pod_only(
    announcing: Agent,
) -> None:
    before = {uid: announcing.passes(uid) for uid in ("uid-0", "uid-1")}
    announcing.pods.drifted.add("uid-0")  # someone flushed pod-0's rules
    announcing.changes.announce("uid-0")
    repair = wait_for(
        "pod-0 repaired",
        lambda: (announcing.status.workload("pod-0") or {}).get("lastRepair"),
    )
    assert repair["message"] == "IPv4 nat: 9 of our rules missing: replaced"
    assert announcing.passes("uid-0") == before["uid-0"] + 1
    assert announcing.passes("uid-1") == before["uid-1"]  # nobody else was re-checked
    announcing.changes.announce("uid-9")  # not ours (any more): nothing to re-check


def test_a_change_announced_in_the_nodes_namespace_re_checks_the_nodes_rules(
    announcing: Agent,
) -> None:
    before = announcing.passes("uid-0")
    seen = threading.Event()
    ensure = announcing.host.ensure

    def noting() -> Changes:
        seen.set()
        return ensure()

    announcing.host.ensure = noting  # type: ignore[method-assign]
    announcing.changes.announce(HOST)
    assert seen.wait(10)
    assert announcing.passes("uid-0") == before


def _ticking(node: Agent) -> Ticks:
    """Start the agent with a spy on its drift schedule."""
    node.agent.start()
    ticks = Ticks(node.agent._schedule)
    node.agent._schedule = ticks  # type: ignore[assignment]
    node.ticks = ticks
    return ticks


def test_with_announcements_the_ticks_re_check_nothing_that_is_watched(tmp_path: Path) -> None:
    changes = FakeChanges(refuse={tmp_path / "netns-1"})  # pod-1's cannot be watched
    node = make_agent(tmp_path, changes, drift=0.01)
    ticks = _ticking(node)
    try:
        node.agent.on_object(node_object(1, [0, 1]))
        wait_for("both Enrolled", lambda: node.agent.state("uid-1") == "Enrolled")
        wait_for("both Enrolled", lambda: node.agent.state("uid-0") == "Enrolled")
        for _ in range(1000):  # ticks from before the pods were watched (10 ms each)
            if ticks.next().pods == {"uid-1"}:
                break
        else:
            raise AssertionError("a watched pod is re-checked on every tick")
        for _ in range(5):
            assert ticks.next() == Due(frozenset({"uid-1"}), host=True)  # polled; pod-0 never
    finally:
        node.agent.stop()


def test_legacy_iptables_keeps_polling_every_pod_every_drift_interval(tmp_path: Path) -> None:
    node = make_agent(tmp_path, None, drift=0.01)
    assert isinstance(node.agent.changes, NoAnnouncements)
    ticks = _ticking(node)
    try:
        node.agent.on_object(node_object(1, [0]))
        wait_for("pod-0 Enrolled", lambda: node.agent.state("uid-0") == "Enrolled")
        for _ in range(1000):
            if (due := ticks.next()).pods:
                break
        assert due == Due(frozenset({"uid-0"}), host=True, full=True)
        passes = node.passes("uid-0")
        node.pods.drifted.add("uid-0")  # nobody announces it: the next poll finds it
        wait_for("pod-0 repaired", lambda: (node.status.workload("pod-0") or {}).get("lastRepair"))
        assert node.passes("uid-0") > passes
    finally:
        node.agent.stop()


def test_stopping_the_agent_closes_the_source(tmp_path: Path) -> None:
    node = make_agent(tmp_path, FakeChanges())
    node.agent.start()
    node.agent.stop()
    assert node.changes.closed


def test_a_probe_set_entry_taken_out_behind_the_agents_back_is_put_back_by_a_host_pass(
    announcing: Agent,
) -> None:
    sets = announcing.host.sets
    assert sets.entries() == {"10.244.0.2": "uid-0", "10.244.0.3": "uid-1"}
    announcing.agent.on_object(node_object(2, [1]))  # pod-0 leaves: its entry must stay out
    wait_for("pod-0 out", lambda: announcing.agent.state("uid-0") is None)
    sets.delete(["10.244.0.3"])  # someone runs `ipset del` on pod-1's address
    announcing.changes.announce(HOST)  # any host pass (a tick, a change) finds it
    wait_for("put back", lambda: sets.entries() == {"10.244.0.3": "uid-1"})
    wait_for(
        "said in the HostRulesReady story",
        lambda: "probe set entries put back: 10.244.0.3" in announcing.journal_host(),
    )


def test_a_re_check_that_finds_the_pod_right_asks_for_no_status(tmp_path: Path) -> None:
    node = make_agent(tmp_path, FakeChanges())
    agent = node.agent
    passes: queue.SimpleQueue[str] = queue.SimpleQueue()
    statuses: list[str] = []
    reconcile, status_soon = agent._reconcile_pod, agent._status_soon

    def reconciled(uid: str) -> None:
        reconcile(uid)
        passes.put(uid)

    def asked() -> None:
        statuses.append("asked")
        status_soon()

    agent._reconcile_pod = reconciled  # type: ignore[method-assign]
    agent._status_soon = asked  # type: ignore[method-assign]
    agent.start()
    try:
        agent.on_object(node_object(1, [0]))
        # Its two steps (the kernel's, then ztunnel, the set and the annotation), both over.
        assert [passes.get(timeout=10), passes.get(timeout=10)] == ["uid-0", "uid-0"]
        assert agent.state("uid-0") == "Enrolled"
        asked_before = len(statuses)
        node.changes.announce("uid-0")  # a change that left the pod right (or our own echo)
        assert [passes.get(timeout=10), passes.get(timeout=10)] == ["uid-0", "uid-0"]
        assert len(statuses) == asked_before
        node.pods.drifted.add("uid-0")  # a change that did not: status tells the repair
        node.changes.announce("uid-0")
        assert [passes.get(timeout=10), passes.get(timeout=10)] == ["uid-0", "uid-0"]
        assert len(statuses) > asked_before
    finally:
        agent.stop()


def test_a_flood_of_changes_on_the_node_costs_one_pass_not_one_each(announcing: Agent) -> None:
    ensured: list[float] = []
    ensure = announcing.host.ensure

    def counting() -> Changes:
        ensured.append(time.monotonic())
        return ensure()

    announcing.host.ensure = counting  # type: ignore[method-assign]
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:  # kube-proxy rewriting its tables for 0.6 s, say
        announcing.changes.announce(HOST)
        time.sleep(0.02)  # the pace of the flood, not a synchronisation
    wait_for("a pass", lambda: len(ensured) >= 1)
    assert not wait_for_nothing(lambda: len(ensured) > 1, 1.5)
    announcing.changes.announce(HOST)  # a change after that pass began is heard anew
    wait_for("a second pass", lambda: len(ensured) == 2)


def wait_for_nothing(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` came true within `seconds` (watched, not slept through)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
