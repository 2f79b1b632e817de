"""List-and-watch: a local copy of one list kept by a watch (`Reflector`), or a stream of
the list's objects into a consumer's own index (`ListWatch`).

Both list, then watch from the list's resourceVersion, and relist after a 410
or any error, so what they feed always converges on the server's state.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from kubernetes.watch.watch import iter_resp_lines

from .kube import decode

Obj = dict[str, Any]
log = logging.getLogger(__name__)


def _ignore(objects: int, size: int) -> None:
    pass


def uid_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


def name_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])


class _Relisting:
    """Runs `_cycle` (list, then watch until the watch ends) on a thread of its own, again
    and again until `stop`; a failure relists after a backoff (0.2 s doubling to 5 s)."""

    name: str

    def _cycle(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def run(self, stop: threading.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            try:
                self._cycle(stop)
                backoff = 0.2
            except Exception as exc:
                log.warning(
                    "%s: list/watch failed, relisting in %.1fs: %s", self.name, backoff, exc
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=self.name, daemon=True)
        thread.start()
        return thread


class Reflector(_Relisting):
    """A local, eventually consistent copy of one list, with a callback per changed key."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        on_change: Callable[[str], None],
        *,
        key: Callable[[Mapping[str, Any]], str] = uid_of,
        on_received: Callable[[int, int], None] | None = None,
        **list_kwargs: Any,
    ):
        self.name = name
        self._list_fn = list_fn
        self._on_change = on_change
        self._key = key
        # (objects, bytes) per list response or watch event: what the API server sent us.
        self._on_received = on_received or _ignore
        self._kwargs = list_kwargs
        self._lock = threading.Lock()
        self._store: dict[str, Obj] = {}
        self.synced = threading.Event()

    def get(self, key: str) -> Obj | None:
        with self._lock:
            return self._store.get(key)

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._store.values())

    def key_list(self) -> list[str]:
        with self._lock:
            return list(self._store)

    def _cycle(self, stop: threading.Event) -> None:
        version = self._relist()
        self.synced.set()
        self._watch(version, stop)

    def _relist(self) -> str:
        body = self._list_fn(_preload_content=False, **self._kwargs).data
        listing = decode(body)
        self._on_received(len(listing.get("items") or []), len(body))
        fresh = {self._key(obj): obj for obj in listing.get("items") or []}
        with self._lock:
            changed = set(self._store) | set(fresh)
            self._store = fresh
        for key in changed:
            self._on_change(key)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, version: str, stop: threading.Event) -> None:
        watch_from(self._list_fn, version, stop, self._event, self._on_received, **self._kwargs)

    def _event(self, kind: str, obj: Obj) -> None:
        key = self._key(obj)
        with self._lock:
            if kind == "DELETED":
                self._store.pop(key, None)
            else:
                self._store[key] = obj
        self._on_change(key)


def watch_from(
    list_fn: Callable[..., Any],
    version: str,
    stop: threading.Event,
    on_event: Callable[[str, Obj], None],
    on_received: Callable[[int, int], None],
    **list_kwargs: Any,
) -> None:
    """Watch from `version`, calling `on_event(type, object)` for each ADDED, MODIFIED and
    DELETED, until `stop` or a 410 (return: relist) or an error (raise: relist)."""
    while not stop.is_set():
        response = list_fn(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=60,
            _preload_content=False,
            _request_timeout=(5, 90),
            **list_kwargs,
        )
        try:
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if not line:
                    continue
                event = decode(line)
                on_received(1, len(line))
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return  # history compacted: relist
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                on_event(kind, obj)
                if stop.is_set():
                    return
        finally:
            response.release_conn()


# (connect, read) seconds for one page of a list: a connection gone half-open must end in
# a relist, not hang the resource's thread for good.
LIST_TIMEOUT = (5, 60)


class ListWatch(_Relisting):
    """One resource listed page by page, then watched; each object is handed to `on_event`
    ("ADDED", "MODIFIED" or "DELETED", and "ADDED" for every object of a list) and none is
    kept here: for a consumer that keeps its own reduced index, so memory holds one page of
    full objects at a time, not the whole list. After each list, `on_listed` gets the keys
    the list held and its resourceVersion, so the consumer forgets what was deleted while no
    watch ran (and only that: what it learned later than the list is not in it).

    A consumer that fails on one object is logged and counted (`failures`), and the stream
    goes on: one bad object must not stop a whole resource. `last_contact` is when the API
    server last answered (a page, a watch event, a watch that ended on time), for liveness."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        on_event: Callable[[str, Obj], None],
        on_listed: Callable[[set[str], str], None],
        *,
        key: Callable[[Mapping[str, Any]], str] = uid_of,
        page_size: int = 500,
        on_received: Callable[[int, int], None] | None = None,
        **list_kwargs: Any,
    ):
        self.name = name
        self._list_fn = list_fn
        self._on_event = on_event
        self._on_listed = on_listed
        self._key = key
        self._page_size = page_size
        self._on_received = on_received or _ignore
        self._kwargs = list_kwargs
        self.synced = threading.Event()  # set once the first list is handed over
        self.failures = 0  # objects the consumer failed on
        self.last_contact = time.monotonic()

    def _cycle(self, stop: threading.Event) -> None:
        version = self._list()
        self.synced.set()
        watch_from(self._list_fn, version, stop, self._deliver, self._received, **self._kwargs)
        self.last_contact = time.monotonic()  # the watch ended as asked: a relist

    def _received(self, objects: int, size: int) -> None:
        self.last_contact = time.monotonic()
        self._on_received(objects, size)

    def _deliver(self, kind: str, obj: Obj) -> None:
        try:
            self._on_event(kind, obj)
        except Exception:
            self.failures += 1
            meta = obj.get("metadata") or {}
            log.exception(
                "%s: handling %s %s/%s failed; going on with the others",
                self.name,
                kind,
                meta.get("namespace", ""),
                meta.get("name", ""),
            )

    def _list(self) -> str:
        keys: set[str] = set()
        pages = _Pages(self._page)
        try:
            for body in pages:
                page = decode(body)
                items = page.get("items") or []
                self._received(len(items), len(body))
                for obj in items:
                    keys.add(self._key(obj))
                    self._deliver("ADDED", obj)
                meta = page.get("metadata") or {}
                if not meta.get("continue"):
                    version = str(meta["resourceVersion"])
                    self._on_listed(keys, version)
                    return version
        finally:
            pages.close()
        raise RuntimeError(f"{self.name}: the list ended without a last page")

    def _page(self, token: str | None) -> bytes:
        extra = {"_continue": token} if token else {}
        body: bytes = self._list_fn(
            _preload_content=False,
            _request_timeout=LIST_TIMEOUT,
            limit=self._page_size,
            **extra,
            **self._kwargs,
        ).data
        return body


class _Pages:
    """A list's pages in order, the next one asked for while the consumer reads this one: the
    API server encodes page n+1 while this process decodes page n, instead of one waiting
    on the other (a large list is most of a restart). One page ahead at most, so memory holds
    two pages of full objects. The next page's continue token is read from the page's
    `metadata`, which the API server writes before its `items`; where it cannot be found
    there, the next page is asked for once this one is decoded (no overlap, same result)."""

    def __init__(self, fetch: Callable[[str | None], bytes]):
        self._fetch = fetch
        self._ahead: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=1)
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        body = self._fetch(None)
        while True:
            token = continue_token(body)
            if token is None:
                yield body  # the last page (or one whose token is past the prefix)
                token = _continue_of(decode(body))
                if token is None:
                    return
                body = self._fetch(token)
                continue
            self._start(token)
            yield body
            ahead = self._ahead.get()
            if isinstance(ahead, BaseException):
                raise ahead
            body = ahead

    def _start(self, token: str) -> None:
        def fetch() -> None:
            try:
                result: bytes | BaseException = self._fetch(token)
            except BaseException as exc:  # handed to the consumer, who raises it
                result = exc
            while not self._closed.is_set():
                try:
                    self._ahead.put(result, timeout=0.5)
                    return
                except queue.Full:
                    continue

        threading.Thread(target=fetch, name="list-page", daemon=True).start()

    def close(self) -> None:
        """The consumer stops early (a failure): a page fetched ahead is dropped."""
        self._closed.set()


# The page's metadata is in its first bytes: `{"kind":..,"apiVersion":..,"metadata":{..},
# "items":[..]}`; a continue token is a few hundred bytes.
_PREFIX = 8192
_METADATA = re.compile(rb'"metadata"\s*:\s*')


def continue_token(body: bytes) -> str | None:
    """The continue token in a list page's metadata, read from the page's first bytes
    without decoding the page; None when there is none or it is not found there."""
    head = body[:_PREFIX]
    found = _METADATA.search(head)
    if found is None:
        return None
    try:
        meta, _ = json.JSONDecoder().raw_decode(head[found.end() :].decode())
    except ValueError:  # cut short by the prefix, or not JSON
        return None
    return _continue_of({"metadata": meta}) if isinstance(meta, dict) else None


def _continue_of(page: Mapping[str, Any]) -> str | None:
    meta = page.get("metadata")
    token = meta.get("continue") if isinstance(meta, Mapping) else None
    return str(token) if token else None
