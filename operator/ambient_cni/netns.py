"""Run code inside a network namespace, on a dedicated thread.

setns(2) changes the namespace of the calling thread only, so entering a
namespace on a shared thread (the asyncio loop, a pool worker) would leak
that namespace into unrelated work. Every call here gets a fresh OS thread
that enters the namespace, runs one function and exits; sockets created on
that thread stay bound to the namespace after it ends.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
