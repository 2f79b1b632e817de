"""The Event recorder: identical Events counted on one, floods dropped, failures contained.

The API is a fake of the recorder's own small Protocol; clocks are the test's.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ambient_cni.event_recorder import EventRecorder, ObjectRef, Source
from ambient_cni.kube import Obj

NODE = ObjectRef("cni.ambient.dev/v1alpha1", "AmbientNodeConfig", "node-1", "anc-uid-1")
OTHER = ObjectRef("cni.ambient.dev/v1alpha1", "AmbientNodeConfig", "node-2", "anc-uid-2")
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


class Refused(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.reason = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}[status]


@dataclass
class FakeEventApi:
    """The API server's Events, by namespace and name; `fail` answers the next calls."""

    events: dict[tuple[str, str], Obj] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _maybe_fail(self) -> None:
        if self.fail:
            raise Refused(self.fail.pop(0))

    def create(self, namespace: str, event: Obj) -> str:
        with self.lock:
            self.calls.append("create")
            self._maybe_fail()
            name = f"{event['metadata']['generateName']}{len(self.events)}"
            self.events[namespace, name] = {**event, "metadata": {"name": name}}
            return name

    def patch(self, namespace: str, name: str, patch: Obj) -> None:
        with self.lock:
            self.calls.append("patch")
            self._maybe_fail()
            if (namespace, name) not in self.events:
                raise Refused(404)
            self.events[namespace, name] = {**self.events[namespace, name], **patch}

    def listed(self) -> list[Obj]:
        with self.lock:
            return list(self.events.values())


@dataclass
class Clocks:
    monotonic: float = 1000.0
    wall: datetime.datetime = T0

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += datetime.timedelta(seconds=seconds)


@dataclass
class Recording:
    recorder: EventRecorder
    api: FakeEventApi
    clocks: Clocks

    def record(self, message: str = "pod shop/web: refused", ref: ObjectRef = NODE) -> None:
        self.recorder.record(ref, "Warning", "RuleRejected", message)

    def posted(self) -> list[Obj]:
        assert self.recorder.flush(5.0), "the recorder did not get through what it was given"
        return self.api.listed()


@pytest.fixture
def recording() -> Iterator[Recording]:
    api, clocks = FakeEventApi(), Clocks()
    recorder = EventRecorder(
        api,
        "istio-system",
        Source("ambient-cni-agent", "ambient-cni-node-x7k2p", host="node-1"),
        burst=5,
        refill_per_second=1 / 60,
        retry_after=0.01,
        clock=lambda: clocks.monotonic,
        wall=lambda: clocks.wall,
    )
    recorder.start()
    try:
        yield Recording(recorder, api, clocks)
    finally:
        recorder.stop()


def test_an_event_names_its_object_and_who_reports_it(recording: Recording) -> None:
    recording.record()
    [event] = recording.posted()
    assert event["involvedObject"] == {
        "apiVersion": "cni.ambient.dev/v1alpha1",
        "kind": "AmbientNodeConfig",
        "name": "node-1",
        "uid": "anc-uid-1",
    }  # no namespace: the object is cluster-scoped
    assert event["type"] == "Warning"
    assert event["reason"] == "RuleRejected"
    assert event["message"] == "pod shop/web: refused"
    assert event["source"] == {"component": "ambient-cni-agent", "host": "node-1"}
    assert event["reportingComponent"] == "ambient-cni-agent"
    assert event["reportingInstance"] == "ambient-cni-node-x7k2p"
    assert (event["count"], event["firstTimestamp"], event["lastTimestamp"]) == (
        1,
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z",
    )
    assert next(iter(recording.api.events))[0] == "istio-system"


def test_occurrences_noted_at_once_are_counted_on_one_event(recording: Recording) -> None:
    recording.recorder.record(NODE, "Warning", "DriftRepaired", "pod shop/web: repaired", count=3)
    [event] = recording.posted()
    assert event["count"] == 3
    recording.recorder.record(NODE, "Warning", "DriftRepaired", "pod shop/web: repaired", count=2)
    [event] = recording.posted()
    assert event["count"] == 5
    assert recording.api.calls == ["create", "patch"]


def test_an_identical_event_counts_on_the_first_within_the_window(recording: Recording) -> None:
    recording.record()
    recording.posted()
    for _ in range(3):  # a flapping pod
        recording.clocks.advance(60)
        recording.record()
        recording.posted()
    [event] = recording.posted()
    assert event["count"] == 4
    assert event["firstTimestamp"] == "2026-01-01T00:00:00Z"
    assert event["lastTimestamp"] == "2026-01-01T00:03:00Z"
    assert recording.api.calls == ["create", "patch", "patch", "patch"]

    recording.record("pod shop/web: another message")  # not identical: an Event of its own
    assert len(recording.posted()) == 2


def test_an_identical_event_after_the_window_is_a_new_one(recording: Recording) -> None:
    recording.record()
    recording.posted()
    recording.clocks.advance(601)
    recording.record()
    assert [e["count"] for e in recording.posted()] == [1, 1]


def test_occurrences_waiting_for_the_worker_are_one_post() -> None:
    api, clocks = FakeEventApi(), Clocks()
    recorder = EventRecorder(
        api, "ns", Source("c", "i"), clock=lambda: clocks.monotonic, wall=lambda: clocks.wall
    )
    for _ in range(3):  # before the worker runs: all three wait for it
        recorder.record(NODE, "Warning", "RuleRejected", "same")
        clocks.advance(1)
    recorder.start()
    try:
        assert recorder.flush(5.0)
    finally:
        recorder.stop()
    [event] = api.listed()
    assert (event["count"], event["lastTimestamp"]) == (3, "2026-01-01T00:00:02Z")
    assert api.calls == ["create"]


def test_an_event_deleted_meanwhile_is_created_again(recording: Recording) -> None:
    recording.record()
    recording.posted()
    recording.api.events.clear()  # expired (the API server keeps Events an hour)
    recording.record()
    [event] = recording.posted()
    assert event["count"] == 1
    assert recording.api.calls == ["create", "patch", "create"]


def test_a_flood_is_dropped_per_object_with_one_log_line(
    recording: Recording, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ambient_cni.events"):
        for n in range(12):
            recording.record(f"pod shop/web-{n}: refused")
        recording.record(ref=OTHER)  # another object has a bucket of its own
        posted = recording.posted()
        assert len([e for e in posted if e["involvedObject"]["name"] == "node-1"]) == 5
        assert len([e for e in posted if e["involvedObject"]["name"] == "node-2"]) == 1
        dropping = [r for r in caplog.records if "dropping" in r.getMessage()]
        assert len(dropping) == 1
        assert "node-1" in dropping[0].getMessage()

        recording.clocks.advance(60)  # one token back
        recording.record("pod shop/web-late: refused")
        assert len(recording.posted()) == 7
        assert any("7 dropped" in r.getMessage() for r in caplog.records)


def test_a_flapping_pod_never_crowds_out_other_events(recording: Recording) -> None:
    """Repeats are counted, not charged: after 30 of the same (more than the burst of 5), a
    different Event on the same object is still posted."""
    for _ in range(30):
        recording.record("pod shop/web: netns gone")
        recording.posted()
        recording.clocks.advance(20)
    recording.recorder.record(NODE, "Warning", "ZtunnelDisconnected", "ztunnel disconnected")
    posted = recording.posted()
    assert [(e["reason"], e["count"]) for e in posted] == [
        ("RuleRejected", 30),
        ("ZtunnelDisconnected", 1),
    ]


def test_a_refused_post_is_dropped_and_logged_never_raised(
    recording: Recording, caplog: pytest.LogCaptureFixture
) -> None:
    recording.api.fail = [403]
    recording.record()  # returns: posting happens elsewhere
    assert recording.posted() == []
    assert recording.api.calls == ["create"]  # refused: not tried again
    assert any("no Event RuleRejected" in r.getMessage() for r in caplog.records)


def test_a_failed_post_is_tried_again_then_given_up(recording: Recording) -> None:
    recording.api.fail = [500]
    recording.record()
    [event] = recording.posted()
    assert event["count"] == 1
    assert recording.api.calls == ["create", "create"]

    recording.api.fail = [500, 500, 500]
    recording.record("pod shop/other: refused")
    assert len(recording.posted()) == 1  # three tries, then given up
    assert recording.api.calls[2:] == ["create", "create", "create"]


def test_a_long_message_is_cut_to_what_the_api_server_keeps(recording: Recording) -> None:
    recording.record("é" * 2000)
    [event] = recording.posted()
    message: Any = event["message"]
    assert len(message.encode()) <= 1024
    assert message.endswith("...")
