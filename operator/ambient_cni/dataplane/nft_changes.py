"""Changes to nftables and policy routing, as the kernel announces them, per namespace.

nftables, and iptables-nft (nftables underneath), announce every committed
transaction over netlink to the NFNLGRP_NFTABLES group of NETLINK_NETFILTER,
in the namespace where it happens: the table, chain, rule, set and element
messages, then one NFT_MSG_NEWGEN naming the process that committed it. One
socket per watched namespace, made inside it on one reused thread (a socket
stays in the namespace it was made in), and one thread reads them all through
epoll: nothing runs while nothing changes.

A transaction committed by the agent itself (its own threads through
libnftables, or an iptables-restore it started) is not news: its NEWGEN names
one of the agent's threads or a child of the agent, by host PID, which the agent
reads through the host's /proc. When that cannot be told (a child gone and
reaped already, in a PID namespace of its own) the change is reported and costs
one re-check that finds nothing to do. Lost messages (a full socket buffer) are
reported as a change.

The pod's policy routing (its `ip rule` and routes in table 100) is the rest
of its redirection: a NETLINK_ROUTE socket per namespace hears rule changes
and changes of routes in that table. The agent writes those only when it
enrols or repairs a pod; its own writes there are not told apart (one
re-check each).

Raw netlink, not pyroute2: pyroute2 0.9's NFTSocket gives each socket an
asyncio loop of its own and reads with a blocking get(), one socket at a
time; here hundreds of sockets share one epoll thread, and all that is read
is the message type and one attribute of NEWGEN, or a route's table (a few lines
of struct).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from ambient_cni.netns import NetnsWorkers

from .constants import ROUTE_TABLE
from .runner import CHILDREN

log = logging.getLogger("ambient_cni.dataplane.nft_changes")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NLM_F_REQUEST = 1
NFNETLINK_V0 = 0
SO_NETNS_COOKIE = 71  # Linux 5.14+: a namespace's identity, never reused while the system runs
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, portid
NFGENMSG_SIZE = 4  # family, version, resource id
NLA_HEADER = struct.Struct("=HH")  # length, type
NLA_TYPE_MASK = 0x3FFF
RECEIVE_BUFFER = 256 * 1024
HOST = "host"
# rtnetlink: the multicast groups of IPv4 and IPv6 rules and routes, and their messages.
RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE = 7, 8, 11, 19
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
RTMSG_TABLE_OFFSET = 4  # struct rtmsg: family, dst_len, src_len, tos, table, ...
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


def _gen_attr(payload: bytes, attr: int) -> int | None:
    """A 32-bit attribute of a NEWGEN message."""
    offset = NFGENMSG_SIZE
    while offset + NLA_HEADER.size <= len(payload):
        length, kind = NLA_HEADER.unpack_from(payload, offset)
        if length < NLA_HEADER.size:
            return None
        value_at = offset + NLA_HEADER.size
        if kind & NLA_TYPE_MASK == attr and length >= NLA_HEADER.size + 4:
            if value_at + 4 > len(payload):
                return None  # truncated: say nothing rather than misread
            return int(struct.unpack_from("!I", payload, value_at)[0])
        offset += _align(length)
    return None


def committer(payload: bytes) -> int | None:
    """The PID (the kernel's thread ID) a NEWGEN message names as the committer."""
    return _gen_attr(payload, NFTA_GEN_PROC_PID)


def generation() -> tuple[int, int] | None:
    """This thread's namespace and its nftables generation, which every commit moves on (of
    nftables or iptables-nft, any table, any family): (the namespace's cookie, the
    generation ID); None where the kernel cannot say. Equal answers mean nothing in the
    namespace's nftables changed in between: a read of its rules would find what it found."""
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        ) as sock:
            sock.settimeout(1.0)
            cookie = int.from_bytes(
                sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little"
            )
            kind = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN
            body = struct.pack("=BBH", socket.AF_UNSPEC, NFNETLINK_V0, 0)
            sock.send(
                NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), kind, NLM_F_REQUEST, 1, 0) + body
            )
            for reply, payload in messages(sock.recv(1 << 16)):
                if reply == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN:
                    genid = _gen_attr(payload, NFTA_GEN_ID)
                    return None if genid is None else (cookie, genid)
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:  # no SO_NETNS_COOKIE: not before Linux 5.14
            _without_generations(exc.strerror or str(exc))
        else:  # passing (a timeout, a full buffer): this re-check reads the rules
            log.debug("reading the nftables generation: %s", exc)
        return None
    return None


@functools.cache
def _without_generations(why: str) -> None:
    """Said once per reason: a kernel older than 5.14 has no SO_NETNS_COOKIE, and then each
    re-check of a pod reads its rules whatever happened (correct, at a cost)."""
    log.warning(
        "cannot read nftables generations (%s): each re-check of a pod reads its rules", why
    )


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


def routing_changed(data: bytes, table: int = ROUTE_TABLE) -> bool:
    """True if `data` (a datagram from a route socket) tells of a rule added or deleted, or
    of a route in `table`."""
    for kind, payload in messages(data):
        if kind in (RTM_NEWRULE, RTM_DELRULE):
            return True
        routed = kind in (RTM_NEWROUTE, RTM_DELROUTE) and len(payload) > RTMSG_TABLE_OFFSET
        if routed and payload[RTMSG_TABLE_OFFSET] == table:
            return True
    return False


class OwnWriter:
    """Whether a PID the kernel names is this process's: one of its threads, or a child the
    runner started (e.g. iptables-restore; its record, or /proc while it is not reaped).

    The kernel names committers by their PID in the host's PID namespace. `proc` is the
    host's /proc (the agent's `--proc`, /host/proc in the chart): through it the agent
    finds its own PID as the host numbers it, from a container with a PID namespace of its
    own, without sharing the host's."""

    def __init__(self, proc: Path = Path("/proc"), children: Container[int] = CHILDREN):
        self.proc = proc
        self.pid = host_pid(proc)
        # The runner records its children by the PIDs this process sees: the same numbers
        # only when this process sees the host's (else a foreign PID could match by chance).
        self.children: Container[int] = children if self.pid == os.getpid() else ()

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


def host_pid(proc: Path) -> int:
    """This process's PID in the PID namespace `proc` was mounted for (its `self` link)."""
    try:
        return int((proc / "self").readlink().name)
    except (OSError, ValueError):
        return os.getpid()


def _subscribed(protocol: int, groups: tuple[int, ...]) -> socket.socket:
    """A netlink socket in this thread's namespace, in these multicast groups."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol
    )
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock


def _subscribed_sockets() -> tuple[socket.socket, socket.socket]:
    """This thread's namespace's nftables commits, and its rules and routes."""
    rules = _subscribed(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))
    try:
        routing = _subscribed(
            socket.NETLINK_ROUTE,
            (RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE),
        )
    except BaseException:
        rules.close()
        raise
    return rules, routing


class _Watch:
    def __init__(self, key: str, netns: Path | None, sockets: tuple[socket.socket, ...]):
        self.key = key
        self.netns = netns
        self.sockets = sockets


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
            sockets = (
                _subscribed_sockets()
                if netns is None
                else self.workers.run(netns, _subscribed_sockets)
            )
        except OSError as exc:
            log.warning("cannot watch %s for nftables changes (%s): it is polled", key, exc)
            self.unwatch(key)
            return False
        watch = _Watch(key, netns, sockets)
        with self._lock:
            old = self._by_key.get(key)
            if old is not None:
                self._forget(old)
            if self._closed:
                for sock in sockets:
                    sock.close()
                return False
            self._by_key[key] = watch
            try:
                for sock in sockets:
                    self._by_fd[sock.fileno()] = watch
                    self._epoll.register(sock.fileno(), select.EPOLLIN)
            except OSError as exc:
                self._forget(watch)
                log.warning("cannot watch %s for changes: %s", key, exc)
                return False
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
        for sock in watch.sockets:
            if self._by_fd.pop(sock.fileno(), None) is not None:
                with contextlib.suppress(OSError):  # never registered, or gone already
                    self._epoll.unregister(sock.fileno())
            sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for watch in list(self._by_key.values()):
                self._forget(watch)
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.workers.close()
        if self._thread is None or not self._thread.is_alive():
            self._epoll.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

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
                    try:
                        if watch is not None and self._read(watch, fd):
                            changed.append(watch.key)
                    except Exception:  # this thread must not die: a pod would go unheard
                        log.exception("reading the changes of %s failed", watch and watch.key)
                        if watch is not None:
                            changed.append(watch.key)  # unsure: re-check it
            for key in changed:
                try:
                    assert self._on_change is not None
                    self._on_change(key)
                except Exception:
                    log.exception("handling a change to %s failed", key)

    def _read(self, watch: _Watch, fd: int) -> bool:
        """Everything the socket holds (caller holds the lock): True if a transaction not
        ours, or a routing change, is among it, or messages were lost."""
        sock = next(s for s in watch.sockets if s.fileno() == fd)
        news = foreign_commit if sock.proto == NETLINK_NETFILTER else _routing_news
        changed = False
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    changed = True  # lost some: the namespace is re-checked whole
                    continue
                log.warning("reading nftables changes of %s: %s", watch.key, exc)
                return True
            if news(data, self.own):
                changed = True


def _routing_news(data: bytes, _ours: Callable[[int], bool]) -> bool:
    return routing_changed(data)
