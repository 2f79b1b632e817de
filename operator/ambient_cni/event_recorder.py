"""Kubernetes Events, aggregated and rate-limited as client-go's EventRecorder does them.

`record` never blocks and never raises. A new Event charges the object's token bucket (a
flood of different Events is dropped, with one log line); a repeat is only counted. A worker
thread posts what waits. An Event identical to one posted on the same object within
`window` (same type, reason and message) is not created again: the existing one's `count`
and `lastTimestamp` go up (a merge patch), so a flapping pod is one Event with a count.
A post that fails is tried again a few times, then dropped with a log line; nothing about
it reaches the caller.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from kubernetes.client import ApiClient, CoreV1Api

from ambient_cni.kube import MERGE_PATCH, Obj, as_body, discard, raw
from ambient_cni.workqueue import WorkQueue

log = logging.getLogger("ambient_cni.events")

EventType = Literal["Normal", "Warning"]

# client-go's EventCorrelator: 25 Events per object at once, then one every 5 minutes.
BURST = 25
REFILL_PER_SECOND = 1 / 300
WINDOW = 600.0  # seconds an identical Event is counted on the existing one
CACHE_SIZE = 4096  # Events remembered for counting (client-go's LRU holds as many)
ATTEMPTS = 3
MAX_MESSAGE = 1024  # bytes of message the API server keeps in an events.k8s.io Event


class EventApi(Protocol):
    """The API server's events, in one namespace at a time."""

    def create(self, namespace: str, event: Obj) -> str:
        """Create the Event; returns its name."""
        ...

    def patch(self, namespace: str, name: str, patch: Obj) -> None:
        """Merge-patch the Event; raises an error with `status` 404 if it is gone."""
        ...


class KubeEventApi:
    def __init__(self, api: ApiClient):
        self.core = CoreV1Api(api)

    def create(self, namespace: str, event: Obj) -> str:
        answer = self.core.create_namespaced_event(
            namespace, as_body(event), _preload_content=False
        )
        return str(raw(answer)["metadata"]["name"])

    def patch(self, namespace: str, name: str, patch: Obj) -> None:
        answer = self.core.patch_namespaced_event(
            name, namespace, as_body(patch), _content_type=MERGE_PATCH, _preload_content=False
        )
        discard(answer)


@dataclass(frozen=True)
class ObjectRef:
    """The object an Event is about (`namespace` empty for a cluster-scoped one)."""

    api_version: str
    kind: str
    name: str
    uid: str
    namespace: str = ""

    def involved(self) -> Obj:
        ref: Obj = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name}
        if self.uid:
            ref["uid"] = self.uid
        if self.namespace:
            ref["namespace"] = self.namespace
        return ref


@dataclass(frozen=True)
class Source:
    """Who reports: `component` (ambient-cni-agent), `instance` (this process's pod), and
    for a node's component its node."""

    component: str
    instance: str
    host: str | None = None


def timestamp(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(
    ref: ObjectRef,
    event_type: EventType,
    reason: str,
    message: str,
    *,
    source: Source,
    namespace: str,
    first: datetime.datetime,
    last: datetime.datetime | None = None,
    count: int = 1,
) -> Obj:
    """A core/v1 Event on `ref`, created in `namespace`, as `kubectl describe` shows it."""
    said: Obj = {"component": source.component}
    if source.host:
        said["host"] = source.host
    return {
        "metadata": {"generateName": f"{ref.name}.", "namespace": namespace},
        "involvedObject": ref.involved(),
        "type": event_type,
        "reason": reason,
        "message": _truncated(message),
        "source": said,
        "reportingComponent": source.component,
        "reportingInstance": source.instance,
        "firstTimestamp": timestamp(first),
        "lastTimestamp": timestamp(last or first),
        "count": count,
    }


def _truncated(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_MESSAGE:
        return message
    return data[: MAX_MESSAGE - 3].decode(errors="ignore") + "..."


@dataclass(frozen=True)
class _Key:
    ref: ObjectRef
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class _Pending:
    """Occurrences recorded and not posted yet."""

    count: int
    first: datetime.datetime
    last: datetime.datetime

    def __add__(self, other: _Pending) -> _Pending:
        return _Pending(
            self.count + other.count, min(self.first, other.first), max(self.last, other.last)
        )


@dataclass(frozen=True)
class _Posted:
    """An Event as the API server holds it, to count the next identical one on."""

    name: str
    count: int
    at: float  # monotonic time of the last post


@dataclass
class _Bucket:
    tokens: float
    at: float
    dropped: int = 0


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class EventRecorder:
    """Posts Events about objects from one worker thread, in `namespace`."""

    def __init__(
        self,
        api: EventApi,
        namespace: str,
        source: Source,
        *,
        window: float = WINDOW,
        burst: int = BURST,
        refill_per_second: float = REFILL_PER_SECOND,
        retry_after: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = _utcnow,
    ):
        self.api = api
        self.namespace = namespace
        self.source = source
        self.window = window
        self.burst = burst
        self.refill = refill_per_second
        self.retry_after = retry_after
        self.clock = clock
        self.wall = wall
        self.queue: WorkQueue[_Key] = WorkQueue()
        self._lock = threading.Condition()
        self._pending: dict[_Key, _Pending] = {}
        self._posted: collections.OrderedDict[_Key, _Posted] = collections.OrderedDict()
        self._buckets: dict[ObjectRef, _Bucket] = {}
        self._attempts: dict[_Key, int] = {}
        self._busy = 0  # keys being posted

    # -- the caller's side ------------------------------------------------------------------

    def record(
        self, ref: ObjectRef, event_type: EventType, reason: str, message: str, count: int = 1
    ) -> None:
        """Note `count` occurrences; posted soon after, unless the object's bucket is empty.
        Only a new Event spends a token: a repeat is a count on one already made (or
        waiting), so a flapping pod never crowds out what else happens to the object."""
        key = _Key(ref, event_type, reason, message)
        now = self.wall()
        with self._lock:
            posted = self._posted.get(key)
            repeat = key in self._pending or (
                posted is not None and self.clock() - posted.at < self.window
            )
            if not repeat and not self._take(ref):
                return
            waiting = self._pending.get(key)
            occurrence = _Pending(max(count, 1), now, now)
            self._pending[key] = occurrence if waiting is None else waiting + occurrence
        self.queue.add(key)

    def _take(self, ref: ObjectRef) -> bool:
        """A token from the object's bucket (caller holds the lock)."""
        now = self.clock()
        bucket = self._buckets.setdefault(ref, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.refill)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            if bucket.dropped:
                log.info("Events on %s %s again (%d dropped)", ref.kind, ref.name, bucket.dropped)
                bucket.dropped = 0
            return True
        if not bucket.dropped:
            log.warning("too many Events on %s %s: dropping them for a while", ref.kind, ref.name)
        bucket.dropped += 1
        return False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.queue.start(self._post, name="events", on_error=self._failed)

    def flush(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until every Event recorded so far was posted or given up."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.05))
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Post what is waiting (for at most `timeout`), then stop the worker."""
        self.flush(timeout)
        self.queue.join(timeout)

    # -- the worker's side -------------------------------------------------------------------

    def _post(self, key: _Key) -> None:
        with self._lock:
            pending = self._pending.pop(key, None)
            if pending is None:
                return
            self._busy += 1
            posted = self._posted.get(key)
        try:
            if posted is not None and self.clock() - posted.at < self.window:
                self._count(key, posted, pending)
            else:
                self._create(key, pending)
        except Exception:
            with self._lock:
                waiting = self._pending.get(key)
                self._pending[key] = pending if waiting is None else pending + waiting
            raise
        finally:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()
        with self._lock:
            self._attempts.pop(key, None)

    def _create(self, key: _Key, pending: _Pending) -> None:
        body = event_body(
            key.ref,
            key.type,
            key.reason,
            key.message,
            source=self.source,
            namespace=self.namespace,
            first=pending.first,
            last=pending.last,
            count=pending.count,
        )
        name = self.api.create(self.namespace, body)
        self._remember(key, _Posted(name, pending.count, self.clock()))

    def _count(self, key: _Key, posted: _Posted, pending: _Pending) -> None:
        count = posted.count + pending.count
        patch = {"count": count, "lastTimestamp": timestamp(pending.last)}
        try:
            self.api.patch(self.namespace, posted.name, patch)
        except Exception as exc:
            if getattr(exc, "status", None) != 404:
                raise
            # Gone (Events expire after an hour by default): a new one, counting afresh.
            with self._lock:
                self._posted.pop(key, None)
            self._create(key, pending)
            return
        self._remember(key, _Posted(posted.name, count, self.clock()))

    def _remember(self, key: _Key, posted: _Posted) -> None:
        with self._lock:
            self._posted[key] = posted
            self._posted.move_to_end(key)
            while len(self._posted) > CACHE_SIZE:
                self._posted.popitem(last=False)

    def _failed(self, key: _Key, exc: Exception) -> None:
        with self._lock:
            attempts = self._attempts.get(key, 0) + 1
            status = getattr(exc, "status", None)
            refused = isinstance(status, int) and 400 <= status < 500 and status not in (409, 429)
            if attempts < ATTEMPTS and not refused:
                self._attempts[key] = attempts
                self.queue.add_after(key, self.retry_after * attempts)
                return
            # Said before the occurrence is let go, so whoever waits on flush() sees it said.
            log.warning(
                "no Event %s on %s %s: %s", key.reason, key.ref.kind, key.ref.name, _said(exc)
            )
            self._attempts.pop(key, None)
            self._pending.pop(key, None)
            self._lock.notify_all()


def _said(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    status = getattr(exc, "status", None)
    return f"{status} {reason}" if status is not None else str(exc) or type(exc).__name__
