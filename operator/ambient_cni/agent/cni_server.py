"""The socket the istio-cni plugin calls: HTTP on a Unix socket, as Istio's agent serves it.

`POST /cmdadd`, `/cmddel`, `/cmdcheck` with the plugin's event as JSON; 200 with
a short text on success, 400 for a body that is not an event, 500 with the
reason when the answer is no. The standard library's HTTP server is enough
for a few requests a second from one local client; each is handled on its
own thread, so a slow enrolment holds up no other pod's ADD.
"""

from __future__ import annotations

import http.server
import logging
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from .cni_endpoint import CniAnswer, CniEndpoint, PluginEvent

log = logging.getLogger("ambient_cni.agent.cni")

EVENT_SOCKET = "pluginevent.sock"
MAX_BODY = 1 << 20


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    endpoint: CniEndpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _UnixHTTPServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        routes: dict[str, Callable[[PluginEvent], CniAnswer]] = {
            "/cmdadd": self.server.endpoint.add,
            "/cmddel": self.server.endpoint.delete,
            "/cmdcheck": self.server.endpoint.check,
        }
        route = routes.get(self.path)
        if route is None:
            self._answer(404, f"no such path {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._answer(400, f"Content-Length must be 0 to {MAX_BODY}")
            return
        try:
            event = PluginEvent.model_validate_json(self.rfile.read(length))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            self._answer(400, f"not a plugin event: {where}: {first['msg']}")
            return
        try:
            answer = route(event)
        except Exception as exc:  # one bad request never takes the socket down
            log.exception("CNI %s for %s/%s", self.path, event.PodNamespace, event.PodName)
            self._answer(500, f"{type(exc).__name__}: {exc}")
            return
        if not answer.ok:
            log.warning("CNI %s refused: %s", self.path, answer.message)
        self._answer(200 if answer.ok else 500, answer.message)

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "plugin"  # a Unix socket peer has no address

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)


class CniServer:
    """Serves the plugin's socket in `run_dir` from `start` until `stop`."""

    def __init__(self, run_dir: Path, endpoint: CniEndpoint):
        self.run_dir = run_dir
        self.socket_path = run_dir / EVENT_SOCKET
        self.endpoint = endpoint
        self._server: _UnixHTTPServer | None = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.socket_path.unlink(missing_ok=True)  # a stale one from an earlier run
        server = _UnixHTTPServer(str(self.socket_path), _Handler)
        server.endpoint = self.endpoint
        self.socket_path.chmod(0o600)  # the runtime runs the plugin as root
        self._server = server
        threading.Thread(target=server.serve_forever, name="cni-server", daemon=True).start()
        log.info("serving the CNI plugin on %s", self.socket_path)

    def stop(self) -> None:
        """Stop answering: from now on the plugin fails closed, so no pod starts
        unredirected while the agent is away."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self.socket_path.unlink(missing_ok=True)
        self._server = None
