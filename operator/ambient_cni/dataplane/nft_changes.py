"""Changes to nftables, as the kernel announces them, namespace by namespace.

nftables, and iptables-nft (nftables underneath), announce every committed
transaction over netlink to the NFNLGRP_NFTABLES group of NETLINK_NETFILTER,
in the namespace where it happens: the table, chain, rule, set and element
messages, then one NFT_MSG_NEWGEN naming the process that committed it. One
socket per watched namespace, made inside it on one reused thread (a socket
stays in the namespace it was made in), and one thread reads them all through
epoll: nothing runs while nothing changes.

A transaction committed by the agent itself (its own threads through
libnftables, or an iptables-restore it started) is not news: its NEWGEN names
one of the agent's threads or a child of the agent. When that cannot be told
(the child is gone already, or the agent is in a PID namespace of its own,
where the kernel's PIDs are not ours) the change is reported and costs one
re-check that finds nothing to do. Lost messages (a full socket buffer) are
reported as a change.

Raw netlink, not pyroute2: pyroute2 0.9's NFTSocket gives each socket an
asyncio loop of its own and reads with a blocking get(), one socket at a
time; here hundreds of sockets share one epoll thread, and all that is read
is the message type and one attribute of NEWGEN (a few lines of struct).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from ambient_cni.netns import NetnsWorkers

from .runner import CHILDREN

log = logging.getLogger("ambient_cni.dataplane.nft_changes")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, portid
NFGENMSG_SIZE = 4  # family, version, resource id
NLA_HEADER = struct.Struct("=HH")  # length, type
NLA_TYPE_MASK = 0x3FFF
RECEIVE_BUFFER = 256 * 1024
HOST = "host"
# Told the key of a watched namespace whose rules changed (the agent's KernelChanges seam).
OnChange = Callable[[str], None]


def _align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Each netlink message in a datagram: its type, and its payload after the header."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            return
        yield kind, data[offset + NLMSG_HEADER.size : offset + length]
        offset += _align(length)


def committer(payload: bytes) -> int | None:
    """The PID (the kernel's thread ID) a NEWGEN message names as the committer."""
    offset = NFGENMSG_SIZE
    while offset + NLA_HEADER.size <= len(payload):
        length, kind = NLA_HEADER.unpack_from(payload, offset)
        if length < NLA_HEADER.size:
            return None
        if kind & NLA_TYPE_MASK == NFTA_GEN_PROC_PID and length >= NLA_HEADER.size + 4:
            return int(struct.unpack_from("!I", payload, offset + NLA_HEADER.size)[0])
        offset += _align(length)
    return None


def foreign_commit(data: bytes, ours: Callable[[int], bool]) -> bool:
    """True if `data` (a datagram of announcements) ends a transaction that someone else
    committed: each transaction's messages come first and its NEWGEN last (the kernel
    commits one at a time per namespace), so the NEWGEN says whose they all were."""
    foreign = False
    for kind, payload in messages(data):
        if kind >> 8 == NFNL_SUBSYS_NFTABLES and kind & 0xFF == NFT_MSG_NEWGEN:
            pid = committer(payload)
            foreign = foreign or pid is None or not ours(pid)
    return foreign


class OwnWriter:
    """Whether a PID the kernel names is this process's: one of its threads, or a child the
    runner started (e.g. iptables-restore; its record, or /proc while it is not reaped)."""

    def __init__(self, proc: Path = Path("/proc"), children: Container[int] = CHILDREN):
        self.proc = proc
        self.children = children
        self.pid = os.getpid()

    def __call__(self, pid: int) -> bool:
        if pid == self.pid or pid in self.children:
            return True
        if (self.proc / str(self.pid) / "task" / str(pid)).exists():
            return True
        try:
            stat = (self.proc / str(pid) / "stat").read_text()
        except OSError:
            return False
        fields = stat.rsplit(")", 1)[-1].split()
        return len(fields) > 1 and fields[1] == str(self.pid)


def _subscribed_socket() -> socket.socket:
    """A netfilter netlink socket in this thread's namespace, told of every nftables commit."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_NETFILTER,
    )
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except BaseException:
        sock.close()
        raise
    return sock


class _Watch:
    def __init__(self, key: str, netns: Path | None, sock: socket.socket):
        self.key = key
        self.netns = netns
        self.sock = sock


class NftablesChanges:
    """The agent's KernelChanges for nftables and iptables-nft: one subscribed socket per namespace,
    one epoll thread for all; `workers` (one thread, reused) enter namespaces to make them."""

    def __init__(self, workers: NetnsWorkers | None = None, own: OwnWriter | None = None):
        self.workers = workers or NetnsWorkers(1, name="nft-changes")
        self.own = own or OwnWriter()
        self._lock = threading.Lock()
        self._by_key: dict[str, _Watch] = {}
        self._by_fd: dict[int, _Watch] = {}
        self._epoll = select.epoll()
        self._on_change: OnChange | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # The epoll thread is woken through this to stop.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)

    @property
    def announces(self) -> bool:
        return True

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="nft-changes", daemon=True)
        self._thread.start()

    def watch(self, key: str, netns: Path | None) -> bool:
        with self._lock:
            known = self._by_key.get(key)
        if known is not None and known.netns == netns:
            return True
        try:
            sock = (
                _subscribed_socket()
                if netns is None
                else self.workers.run(netns, _subscribed_socket)
            )
        except OSError as exc:
            log.warning("cannot watch %s for nftables changes (%s): it is polled", key, exc)
            self.unwatch(key)
            return False
        watch = _Watch(key, netns, sock)
        with self._lock:
            old = self._by_key.get(key)
            if old is not None:
                self._forget(old)
            if self._closed:
                sock.close()
                return False
            self._by_key[key] = watch
            self._by_fd[sock.fileno()] = watch
            self._epoll.register(sock.fileno(), select.EPOLLIN)
        return True

    def unwatch(self, key: str) -> None:
        with self._lock:
            watch = self._by_key.get(key)
            if watch is not None:
                self._forget(watch)

    def watched(self) -> dict[str, Path | None]:
        with self._lock:
            return {key: w.netns for key, w in self._by_key.items()}

    def _forget(self, watch: _Watch) -> None:
        """Caller holds the lock."""
        self._by_key.pop(watch.key, None)
        fd = watch.sock.fileno()
        self._by_fd.pop(fd, None)
        self._epoll.unregister(fd)
        watch.sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for watch in list(self._by_key.values()):
                self._forget(watch)
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.workers.close()

    def _run(self) -> None:
        while True:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            changed: list[str] = []
            with self._lock:
                if self._closed:
                    return
                for fd, _ in ready:
                    watch = self._by_fd.get(fd)
                    if watch is not None and self._read(watch):
                        changed.append(watch.key)
            for key in changed:
                try:
                    assert self._on_change is not None
                    self._on_change(key)
                except Exception:
                    log.exception("handling a change to %s failed", key)

    def _read(self, watch: _Watch) -> bool:
        """Everything the socket holds (caller holds the lock): True if a transaction not
        ours is among it, or messages were lost."""
        changed = False
        while True:
            try:
                data = watch.sock.recv(1 << 16)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    changed = True  # lost some: the namespace is re-checked whole
                    continue
                log.warning("reading nftables changes of %s: %s", watch.key, exc)
                return True
            if foreign_commit(data, self.own):
                changed = True
