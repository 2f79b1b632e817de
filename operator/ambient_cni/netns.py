"""Run code inside a network namespace, on a dedicated thread.

setns(2) changes the namespace of the calling thread only, so entering a
namespace on a shared thread (the asyncio loop, a pool worker) would leak
that namespace into unrelated work. `run_in_netns` gives a call a fresh OS
thread that enters the namespace, runs one function and exits; `NetnsWorkers`
keeps a few threads that enter, run and come back, for calls that are many
and short. Sockets created inside stay bound to the namespace afterwards.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """The namespace is missing or cannot be entered."""


def netns_path(name_or_path: str | Path) -> Path:
    """A named namespace (as `ip netns add` makes them) or an explicit path."""
    text = str(name_or_path)
    return Path(text) if "/" in text else NETNS_RUN_DIR / text


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


def run_in_netns(target: str | Path | int, fn: Callable[[], T]) -> T:
    """Call `fn` on a new thread that has entered the namespace `target`.

    `target` is a namespace name, a path to a namespace file, or an open fd.
    Exceptions raised by `fn` (or by entering the namespace) are re-raised here.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            if isinstance(target, int):
                _setns(target)
            else:
                path = netns_path(target)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError as exc:
                    raise NetnsError(exc.errno, f"network namespace {path} does not exist") from exc
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns:{target}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def new_netns_fd() -> int:
    """An fd to a brand-new, empty network namespace, made on a thread that then exits.

    The namespace has no name and no other user: it disappears when the fd is
    closed (or the process ends), so nothing can be left behind. While open,
    `/proc/self/fd/<fd>` is a path to it that `run_in_netns` accepts.
    """
    result: list[int] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            result.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="netns:new", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def netns_inode(target: str | Path) -> int:
    """The inode that identifies a namespace; equal inodes mean the same namespace."""
    return os.stat(netns_path(target)).st_ino


def netns_inode_or_none(target: str | Path) -> int:
    """netns_inode, or -1 for a namespace that is not there (a hint, never an error)."""
    try:
        return netns_inode(target)
    except OSError:
        return -1


def process_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def list_named_netns(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def pids_in_netns(target: str | Path) -> list[int]:
    """Processes whose network namespace is `target`, found by inode in /proc."""
    try:
        inode = netns_inode(target)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_netns_inode(int(entry)) == inode:
            pids.append(int(entry))
    return pids


class NetnsWorkers:
    """A small pool of threads that enter a namespace, run one function and come back.

    Cheaper than a thread per call when calls are many and short (an in-process
    ruleset apply is ~1 ms): each worker keeps an fd on the namespace it started
    in (/proc/thread-self/ns/net: the thread's own, not the process's) and
    returns to it after every call. A worker that cannot return retires, so no
    thread ever runs a second call in a namespace it did not ask for; the pool
    starts another in its place. Only these threads ever call setns. A call made from one
    of the pool's own threads (a nested one) gets a thread of its own, so the pool never
    waits on itself.
    """

    def __init__(self, size: int = 4, name: str = "netns-worker"):
        self.size = size
        self.name = name
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers = 0
        self._serial = 0
        self._closed = False
        self._threads: set[int] = set()  # the workers' thread idents

    def run(self, target: str | Path, fn: Callable[[], T]) -> T:
        """Call `fn` inside `target` on one of the pool's threads; re-raises what it raises."""
        if threading.get_ident() in self._threads:
            return run_in_netns(target, fn)
        call: _Call[T] = _Call(netns_path(target), fn)
        self._ensure_workers()
        self._calls.put(call)
        call.done.wait()
        if call.failure is not None:
            raise call.failure
        return call.result  # type: ignore[return-value]

    def run_each(self, targets: Iterable[str | Path], fn: Callable[[], T]) -> list[T | Exception]:
        """Call `fn` inside each target, spread over the pool's threads at once; the results
        in the targets' order, what a call raised in its place."""
        calls: list[_Call[T]] = [_Call(netns_path(target), fn) for target in targets]
        self._ensure_workers()
        for call in calls:
            self._calls.put(call)
        results: list[T | Exception] = []
        for call in calls:
            call.done.wait()
            failure = call.failure
            if failure is not None and not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like are not a call's result
            results.append(failure if failure is not None else call.result)  # type: ignore[arg-type]
        return results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = self._workers
        for _ in range(workers):
            self._calls.put(None)

    def _ensure_workers(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the netns worker pool is closed")
            while self._workers < self.size:
                self._workers += 1
                self._serial += 1
                threading.Thread(
                    target=self._work, name=f"{self.name}-{self._serial}", daemon=True
                ).start()

    def _work(self) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            self._threads.add(threading.get_ident())
        try:
            while (call := self._calls.get()) is not None:
                if not self._serve(call, home):
                    return  # stranded in a foreign namespace: retire
        finally:
            os.close(home)
            with self._lock:
                self._workers -= 1
                self._threads.discard(threading.get_ident())

    @staticmethod
    def _serve(call: _Call[Any], home: int) -> bool:
        """Run one call; False if this thread could not get back home afterwards."""
        try:
            try:
                fd = os.open(call.netns, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise NetnsError(
                    exc.errno, f"network namespace {call.netns} does not exist"
                ) from exc
            try:
                _setns(fd)
            finally:
                os.close(fd)
            try:
                call.result = call.fn()
            finally:
                _setns(home)
        except NetnsError as exc:
            call.failure = exc
            entered_home = _inode_of_thread() == os.fstat(home).st_ino
            call.done.set()
            return entered_home
        except BaseException as exc:
            call.failure = exc
        call.done.set()
        return True


class _Call(Generic[T]):
    def __init__(self, netns: Path, fn: Callable[[], T]):
        self.netns = netns
        self.fn = fn
        self.result: T | None = None
        self.failure: BaseException | None = None
        self.done = threading.Event()


def _inode_of_thread() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino
