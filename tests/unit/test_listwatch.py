"""ListWatch: lists page by page, hands each object over and keeps none, tells what a list
held, then watches; a 410 relists."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from ambient_cni.reflector import ListWatch, continue_token, name_of


@dataclass
class Response:
    data: bytes = b""
    lines: list[bytes] = field(default_factory=list)

    def stream(self, *_: Any, **__: Any) -> Any:
        yield from (line + b"\n" for line in self.lines)

    def release_conn(self) -> None:
        pass


def obj(name: str, rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": rv}}


class FakeList:
    """Answers lists from `pages` (with continue tokens) and watches from `watches`; when the
    watches run out, it stops the ListWatch."""

    def __init__(self, pages: list[list[dict[str, Any]]], watches: list[list[dict[str, Any]]]):
        self.pages = pages
        self.watches = watches
        self.calls: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def __call__(self, **kwargs: Any) -> Response:
        self.calls.append(kwargs)
        if kwargs.get("watch"):
            if not self.watches:
                self.stop.set()
                return Response()
            events = self.watches.pop(0)
            return Response(lines=[json.dumps(e).encode() for e in events])
        token = kwargs.get("_continue")
        index = int(token) if token else 0
        meta: dict[str, Any] = {"resourceVersion": "10"}
        if index + 1 < len(self.pages):
            meta["continue"] = str(index + 1)
        return Response(data=json.dumps({"metadata": meta, "items": self.pages[index]}).encode())


def run(fake: FakeList) -> tuple[list[tuple[str, str]], list[set[str]]]:
    events: list[tuple[str, str]] = []
    listed: list[set[str]] = []
    watch = ListWatch(
        "test",
        fake,
        lambda kind, o: events.append((kind, name_of(o))),
        lambda keys, version: listed.append(keys),
        key=name_of,
        page_size=2,
    )
    watch.run(fake.stop)
    assert watch.synced.is_set()
    return events, listed


def test_lists_in_pages_then_watches_from_the_lists_version() -> None:
    fake = FakeList(
        pages=[[obj("a"), obj("b")], [obj("c")]],
        watches=[
            [
                {"type": "MODIFIED", "object": obj("a", "11")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
                {"type": "DELETED", "object": obj("b", "13")},
            ]
        ],
    )
    events, listed = run(fake)
    assert events == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert listed == [{"a", "b", "c"}]
    lists = [c for c in fake.calls if not c.get("watch")]
    assert [c.get("limit") for c in lists] == [2, 2]
    assert [c.get("_continue") for c in lists] == [None, "1"]
    watches = [c for c in fake.calls if c.get("watch")]
    assert watches[0]["resource_version"] == "10"
    assert watches[1]["resource_version"] == "13"  # resumes after the last event seen


def test_a_gone_watch_relists_and_says_what_the_new_list_held() -> None:
    fake = FakeList(
        pages=[[obj("a"), obj("b")]],
        watches=[[{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]],
    )
    first = fake.pages[0]

    def shrink(**kwargs: Any) -> Response:
        if fake.calls and not kwargs.get("watch"):
            fake.pages = [[first[0]]]  # b was deleted while no watch ran
        return FakeList.__call__(fake, **kwargs)

    events: list[tuple[str, str]] = []
    listed: list[set[str]] = []
    watch = ListWatch(
        "test",
        shrink,
        lambda kind, o: events.append((kind, name_of(o))),
        lambda keys, version: listed.append(keys),
        key=name_of,
    )
    watch.run(fake.stop)
    assert listed == [{"a", "b"}, {"a"}]
    assert events == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "a")]


def test_each_list_page_has_a_deadline_and_the_list_says_its_version() -> None:
    fake = FakeList(pages=[[obj("a")]], watches=[])
    versions: list[str] = []
    watch = ListWatch("test", fake, lambda kind, o: None, lambda keys, v: versions.append(v))
    watch.run(fake.stop)
    assert versions == ["10"]
    lists = [c for c in fake.calls if not c.get("watch")]
    assert all(c["_request_timeout"] for c in lists)  # a half-open connection cannot hang it


def test_an_object_the_consumer_fails_on_is_skipped_not_the_stream() -> None:
    fake = FakeList(
        pages=[[obj("a"), obj("bad")]],
        watches=[
            [
                {"type": "MODIFIED", "object": obj("bad", "11")},
                {"type": "MODIFIED", "object": obj("a", "12")},
            ]
        ],
    )
    seen: list[tuple[str, str]] = []

    def consume(kind: str, o: dict[str, Any]) -> None:
        if name_of(o) == "bad":
            raise ValueError("cannot read it")
        seen.append((kind, name_of(o)))

    listed: list[set[str]] = []
    watch = ListWatch("test", fake, consume, lambda keys, v: listed.append(keys), key=name_of)
    watch.run(fake.stop)
    assert listed == [{"a", "bad"}]  # the list still ends, and says what it held
    assert seen == [("ADDED", "a"), ("MODIFIED", "a")]
    assert watch.failures == 2
    assert len([c for c in fake.calls if not c.get("watch")]) == 1  # no relist for it


def test_the_next_page_is_asked_for_while_this_one_is_handed_over() -> None:
    fake = FakeList(pages=[[obj("a"), obj("b")], [obj("c")]], watches=[])
    asked_next = threading.Event()
    answer = fake.__call__

    def listing(**kwargs: Any) -> Response:
        if kwargs.get("_continue") == "1":
            asked_next.set()
        return answer(**kwargs)

    overlapped: list[bool] = []

    def on_event(kind: str, o: dict[str, Any]) -> None:
        if name_of(o) == "a":  # still on the first page: the second is on its way
            overlapped.append(asked_next.wait(5))

    watch = ListWatch("test", listing, on_event, lambda keys, version: None, key=name_of)
    watch.run(fake.stop)
    assert overlapped == [True]
    assert [c.get("_continue") for c in fake.calls if not c.get("watch")] == [None, "1"]


def test_a_page_that_fails_ahead_fails_the_list_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeList(pages=[[obj("a")], [obj("b")]], watches=[])
    answer = fake.__call__
    failed = {"once": False}

    def listing(**kwargs: Any) -> Response:
        if kwargs.get("_continue") == "1" and not failed["once"]:
            failed["once"] = True
            raise OSError("connection reset")
        return answer(**kwargs)

    events: list[str] = []
    listed: list[set[str]] = []
    watch = ListWatch(
        "test",
        listing,
        lambda kind, o: events.append(name_of(o)),
        lambda keys, version: listed.append(keys),
        key=name_of,
    )
    watch.run(fake.stop)
    # The first list delivered page one, then failed: not told as a whole list. The relist
    # delivered both pages and was.
    assert events == ["a", "a", "b"]
    assert listed == [{"a", "b"}]
    # The relist says why: the fetch's own error, raised where the page was due.
    assert any("connection reset" in r.getMessage() for r in caplog.records)


def test_a_continue_token_is_read_from_the_pages_first_bytes() -> None:
    page = {"kind": "PodList", "metadata": {"resourceVersion": "5", "continue": "tok"}}
    body = json.dumps({**page, "items": [obj(str(i)) for i in range(1000)]}).encode()
    assert continue_token(body) == "tok"
    last = json.dumps({"metadata": {"resourceVersion": "5"}, "items": []}).encode()
    assert continue_token(last) is None
    # metadata after items, past the prefix: not found there (the page is decoded first)
    late = json.dumps({"items": [obj(str(i)) for i in range(1000)], "metadata": page["metadata"]})
    assert continue_token(late.encode()) is None
    assert continue_token(b"not json") is None
