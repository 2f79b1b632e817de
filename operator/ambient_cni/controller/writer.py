"""Writes each node's AmbientNodeConfig spec when, and only when, it changes.

Events mark nodes stale; a node is re-planned after a short debounce, so a
burst of events becomes one reconcile. A keyed work queue keeps at most one
write in flight per node, and writes to one node are spaced by at least
`min_interval`, so a long burst costs a handful of patches, not one per pod.
`max_in_flight` workers write concurrently, so the API server, not one
connection, sets the pace of a burst.
What the API server holds is tracked from our own writes and from the
AmbientNodeConfig watch, so a restart or a no-op event costs no write; a watch
event carrying a spec generation already known (the echo of our own write, or
the agent's status) costs a dictionary lookup, not a plan.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ambient_cni.api import names
from ambient_cni.controller import metrics
from ambient_cni.controller.index import ClusterIndex
from ambient_cni.controller.planner import PlannerConfig, plan_node
from ambient_cni.kube import MERGE_PATCH, Obj, as_body, discard, raw
from ambient_cni.mergepatch import merge_patch
from ambient_cni.workqueue import WorkQueue

log = logging.getLogger("ambient_cni.controller.writer")
MAX_RETRY_SECONDS = 30.0


def _rv(obj: Obj) -> int:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return 0


def _version(obj: Obj) -> tuple[str, int]:
    """Which spec an object holds: its uid and generation (a status write bumps neither)."""
    meta = obj.get("metadata") or {}
    try:
        generation = int(meta.get("generation") or 0)
    except (TypeError, ValueError):
        generation = 0
    return str(meta.get("uid") or ""), generation


class Observed(NamedTuple):
    """An AmbientNodeConfig as the API server last told us: its spec, resourceVersion and
    which spec that is (uid, generation)."""

    spec: dict[str, Any] | None
    rv: int
    version: tuple[str, int] = ("", 0)


NOTHING = Observed(None, 0)
# (connect, read) seconds for one request: a write that hangs fails and is retried.
REQUEST_TIMEOUT = (5, 30)


class SpecWriter:
    def __init__(
        self,
        api: ApiClient,
        index: ClusterIndex,
        config: PlannerConfig,
        *,
        debounce: float = 0.1,
        max_debounce: float = 1.0,
        min_interval: float = 1.0,
        max_in_flight: int = 8,
        orphan_grace: float = 60.0,
    ):
        self.custom = CustomObjectsApi(api)
        self.index = index
        self.config = config
        self.debounce = debounce
        # A node whose events keep coming (a burst of namespace labels) waits until they
        # pause for `debounce`, but never longer than this after the first: one write, not
        # one per event, and a bounded delay.
        self.max_debounce = max_debounce
        self.min_interval = min_interval
        self.max_in_flight = max_in_flight  # one worker per write in flight
        self.orphan_grace = orphan_grace
        self._orphans: dict[str, float] = {}  # node -> when its object was found without a Node
        self._marked: set[str] = set()  # orphans whose label and condition are written
        self.queue: WorkQueue[str] = WorkQueue()
        self._lock = threading.Lock()
        self._observed: dict[str, Observed] = {}  # node -> what the server holds
        self._stale_since: dict[str, float] = {}
        self._last_mark: dict[str, float] = {}  # node -> when an event last marked it
        self._last_write: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._in_flight = 0

    # -- inputs ----------------------------------------------------------------------

    def mark(self, nodes: Iterable[str]) -> None:
        """These nodes' specs may have changed: re-plan them soon."""
        now = time.monotonic()
        fresh = []
        coalesced = 0
        with self._lock:  # once per call: a namespace change marks every node it has pods on
            for node in nodes:
                self._last_mark[node] = now
                if node in self._stale_since:
                    coalesced += 1
                    continue
                self._stale_since[node] = now
                fresh.append(node)
        if coalesced:
            metrics.COALESCED_EVENTS.inc(coalesced)
        for node in fresh:
            self.queue.add_after(node, self.debounce)

    def observe(self, obj: Obj, *, deleted: bool = False) -> None:
        """An AmbientNodeConfig as the API server has it (from a list or a watch event)."""
        node = str(obj["metadata"]["name"])
        rv = _rv(obj)
        version = _version(obj)
        with self._lock:
            known = self._observed.get(node)
            if known is not None and rv and rv < known.rv:
                return  # older than what our own write returned
            if (
                not deleted
                and known is not None
                and known.spec is not None
                and version[1]
                and known.version == version
            ):
                # The spec we know (our own write coming back, or a status change).
                self._observed[node] = known._replace(rv=rv)
                metrics.ECHOES.inc()
                return
            self._observed[node] = NOTHING if deleted else Observed(obj.get("spec"), rv, version)
        self.mark([node])

    def unlisted(self, listed: set[str], list_version: str) -> list[str]:
        """The nodes whose object we know of, learned no later than a list taken at
        `list_version`, that the list did not hold: deleted while no watch ran. (One created
        by our own write after the list's snapshot is newer than it, and not in it.)"""
        version = _rv({"metadata": {"resourceVersion": list_version}})
        with self._lock:
            return [
                node
                for node, seen in self._observed.items()
                if seen.spec is not None and node not in listed and seen.rv <= version
            ]

    def in_flight(self) -> int:
        return self._in_flight

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.queue.start(
            self.reconcile,
            workers=self.max_in_flight,
            name="spec-writer",
            on_error=self._unexpected,
        )

    def stop(self) -> None:
        self.queue.join()

    def _unexpected(self, node: str, exc: Exception) -> None:
        log.error("reconciling node %s", node, exc_info=exc)
        self._retry(node, "Unexpected")

    # -- the reconcile -----------------------------------------------------------------

    def reconcile(self, node: str) -> None:
        with self._lock:
            now = time.monotonic()
            first = self._stale_since.get(node)
            quiet = now - self._last_mark.get(node, float("-inf"))
            hold = 0.0
            if first is not None and quiet < self.debounce and now - first < self.max_debounce:
                hold = min(self.debounce - quiet, first + self.max_debounce - now)
            else:
                self._stale_since.pop(node, None)
                self._last_mark.pop(node, None)
            since = first
            observed = self._observed.get(node, NOTHING).spec
            wait = self._last_write.get(node, float("-inf")) + self.min_interval - now
        if hold > 0:
            self.queue.add_after(node, hold)  # its events still coming: let them gather
            return
        node_uid = self.index.node_uid(node)
        if node_uid is None:
            if observed is not None:
                self._orphaned(node)
            return  # no object, no Node: nothing to do (garbage collection removed it)
        if node in self._orphans:
            self._adopted(node)
        desired = plan_node(
            node, self.index.pods_on(node), self.index.namespace_labels(), self.config
        ).to_wire()
        if observed == desired:
            _observe_latency(since)
            return
        if wait > 0:
            self._requeue(node, since, wait)
            return
        try:
            with self._writing():
                if observed is None:
                    result = self._create(node, node_uid, desired)
                else:
                    result = self._patch(node, merge_patch(observed, desired))
        except ApiException as exc:
            self._handle_error(node, since, exc)
            return
        except (HTTPError, OSError) as exc:  # no answer in time, or no connection
            log.warning("writing %s %s failed (Unreachable): %s", names.KIND, node, exc)
            self._retry(node, "Unreachable", since)
            return
        with self._lock:
            self._remember(node, result)
            self._last_write[node] = time.monotonic()
            self._failures.pop(node, None)
        _observe_latency(since)

    def _remember(self, node: str, answer: Obj) -> None:
        """What our own write or read returned, unless the watch already told of a later
        change (an edit by hand between our write and its answer): that one stands, and was
        marked for a plan when it came. Called with the lock held."""
        known = self._observed.get(node)
        if known is None or _rv(answer) >= known.rv:
            self._observed[node] = Observed(answer.get("spec"), _rv(answer), _version(answer))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        metrics.WRITES_IN_FLIGHT.inc()
        try:
            yield
        finally:
            metrics.WRITES_IN_FLIGHT.dec()
            with self._lock:
                self._in_flight -= 1

    # -- objects without a Node ---------------------------------------------------------

    def _orphaned(self, node: str) -> None:
        """Say so in its status and a label, then delete it once the grace period is over (its
        Node may yet register: a node joining, a kubelet re-registering)."""
        now = time.monotonic()
        with self._lock:
            found = self._orphans.setdefault(node, now)
            marked = node in self._marked
        left = found + self.orphan_grace - now
        if left <= 0:
            self._delete_orphan(node)
            return
        if not marked:
            self._mark_orphan(node, left)
            with self._lock:
                self._marked.add(node)
        self.queue.add_after(node, left)

    def _mark_orphan(self, node: str, left: float) -> None:
        message = (
            f"Node {node} does not exist: this object is deleted in {left:.0f} s "
            "unless the Node appears"
        )
        condition = {
            "type": "Ready",
            "status": "False",
            "reason": "NodeNotFound",
            "message": message,
            "lastTransitionTime": _utc_now(),
        }
        answer = self.custom.patch_cluster_custom_object(
            names.GROUP,
            names.VERSION,
            names.PLURAL,
            node,
            as_body({"metadata": {"labels": {names.ORPHANED_LABEL: "true"}}}),
            _content_type=MERGE_PATCH,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        discard(answer)
        answer = self.custom.patch_cluster_custom_object_status(
            names.GROUP,
            names.VERSION,
            names.PLURAL,
            node,
            as_body({"status": {"conditions": [condition]}}),
            _content_type=MERGE_PATCH,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        discard(answer)
        metrics.ORPHANS.labels("marked").inc()
        log.warning("%s %s: %s", names.KIND, node, message)

    def _delete_orphan(self, node: str) -> None:
        try:
            answer = self.custom.delete_cluster_custom_object(
                names.GROUP,
                names.VERSION,
                names.PLURAL,
                node,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            discard(answer)
        except ApiException as exc:
            if exc.status != 404:
                raise
        with self._lock:
            self._orphans.pop(node, None)
            self._marked.discard(node)
            self._observed[node] = NOTHING
        metrics.ORPHANS.labels("deleted").inc()
        log.warning("deleted %s %s: its Node does not exist", names.KIND, node)

    def _adopted(self, node: str) -> None:
        """Its Node appeared within the grace period: the object is an ordinary one again."""
        answer = self.custom.patch_cluster_custom_object(
            names.GROUP,
            names.VERSION,
            names.PLURAL,
            node,
            as_body({"metadata": {"labels": {names.ORPHANED_LABEL: None}}}),
            _content_type=MERGE_PATCH,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        discard(answer)
        with self._lock:
            self._orphans.pop(node, None)
            self._marked.discard(node)
        metrics.ORPHANS.labels("adopted").inc()
        log.info("%s %s: its Node appeared", names.KIND, node)

    def _create(self, node: str, node_uid: str, spec: dict[str, Any]) -> Obj:
        body = {
            "apiVersion": names.API_VERSION,
            "kind": names.KIND,
            "metadata": {
                "name": node,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}
                ],
            },
            "spec": spec,
        }
        with metrics.API_SECONDS.labels("create").time():
            result = raw(
                self.custom.create_cluster_custom_object(
                    names.GROUP,
                    names.VERSION,
                    names.PLURAL,
                    as_body(body),
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        metrics.SPEC_WRITES.labels("create").inc()
        log.info("created %s %s with %d workloads", names.KIND, node, len(spec["workloads"]))
        return result

    def _patch(self, node: str, spec_patch: dict[str, Any]) -> Obj:
        with metrics.API_SECONDS.labels("patch").time():
            result = raw(
                self.custom.patch_cluster_custom_object(
                    names.GROUP,
                    names.VERSION,
                    names.PLURAL,
                    node,
                    as_body({"spec": spec_patch}),
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        metrics.SPEC_WRITES.labels("patch").inc()
        log.info(
            "patched %s %s: %s (%d workloads)",
            names.KIND,
            node,
            ", ".join(sorted(spec_patch)),
            len(result["spec"].get("workloads") or []),
        )
        return result

    def _handle_error(self, node: str, since: float | None, exc: ApiException) -> None:
        if exc.status == 409:  # created behind our back: learn it, then patch
            self._refresh(node)
            self._requeue(node, since, 0)
            return
        if exc.status == 404:  # deleted behind our back: create it again
            with self._lock:
                self._observed[node] = NOTHING
            self._requeue(node, since, 0)
            return
        reason = f"HTTP{exc.status}" if exc.status else "Unreachable"
        log.warning("writing %s %s failed (%s): %s", names.KIND, node, reason, exc.reason)
        self._retry(node, reason, since)

    def _refresh(self, node: str) -> None:
        try:
            obj = raw(
                self.custom.get_cluster_custom_object(
                    names.GROUP,
                    names.VERSION,
                    names.PLURAL,
                    node,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            with self._lock:
                self._observed[node] = NOTHING
            return
        with self._lock:
            self._remember(node, obj)

    def _retry(self, node: str, reason: str, since: float | None = None) -> None:
        metrics.WRITE_ERRORS.labels(reason).inc()
        with self._lock:
            failures = self._failures.get(node, 0) + 1
            self._failures[node] = failures
        self._requeue(node, since, min(0.1 * 2**failures, MAX_RETRY_SECONDS))

    def _requeue(self, node: str, since: float | None, delay: float) -> None:
        with self._lock:
            self._stale_since.setdefault(node, since if since is not None else time.monotonic())
        self.queue.add_after(node, delay)


def _utc_now() -> str:
    return (
        datetime.datetime.now(datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


def _observe_latency(since: float | None) -> None:
    if since is not None:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - since)
