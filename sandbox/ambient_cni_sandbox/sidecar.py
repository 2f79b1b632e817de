"""An Envoy sidecar stand-in for the sandbox: the `istio-proxy` container of a sidecar pod.

The kubelet runs it in the pod's netns as the container's user and group (1337 by
default, as Istio injects it), before the app. It listens on 15001 (outbound) and
15006 (inbound) as Envoy does, relays each connection the pod's capture rules
send it and logs one JSON line per connection (direction, source, original
destination, bytes), so tests can prove which traffic went through it.

- Outbound: the original destination from SO_ORIGINAL_DST; the relay connects
  there as the proxy's user, which the capture rules let out.
- Inbound, REDIRECT: SO_ORIGINAL_DST again; the relay connects to the app from
  127.0.0.6, the passthrough source the rules let through (so the app sees
  127.0.0.6, as behind Envoy).
- Inbound, TPROXY: the listener is transparent and the accepted socket's own
  address is the original destination; the relay binds the client's address
  (IP_TRANSPARENT) before connecting, so the app sees the real client.

It is started as root and becomes the container's user and group before it
opens a socket (the sandbox's Python may live where that user cannot read).

Run: python -m ambient_cni_sandbox.sidecar --log PATH --user UID --group GID [--tproxy]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TextIO

from .ztunnel import ANY, FAMILIES, NO_IPV6, _transparent, original_destination, relay

OUTBOUND, INBOUND = 15001, 15006
# Where Envoy's inbound passthrough connects from, per family (the rules let it through).
PASSTHROUGH_SOURCE = {socket.AF_INET: "127.0.0.6", socket.AF_INET6: "::6"}
TPROXY_MARK = 1337


class Sidecar:
    def __init__(self, connection_log: TextIO, tproxy: bool):
        self.connection_log = connection_log  # opened before dropping to the proxy's user
        self.tproxy = tproxy
        self._lock = threading.Lock()

    def listen(self) -> list[socket.socket]:
        """Both ports in both families (IPv6 only where the pod has it)."""
        listeners: list[socket.socket] = []
        for family in FAMILIES:
            for port in (OUTBOUND, INBOUND):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    if port == INBOUND and self.tproxy:
                        _transparent(sock)
                    sock.bind((ANY[family], port))
                    sock.listen(64)
                except OSError as exc:
                    sock.close()
                    if family == socket.AF_INET6 and exc.errno in NO_IPV6:
                        continue
                    for made in listeners:
                        made.close()
                    raise
                listeners.append(sock)
        return listeners

    def serve(self, listener: socket.socket) -> None:
        direction = "outbound" if listener.getsockname()[1] == OUTBOUND else "inbound"
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(direction, conn, peer), daemon=True).start()

    def _relay(self, direction: str, conn: socket.socket, peer: tuple[str, int]) -> None:
        started = time.time()
        record: dict[str, object] = {"direction": direction, "src": f"{peer[0]}:{peer[1]}"}
        try:
            transparent = direction == "inbound" and self.tproxy
            dst = conn.getsockname() if transparent else original_destination(conn)
            record["dst"] = f"{dst[0]}:{dst[1]}"
            upstream = socket.socket(conn.family, socket.SOCK_STREAM)
            try:
                if transparent:
                    _transparent(upstream)
                    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TPROXY_MARK)
                    upstream.bind((peer[0], 0))
                elif direction == "inbound":
                    upstream.bind((PASSTHROUGH_SOURCE[conn.family], 0))
            except OSError:
                upstream.close()
                raise
            up, down = relay(conn, upstream, dst)
            record.update(bytes_up=up, bytes_down=down)
        except OSError as exc:
            record["error"] = str(exc)
        finally:
            conn.close()
            record["seconds"] = round(time.time() - started, 3)
            line = json.dumps(record, sort_keys=True)
            with self._lock:
                self.connection_log.write(line + "\n")
                self.connection_log.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="Envoy sidecar stand-in for the sandbox")
    parser.add_argument("--log", type=Path, required=True, help="JSON lines, one per connection")
    parser.add_argument("--tproxy", action="store_true", help="inbound comes by TPROXY")
    parser.add_argument("--user", type=int, required=True, help="runAsUser")
    parser.add_argument("--group", type=int, required=True, help="runAsGroup")
    args = parser.parse_args()
    connection_log = args.log.open("a")  # the sandbox's state dir is root's alone
    # Become the container's user, as a runtime would have started it (group first).
    os.setgroups([])
    os.setgid(args.group)
    os.setuid(args.user)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sidecar = Sidecar(connection_log, args.tproxy)
    for listener in sidecar.listen():
        threading.Thread(target=sidecar.serve, args=(listener,), daemon=True).start()
    stop.wait()


if __name__ == "__main__":
    main()
