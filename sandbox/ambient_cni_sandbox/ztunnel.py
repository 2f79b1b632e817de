"""A ztunnel stand-in for the sandbox: a real ZDS client and a plaintext relay.

In-pod mode: for each pod it is given (an Add with the pod's netns fd) it
listens on 15001 (outbound), 15006 (inbound) and 15008 (HBONE) inside that
netns, with its sockets marked 1337 as ztunnel's are. A redirected
connection's original destination comes from SO_ORIGINAL_DST; the stand-in
connects there from inside the pod's netns (marked, so the pod's rules let it
pass).

Node mode (Istio 1.16-1.20): it also listens on those ports in its own netns,
the ztunnel pod's, with IP_TRANSPARENT, so the TPROXY rules there hand it
connections tunnelled in from the node. Such a connection's original
destination is its own local address; the stand-in connects there from its
own netns and address. Without CAP_NET_ADMIN it goes on without node mode.

Either way it relays both ways and logs one JSON line per connection: mode,
direction, pod ("" in node mode), source, original destination and bytes each
way. Tests read that log to prove which traffic went through it.

Run: python -m ambient_cni_sandbox.ztunnel --socket PATH --log PATH
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ambient_cni.logs import configure_json_logging
from ambient_cni.netns import run_in_netns
from ambient_cni.zds import AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadRequest
from ambient_cni_sandbox.zds_client import ZdsClient

ZTUNNEL_MARK = 1337
SO_ORIGINAL_DST = 80  # at SOL_IP; IP6T_SO_ORIGINAL_DST has the same number at IPPROTO_IPV6
IP_TRANSPARENT = 19  # at SOL_IP; not in Python's socket module
IPV6_TRANSPARENT = 75  # at IPPROTO_IPV6 (SOL_IPV6)
FAMILIES = (socket.AF_INET, socket.AF_INET6)
NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)  # what a namespace without IPv6 answers
ANY = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}  # noqa: S104 - inside a pod's netns
PORTS = {15001: "outbound", 15006: "inbound", 15008: "hbone"}
log = logging.getLogger("ztunnel-stand-in")


Address = tuple[str, int]


def original_destination(conn: socket.socket) -> Address:
    """Where a REDIRECTed (NATed) connection was going, from conntrack: a sockaddr_in, or
    for IPv6 a sockaddr_in6 (port, flow info, then the address)."""
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        (port,) = struct.unpack_from("!H", raw, 2)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int(port)
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), int(port)


def local_destination(conn: socket.socket) -> Address:
    """Where a TPROXYed connection was going: its socket holds that very address."""
    host, port = conn.getsockname()[:2]
    return str(host), int(port)


@dataclass(frozen=True)
class Capture:
    """How connections reached a set of listeners, and how to relay them on."""

    mode: str  # "inpod" or "node"
    pod: str  # namespace/name; "" in node mode, where one listener serves every pod
    destination: Callable[[socket.socket], Address]
    # An unconnected socket to reach the destination with, bound to the given source (the
    # client's own address, as ztunnel keeps it inbound) or to none.
    upstream: Callable[[Address, str | None], socket.socket]
    closed: threading.Event = field(default_factory=threading.Event)


@dataclass
class PodProxy:
    uid: str
    name: str
    namespace: str
    netns_fd: int
    inode: int
    listeners: list[socket.socket] = field(default_factory=list)
    capture: Capture = field(init=False)

    def __post_init__(self) -> None:
        self.capture = Capture(
            "inpod",
            f"{self.namespace}/{self.name}",
            original_destination,
            lambda dst, source: run_in_netns(
                self.netns_fd, lambda: _upstream(dst, source, marked=True)
            ),
        )

    def close(self) -> None:
        _close_listeners(self.capture, self.listeners)
        with contextlib.suppress(OSError):
            os.close(self.netns_fd)


class StandIn:
    def __init__(self, connection_log: Path):
        self.connection_log = connection_log
        self._log_lock = threading.Lock()
        self._lock = threading.Lock()
        self.pods: dict[str, PodProxy] = {}
        self._named_in_session: set[str] = set()
        self.node = Capture(
            "node", "", local_destination, lambda dst, source: _upstream(dst, source, marked=False)
        )
        self.node_listeners: list[socket.socket] = []

    # -- node mode --------------------------------------------------------------------------------

    def serve_node_mode(self) -> bool:
        """Listen in this process's own netns for TPROXYed connections; False (and a
        warning) when it may not, e.g. without CAP_NET_ADMIN."""
        try:
            self.node_listeners = _listen_all(transparent=True)
        except OSError as exc:
            log.warning("no node mode: cannot listen transparently in my own netns: %s", exc)
            return False
        self._serve(self.node, self.node_listeners, "accept-node")
        log.info("node mode: listening transparently on %s", ", ".join(map(str, PORTS)))
        return True

    def close(self) -> None:
        _close_listeners(self.node, self.node_listeners)
        for uid in list(self.pods):
            self.remove(uid)

    # -- ZDS ------------------------------------------------------------------------------------

    def handle(self, request: WorkloadRequest, fd: int | None) -> str:
        if isinstance(request, AddWorkload):
            if fd is None:
                return "Add without a netns fd"
            info = request.workload_info
            return self._add(
                request.uid, info.name if info else "", info.namespace if info else "", fd
            )
        if fd is not None:
            os.close(fd)
        if isinstance(request, DelWorkload):
            self.remove(request.uid)
        elif isinstance(request, KeepWorkload):
            self._named_in_session.add(request.uid)
        elif isinstance(request, SnapshotSent):
            with self._lock:
                stale = [uid for uid in self.pods if uid not in self._named_in_session]
            for uid in stale:
                self.remove(uid)
            log.info("snapshot complete: serving %d pods", len(self.pods))
        return ""

    def new_session(self) -> None:
        self._named_in_session = set()

    def _add(self, uid: str, name: str, namespace: str, fd: int) -> str:
        self._named_in_session.add(uid)
        inode = os.fstat(fd).st_ino
        with self._lock:
            existing = self.pods.get(uid)
        if existing is not None and existing.inode == inode:
            os.close(fd)  # already serving this very netns
            return ""
        if existing is not None:
            self.remove(uid)
        proxy = PodProxy(uid, name, namespace, fd, inode)
        try:
            proxy.listeners = run_in_netns(fd, _listen_all)
        except OSError as exc:
            proxy.close()
            return f"cannot listen in the pod's netns: {exc}"
        self._serve(proxy.capture, proxy.listeners, f"accept-{name}")
        with self._lock:
            self.pods[uid] = proxy
        log.info("serving %s/%s", namespace, name)
        return ""

    def remove(self, uid: str) -> None:
        with self._lock:
            proxy = self.pods.pop(uid, None)
        if proxy is not None:
            proxy.close()
            log.info("stopped serving %s/%s", proxy.namespace, proxy.name)

    # -- relaying --------------------------------------------------------------------------------

    def _serve(self, capture: Capture, listeners: list[socket.socket], name: str) -> None:
        for listener in listeners:
            threading.Thread(
                target=self._accept, args=(capture, listener), name=name, daemon=True
            ).start()

    def _accept(self, capture: Capture, listener: socket.socket) -> None:
        direction = PORTS[listener.getsockname()[1]]
        while not capture.closed.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._relay, args=(capture, direction, conn, peer), daemon=True
            ).start()

    def _relay(self, capture: Capture, direction: str, conn: socket.socket, peer: Address) -> None:
        started = time.time()
        record: dict[str, object] = {
            "mode": capture.mode,
            "direction": direction,
            "pod": capture.pod,
            "src": f"{peer[0]}:{peer[1]}",
        }
        try:
            if direction == "hbone":
                record["error"] = "HBONE is not implemented by the stand-in"
                return
            dst = capture.destination(conn)
            record["dst"] = f"{dst[0]}:{dst[1]}"
            # Inbound, the app sees the real client, as with ztunnel: the reply then finds
            # its way back only through the redirection's return path.
            upstream = capture.upstream(dst, peer[0] if direction == "inbound" else None)
            up, down = relay(conn, upstream, dst)
            record.update(bytes_up=up, bytes_down=down)
        except OSError as exc:
            record["error"] = str(exc)
        finally:
            conn.close()
            record["seconds"] = round(time.time() - started, 3)
            self._write(record)

    def _write(self, record: dict[str, object]) -> None:
        line = json.dumps(record, sort_keys=True)
        with self._log_lock, self.connection_log.open("a") as out:
            out.write(line + "\n")
        log.info("connection %s", line)


def _transparent(sock: socket.socket) -> None:
    """May bind and accept addresses that are not its own (CAP_NET_ADMIN)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def _upstream(dst: Address, source: str | None, *, marked: bool) -> socket.socket:
    """A socket of dst's family, in the calling thread's netns: marked 1337 as ztunnel's
    are in a pod (its rules let those pass), and bound to `source` when given."""
    family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if marked:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        if source is not None:
            _transparent(sock)
            sock.bind((source, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _listen_all(*, transparent: bool = False) -> list[socket.socket]:
    """Listeners on every port and both families, in the calling thread's netns: marked
    ones for a pod's netns, or transparent ones (accepting TPROXYed connections) for node
    mode. IPv6 is skipped where the namespace has none."""
    listeners: list[socket.socket] = []
    try:
        for family in FAMILIES:
            for port in PORTS:
                try:
                    listeners.append(_listener(family, port, transparent=transparent))
                except OSError as exc:
                    if family == socket.AF_INET or exc.errno not in NO_IPV6:
                        raise
                    log.info("no IPv6 listener on %d: the namespace has no IPv6", port)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _listener(family: socket.AddressFamily, port: int, *, transparent: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if transparent:
            _transparent(sock)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ANY[family], port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def _close_listeners(capture: Capture, listeners: list[socket.socket]) -> None:
    capture.closed.set()
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def _pump(src: socket.socket, dst: socket.socket, counted: list[int]) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
            counted[0] += len(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _pump_both(client: socket.socket, upstream: socket.socket) -> tuple[int, int]:
    up, down = [0], [0]
    back = threading.Thread(target=_pump, args=(upstream, client, down), daemon=True)
    back.start()
    _pump(client, upstream, up)
    back.join()
    upstream.close()
    return up[0], down[0]


def relay(
    client: socket.socket, upstream: socket.socket, dst: tuple[str, int], *, timeout: float = 5
) -> tuple[int, int]:
    """Connect `upstream` (bound as the caller wants) to `dst`, then copy both ways until
    both sides are done; (bytes up, bytes down). A failed connect closes it and raises."""
    try:
        upstream.settimeout(timeout)
        upstream.connect(dst)
        upstream.settimeout(None)
    except OSError:
        upstream.close()
        raise
    return _pump_both(client, upstream)


def main() -> None:
    parser = argparse.ArgumentParser(description="ztunnel stand-in for the ambient-cni sandbox")
    parser.add_argument("--socket", type=Path, required=True, help="the node agent's ZDS socket")
    parser.add_argument("--log", type=Path, required=True, help="JSON lines, one per connection")
    args = parser.parse_args()
    configure_json_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stand_in = StandIn(args.log)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    stand_in.serve_node_mode()
    while not stop.is_set():
        client = ZdsClient(args.socket, stand_in.handle)
        stand_in.new_session()
        if not client.connect(stop):
            break
        log.info("connected to %s", args.socket)
        client.serve(stop)
        log.info("ZDS session ended; reconnecting")
        stop.wait(0.2)
    stand_in.close()


if __name__ == "__main__":
    main()
