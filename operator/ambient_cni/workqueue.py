"""A keyed work queue for level-based reconcilers running on worker threads.

A key added many times before a worker takes it is processed once; a key is
never processed by two workers at once; a key added while being processed is
processed again afterwards. `add_after` schedules a retry.

`start` runs the one worker loop every reconciler here shares: take a key,
handle it, and on an unexpected exception log it and retry the key later.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
log = logging.getLogger("ambient_cni.workqueue")

# Called with the key and the exception a handler raised; the default logs it and
# retries the key after `retry_after` seconds.
ErrorHandler = Callable[[K, Exception], None]


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[K] = []
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        self._seq = 0
        self._closed = False
        self._workers: list[threading.Thread] = []

    def start(
        self,
        handle: Callable[[K], None],
        *,
        workers: int = 1,
        name: str = "worker",
        retry_after: float = 1.0,
        on_error: ErrorHandler[K] | None = None,
    ) -> None:
        """Run `workers` threads that handle keys until the queue is closed."""

        def failed(key: K, exc: Exception) -> None:
            log.error("%s: handling %r failed; retrying", name, key, exc_info=exc)
            self.add_after(key, retry_after)

        def loop() -> None:
            while (key := self.get()) is not None:
                try:
                    handle(key)
                except Exception as exc:
                    (on_error or failed)(key, exc)
                finally:
                    self.done(key)

        for number in range(workers):
            thread = threading.Thread(target=loop, name=f"{name}-{number}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def join(self, timeout: float = 10.0) -> None:
        """Close the queue and wait (up to `timeout` each) for the started workers to finish."""
        self.close()
        for thread in self._workers:
            thread.join(timeout)

    def add(self, key: K) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._delayed, (time.monotonic() + delay, self._seq, key))
            self._cond.notify()

    def get(self) -> K | None:
        """The next key to process, or None once the queue is closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._add_locked(heapq.heappop(self._delayed)[2])
                if self._queue:
                    key = self._queue.pop(0)
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._cond.wait(timeout)

    def done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._delayed)
