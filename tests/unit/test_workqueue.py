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
