"""The ZDS server: the node agent's side of the ztunnel protocol (reference section 2.6).

The server remembers which pods ztunnel should hold (each `add` until its
`delete`); that memory, kept under the server's own lock, is the only source
of snapshots. ztunnel connects to a Unix SOCK_SEQPACKET socket and says
hello; the server replays the snapshot (Add, or Keep when the netns is gone,
per pod, then SnapshotSent), waiting for each ack; afterwards Adds go to the
newest connection and Dels to every connection. Pods added or deleted while
a snapshot was being replayed are caught up as soon as the session is
registered, so a new ztunnel never keeps a pod that left. One message is in
flight per connection, each with a deadline. Netns fds travel as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ambient_cni.zds import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    ZdsDecodeError,
    decode_hello,
    decode_response,
    encode_request,
)

from .interfaces import ZdsError

ACK_DEADLINE = 5.0
MAX_DATAGRAM = 1024
log = logging.getLogger("ambient_cni.agent.zds")


@dataclass(frozen=True)
class SnapshotEntry:
    uid: str
    info: WorkloadInfo
    netns_path: Path  # gone by the time of a snapshot: the pod is sent as Keep


class _Connection:
    def __init__(self, sock: socket.socket, number: int, deadline: float):
        self.sock = sock
        self.number = number
        self.deadline = deadline
        self.lock = threading.RLock()  # one message in flight; a catch-up holds it throughout
        self.closed = False

    def request(self, message: WorkloadRequest, fd: int | None = None) -> Ack:
        data = encode_request(message)
        with self.lock:
            if self.closed:
                raise ZdsError("ZtunnelDisconnected", "ztunnel connection closed")
            try:
                if fd is None:
                    self.sock.sendmsg([data])
                else:
                    fds = array.array("i", [fd])
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                self.sock.settimeout(self.deadline)
                reply = self.sock.recv(MAX_DATAGRAM)
            except TimeoutError as exc:
                self.close()
                raise ZdsError("ZtunnelTimeout", f"no ack within {self.deadline:g}s") from exc
            except OSError as exc:
                self.close()
                raise ZdsError("ZtunnelDisconnected", f"ztunnel connection: {exc}") from exc
            if not reply:
                self.close()
                raise ZdsError("ZtunnelDisconnected", "ztunnel closed the connection")
            try:
                return decode_response(reply)
            except ZdsDecodeError as exc:
                self.close()
                raise ZdsError("ZtunnelProtocolError", f"bad response from ztunnel: {exc}") from exc

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class ZdsServer:
    def __init__(
        self,
        socket_path: Path,
        on_change: Callable[[], None] = lambda: None,
        *,
        ack_deadline: float = ACK_DEADLINE,
    ):
        self.socket_path = socket_path
        self.ack_deadline = ack_deadline
        self.on_change = on_change
        self._lock = threading.Lock()
        self._wanted: dict[str, SnapshotEntry] = {}  # what ztunnel should hold, by pod uid
        self._connections: list[_Connection] = []
        self._count = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.connected_since: float | None = None  # wall time of the newest live session
        self._acked: dict[str, int] = {}  # pod uid -> the session number that acked its Add

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket from an earlier agent
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(self.socket_path))
        listener.listen(8)
        self._listener = listener
        threading.Thread(target=self._accept, name="zds-accept", daemon=True).start()
        log.info("serving ZDS on %s", self.socket_path)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    @property
    def connected(self) -> bool:
        with self._lock:
            return any(not c.closed for c in self._connections)

    # -- requests ----------------------------------------------------------------------

    def add(self, uid: str, info: WorkloadInfo, netns_path: Path) -> None:
        """Remember that ztunnel should hold this pod, hand its netns to the newest ztunnel
        and wait for the ack. Raises ZdsError when no ztunnel took it now; it stays
        remembered, so the next ztunnel's snapshot carries it."""
        with self._lock:
            self._wanted[uid] = SnapshotEntry(uid, info, netns_path)
        conn = self._newest()
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ack = conn.request(AddWorkload(uid=uid, workload_info=info), fd)
        except ZdsError:
            self._forget_closed()
            raise
        finally:
            os.close(fd)
        if not ack.ok:
            raise ZdsError("ZtunnelRejected", f"ztunnel refused {uid}: {ack.error}")
        with self._lock:
            self._acked[uid] = conn.number

    def holds(self, uid: str) -> bool:
        """Whether the newest live ztunnel holds this pod (acked its Add, live or in a snapshot)."""
        with self._lock:
            live = [c for c in self._connections if not c.closed]
            return bool(live) and self._acked.get(uid) == live[-1].number

    def delete(self, uid: str) -> None:
        """Forget the pod and tell every connected ztunnel; errors are logged, not raised."""
        with self._lock:
            self._wanted.pop(uid, None)
            self._acked.pop(uid, None)
            connections = [c for c in self._connections if not c.closed]
        for conn in connections:
            self._send_delete(conn, uid)
        self._forget_closed()

    def wanted(self) -> list[SnapshotEntry]:
        """The pods ztunnel should hold: what the next snapshot replays."""
        with self._lock:
            return list(self._wanted.values())

    def _send_delete(self, conn: _Connection, uid: str) -> None:
        try:
            ack = conn.request(DelWorkload(uid=uid))
            if not ack.ok:
                log.warning("ztunnel #%d: Del %s: %s", conn.number, uid, ack.error)
        except ZdsError as exc:
            log.warning("ztunnel #%d: Del %s: %s", conn.number, uid, exc.message)

    def _newest(self) -> _Connection:
        with self._lock:
            live = [c for c in self._connections if not c.closed]
        if not live:
            raise ZdsError("ZtunnelNotConnected", "no ztunnel is connected")
        return live[-1]

    def _forget_closed(self) -> None:
        with self._lock:
            before = len(self._connections)
            self._connections = [c for c in self._connections if not c.closed]
            changed = len(self._connections) != before
            if not self._connections:
                self.connected_since = None
        if changed:
            self.on_change()

    # -- sessions ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._count += 1
            threading.Thread(
                target=self._session,
                args=(sock, self._count),
                name=f"zds-{self._count}",
                daemon=True,
            ).start()

    def _session(self, sock: socket.socket, number: int) -> None:
        conn = _Connection(sock, number, self.ack_deadline)
        try:
            sock.settimeout(self.ack_deadline)
            hello = decode_hello(sock.recv(MAX_DATAGRAM))
            log.info("ztunnel #%d connected (ZDS version %d)", number, hello.version)
            replayed = self.wanted()
            for entry in replayed:
                self._replay(conn, entry)
            ack = conn.request(SnapshotSent())
            if not ack.ok:
                raise ZdsError("ZtunnelRejected", f"snapshot refused: {ack.error}")
            self._register(conn, {entry.uid for entry in replayed})
        except (OSError, ZdsDecodeError, ZdsError) as exc:
            log.warning("ztunnel #%d: session failed before it was ready: %s", number, exc)
            conn.close()
            self._forget_closed()
            return
        self.on_change()
        self._watch(conn)

    def _register(self, conn: _Connection, replayed: set[str]) -> None:
        """Make the session live, then send it what changed while the snapshot was replayed.

        Holding the connection's lock throughout orders the catch-up before any Add or
        Del a worker sends once the session is live, so the last word on a pod is right.
        """
        with conn.lock:
            with self._lock:
                self._connections.append(conn)
                self.connected_since = time.time()
                wanted = dict(self._wanted)
            for uid in sorted(replayed - set(wanted)):
                self._send_delete(conn, uid)
            for uid in sorted(set(wanted) - replayed):
                self._replay(conn, wanted[uid])

    def _replay(self, conn: _Connection, entry: SnapshotEntry) -> None:
        if self._replay_one(conn, entry):
            with self._lock:
                self._acked[entry.uid] = conn.number

    def _replay_one(self, conn: _Connection, entry: SnapshotEntry) -> bool:
        fd: int | None = None
        with contextlib.suppress(OSError):
            fd = os.open(entry.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        sent: WorkloadRequest
        if fd is None:  # known pod without a netns to hand over
            sent = KeepWorkload(uid=entry.uid)
            ack = conn.request(sent)
        else:
            sent = AddWorkload(uid=entry.uid, workload_info=entry.info)
            try:
                ack = conn.request(sent, fd)
            finally:
                os.close(fd)
        if not ack.ok:
            log.warning(
                "ztunnel #%d: snapshot entry %s refused: %s", conn.number, entry.uid, ack.error
            )
        return ack.ok and isinstance(sent, AddWorkload)

    def _watch(self, conn: _Connection) -> None:
        """Notice a ztunnel that goes away while idle (poll reads nothing, so no race)."""
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not conn.closed and not self._stop.is_set():
            if poller.poll(500):
                conn.close()
        log.info("ztunnel #%d disconnected", conn.number)
        self._forget_closed()
