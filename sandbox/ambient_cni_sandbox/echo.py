"""The sandbox pods' default process: an HTTP server that says who answered and who asked.

GET any path returns JSON: the pod name (HOSTNAME), the address the request
arrived on, and the client address as this server saw it, so tests can tell
which pod answered and whether a proxy rewrote the source.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "ambient-cni-echo/1"

    def do_GET(self) -> None:
        local = self.connection.getsockname()
        body = json.dumps(
            {
                "pod": os.environ.get("HOSTNAME", ""),
                "local": f"{local[0]}:{local[1]}",
                "client": f"{self.client_address[0]}:{self.client_address[1]}",
                "path": self.path,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.client_address[0]} {format % args}\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sandbox HTTP echo server")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--bind", default="0.0.0.0")  # noqa: S104 - inside the pod's own netns
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.bind, args.port), EchoHandler)
    server.daemon_threads = True

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"echo server listening on {args.bind}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
