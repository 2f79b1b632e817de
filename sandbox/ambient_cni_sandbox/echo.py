"""The sandbox pods' default process: an HTTP server that says who answered and who asked.

GET any path returns JSON: the pod name (HOSTNAME), the address the request
arrived on, and the client address as this server saw it, so tests can tell
which pod answered and whether a proxy rewrote the source:

    {"pod": "server", "local": "10.244.4.2:8080", "client": "10.244.0.2:40112",
     "path": "/", "local_ip": "10.244.4.2", "local_port": 8080,
     "client_ip": "10.244.0.2", "client_port": 40112}

`local` and `client` are "{ip}:{port}" for either family (an IPv6 one unbracketed,
so split it on the last ':' or read `client_ip`/`client_port`). By default it
listens on both families with one socket (`::`, IPV6_V6ONLY off); IPv4 clients
show as their IPv4 address, never as the IPv4-mapped ::ffff:a.b.c.d.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


def plain_ip(host: str) -> str:
    """An address as its own family writes it: an IPv4-mapped IPv6 address (what a
    dual-stack socket reports for an IPv4 peer) as the IPv4 address it carries."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # e.g. a scoped link-local address, fe80::1%eth0
        return host
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else host


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "ambient-cni-echo/1"

    def do_GET(self) -> None:
        local_ip, local_port = self.connection.getsockname()[:2]
        client_ip, client_port = self.client_address[:2]
        local_ip, client_ip = plain_ip(local_ip), plain_ip(client_ip)
        body = json.dumps(
            {
                "pod": os.environ.get("HOSTNAME", ""),
                "local": f"{local_ip}:{local_port}",
                "client": f"{client_ip}:{client_port}",
                "path": self.path,
                "local_ip": local_ip,
                "local_port": local_port,
                "client_ip": client_ip,
                "client_port": client_port,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{plain_ip(self.client_address[0])} {format % args}\n")
        sys.stdout.flush()


class DualStackServer(ThreadingHTTPServer):
    """Listens on an IPv6 address; on `::`, IPv4 clients too (IPV6_V6ONLY off)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_server(bind: str, port: int) -> ThreadingHTTPServer:
    """A server on `bind` (an IPv4 or IPv6 address); with "" on both families, or on
    IPv4 alone where the namespace has no IPv6."""
    if bind == "":
        try:
            return DualStackServer(("::", port), EchoHandler)
        except OSError:  # no IPv6 at all (ipv6.disable=1)
            bind = "0.0.0.0"  # noqa: S104 - inside the pod's own netns
    if ipaddress.ip_address(bind).version == 6:
        return DualStackServer((bind, port), EchoHandler)
    return ThreadingHTTPServer((bind, port), EchoHandler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sandbox HTTP echo server")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--bind",
        default="",
        help="an address to listen on (default: every address of both families)",
    )
    args = parser.parse_args(argv)
    server = make_server(args.bind, args.port)
    server.daemon_threads = True

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    print(f"echo server listening on {shown}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
