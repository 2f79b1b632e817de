from __future__ import annotations

import threading
import time

from ambient_cni.workqueue import WorkQueue


def test_duplicate_adds_collapse() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ["a", "b", "a", "a"]:
        queue.add(key)
    assert len(queue) == 2
    assert queue.get() == "a"
    assert queue.get() == "b"


def test_key_added_while_processing_is_processed_again_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert queue.get() == "a"
    queue.add("a")  # while "a" is being processed
    assert len(queue) == 0  # not handed to a second worker
    queue.done("a")
    assert queue.get() == "a"


def test_add_after_becomes_ready_after_the_delay() -> None:
    queue: WorkQueue[str] = WorkQueue()
    start = time.monotonic()
    queue.add_after("late", 0.05)
    queue.add("now")
    assert queue.get() == "now"
    assert queue.get() == "late"
    assert time.monotonic() - start >= 0.05


def test_close_wakes_blocked_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    results: list[str | None] = []
    worker = threading.Thread(target=lambda: results.append(queue.get()))
    worker.start()
    queue.close()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert results == [None]


def test_started_workers_handle_every_key_and_retry_a_failure() -> None:
    queue: WorkQueue[str] = WorkQueue()
    handled: list[str] = []
    failed_once: set[str] = set()
    all_done = threading.Event()

    def handle(key: str) -> None:
        if key == "flaky" and key not in failed_once:
            failed_once.add(key)
            raise RuntimeError("first try fails")
        handled.append(key)
        if {"a", "b", "flaky"} <= set(handled):
            all_done.set()

    queue.start(handle, workers=2, name="test", retry_after=0.01)
    for key in ("a", "b", "flaky"):
        queue.add(key)
    assert all_done.wait(5)
    queue.join()
    assert sorted(handled) == ["a", "b", "flaky"]
    assert failed_once == {"flaky"}


def test_a_custom_error_handler_sees_the_key_and_the_exception() -> None:
    queue: WorkQueue[str] = WorkQueue()
    seen: list[tuple[str, str]] = []
    reported = threading.Event()

    def on_error(key: str, exc: Exception) -> None:
        seen.append((key, str(exc)))
        reported.set()

    def handle(key: str) -> None:
        raise ValueError(f"bad {key}")

    queue.start(handle, on_error=on_error)
    queue.add("k")
    assert reported.wait(5)
    queue.join()
    assert seen == [("k", "bad k")]
