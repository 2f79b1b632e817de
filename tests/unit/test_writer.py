"""The spec writer: a bounded number of writes in flight, never two for one node, and the echo
of its own write costing no plan."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ambient_cni.controller.index import ClusterIndex
from ambient_cni.controller.planner import PlannerConfig
from ambient_cni.controller.writer import SpecWriter
from ambient_cni.selection import PodView

WAIT = 10.0  # seconds a condition that must come true may take (it is waited for, not slept)
QUIET = 0.5  # seconds watched for something that must not happen


@dataclass
class Answer:
    data: bytes


class FakeApi:
    """Answers creates and patches like the API server; each call waits for `gate` (open by
    default) and is counted while in flight, in total and per node."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.per_node: dict[str, int] = {}
        self.most_per_node = 0
        self.calls: list[tuple[str, str]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.rv = 10

    def _call(self, op: str, node: str, spec: dict[str, Any]) -> Answer:
        with self.cond:
            self.in_flight += 1
            self.per_node[node] = self.per_node.get(node, 0) + 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.most_per_node = max(self.most_per_node, self.per_node[node])
            self.calls.append((op, node))
            self.cond.notify_all()
        self.gate.wait(WAIT)
        with self.cond:
            self.rv += 1
            obj = self.objects.setdefault(
                node, {"metadata": {"name": node, "uid": f"uid-{node}", "generation": 0}}
            )
            obj["spec"] = {**obj.get("spec", {}), **spec}
            obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.in_flight -= 1
            self.per_node[node] -= 1
            self.cond.notify_all()
            return Answer(json.dumps(obj).encode())

    def create_cluster_custom_object(self, *_: Any, **kwargs: Any) -> Answer:
        body = _[3]
        return self._call("create", body["metadata"]["name"], body["spec"])

    def patch_cluster_custom_object(self, *args: Any, **kwargs: Any) -> Answer:
        return self._call("patch", args[3], args[4]["spec"])

    def wait_for(self, predicate: Any, timeout: float = WAIT) -> bool:
        with self.cond:
            return bool(self.cond.wait_for(predicate, timeout))


def view(uid: str, node: str, ip: str = "10.0.0.1") -> PodView:
    return PodView(uid=uid, name=uid, namespace="shop", node_name=node, phase="Running", ips=(ip,))


def cluster(nodes: int) -> ClusterIndex:
    index = ClusterIndex()
    index.set_namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    for n in range(nodes):
        index.set_node(f"n{n}", f"node-uid-{n}")
        index.set_pod(view(f"p{n}", f"n{n}"))
    return index


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    yield fake
    fake.gate.set()  # never leave a worker blocked


def new_writer(
    api: FakeApi,
    index: ClusterIndex,
    max_in_flight: int = 8,
    *,
    debounce: float = 0.0,
    max_debounce: float = 1.0,
) -> SpecWriter:
    writer = SpecWriter(
        None,  # type: ignore[arg-type]  # replaced by the fake below
        index,
        PlannerConfig(),
        debounce=debounce,
        max_debounce=max_debounce,
        min_interval=0.0,
        max_in_flight=max_in_flight,
    )
    writer.custom = api  # type: ignore[assignment]
    return writer


def test_writes_run_concurrently_up_to_the_bound_and_no_further(api: FakeApi) -> None:
    index = cluster(10)
    writer = new_writer(api, index, max_in_flight=3)
    api.gate.clear()
    writer.start()
    try:
        writer.mark(index.nodes())
        assert api.wait_for(lambda: api.in_flight == 3), "three writes should be in flight"
        assert not api.wait_for(lambda: api.in_flight > 3, timeout=QUIET)
        assert writer.in_flight() == 3
        api.gate.set()
        assert api.wait_for(lambda: len(api.calls) == 10 and api.in_flight == 0)
    finally:
        writer.stop()
    assert api.most_in_flight == 3
    assert sorted(node for _, node in api.calls) == sorted(index.nodes())  # each once


def test_one_write_in_flight_per_node_and_the_newer_spec_follows(api: FakeApi) -> None:
    index = cluster(1)
    writer = new_writer(api, index, max_in_flight=4)
    api.gate.clear()
    writer.start()
    try:
        writer.mark(["n0"])
        assert api.wait_for(lambda: api.in_flight == 1)
        index.set_pod(view("p1", "n0", ip="10.0.0.2"))  # changes while the create is in flight
        writer.mark(["n0"])
        assert not api.wait_for(lambda: api.in_flight > 1, timeout=QUIET)
        api.gate.set()
        assert api.wait_for(lambda: len(api.calls) == 2 and api.in_flight == 0)
    finally:
        writer.stop()
    assert api.calls == [("create", "n0"), ("patch", "n0")]
    assert api.most_per_node == 1
    assert len(api.objects["n0"]["spec"]["workloads"]) == 2


def test_the_echo_of_its_own_write_costs_no_plan(api: FakeApi) -> None:
    index = cluster(1)
    writer = new_writer(api, index, max_in_flight=1)
    writer.reconcile("n0")  # creates the object, synchronously
    ours = json.loads(json.dumps(api.objects["n0"]))
    writer.observe(ours)  # the watch brings our own write back
    status = json.loads(json.dumps(ours))
    status["metadata"]["resourceVersion"] = "100"  # the agent wrote status: no new generation
    status["status"] = {"observedGeneration": 1}
    writer.observe(status)
    assert len(writer.queue) == 0  # nothing queued: no plan, no write

    changed = json.loads(json.dumps(status))  # someone edited the spec: a new generation
    changed["metadata"].update(resourceVersion="101", generation=2)
    changed["spec"]["workloads"] = []
    writer.observe(changed)
    assert len(writer.queue) == 1

    fresh = new_writer(api, index, max_in_flight=1)
    fresh.reconcile("n0")
    recreated = json.loads(json.dumps(api.objects["n0"]))  # deleted and made again by hand:
    recreated["metadata"].update(uid="other", resourceVersion="200")  # same generation, new uid
    fresh.observe(recreated)
    assert len(fresh.queue) == 1


def test_an_older_event_than_our_write_is_ignored(api: FakeApi) -> None:
    index = cluster(1)
    writer = new_writer(api, index, max_in_flight=1)
    writer.reconcile("n0")
    stale = json.loads(json.dumps(api.objects["n0"]))
    stale["metadata"]["generation"] = 0
    stale["metadata"]["resourceVersion"] = str(
        int(api.objects["n0"]["metadata"]["resourceVersion"]) - 1
    )
    writer.observe(stale)
    assert len(writer.queue) == 0


def test_an_edit_told_while_its_own_write_was_answered_is_not_overwritten(api: FakeApi) -> None:
    index = cluster(1)
    writer = new_writer(api, index, max_in_flight=2)
    api.gate.clear()
    writer.start()
    try:
        writer.mark(["n0"])
        assert api.wait_for(lambda: api.in_flight == 1)  # the create, not yet answered
        # Meanwhile the watch tells of a later change by hand (newer resourceVersion).
        edited = {
            "metadata": {"name": "n0", "uid": "uid-n0", "generation": 7, "resourceVersion": "500"},
            "spec": {"nodeName": "n0", "dnsCapture": False, "workloads": []},
        }
        writer.observe(edited)
        api.gate.set()
        # The answer (older) must not hide the edit: the writer puts its own spec back.
        assert api.wait_for(lambda: api.calls == [("create", "n0"), ("patch", "n0")])
    finally:
        writer.stop()


def test_a_node_whose_events_keep_coming_is_written_once_they_pause(api: FakeApi) -> None:
    index = cluster(1)
    writer = new_writer(api, index, debounce=0.1, max_debounce=5.0)
    writer.start()
    try:
        until = time.monotonic() + 0.8
        n = 1
        while time.monotonic() < until:  # a burst of labels, one every 30 ms, for 0.8 s
            index.set_pod(view(f"q{n}", "n0", ip=f"10.0.1.{n}"))
            writer.mark(["n0"])
            n += 1
            time.sleep(0.03)  # the burst's pace, not a synchronisation
        assert api.wait_for(lambda: len(api.calls) == 1)
        assert not api.wait_for(lambda: len(api.calls) > 1, timeout=QUIET)
        assert len(api.objects["n0"]["spec"]["workloads"]) == n  # every pod of the burst
    finally:
        writer.stop()


def test_a_burst_that_never_pauses_is_written_after_max_debounce(api: FakeApi) -> None:
    index = cluster(1)
    writer = new_writer(api, index, debounce=0.1, max_debounce=0.3)
    writer.start()
    try:
        until = time.monotonic() + 1.0
        while time.monotonic() < until and not api.calls:
            writer.mark(["n0"])
            time.sleep(0.03)
        assert api.calls, "written within the burst, max_debounce after its first event"
    finally:
        writer.stop()
