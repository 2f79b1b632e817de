"""The ztunnel side of ZDS, for the sandbox's ztunnel stand-in: connect, hello, ack requests."""

from __future__ import annotations

import array
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ambient_cni.zds import (
    Ack,
    WorkloadRequest,
    ZdsDecodeError,
    ZdsHello,
    decode_request,
    encode_hello,
    encode_response,
)

MAX_DATAGRAM = 1024
log = logging.getLogger("ambient_cni_sandbox.zds_client")

# Called with each request and the netns fd that came with it (the handler owns
# the fd); returns an error text for a NACK, or "" to ack.
Handler = Callable[[WorkloadRequest, int | None], str]


class ZdsClient:
    def __init__(self, socket_path: Path, handler: Handler):
        self.socket_path = socket_path
        self.handler = handler
        self.sock: socket.socket | None = None

    def connect(self, stop: threading.Event, retry: float = 0.2) -> bool:
        """Connect and say hello, retrying until the server listens or `stop` is set."""
        while not stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                sock.close()
                stop.wait(retry)
                continue
            sock.send(encode_hello(ZdsHello()))
            self.sock = sock
            return True
        return False

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until the server goes away or `stop` is set."""
        assert self.sock is not None
        sock = self.sock
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                data, ancdata, _, _ = sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(4 * 4))
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            fd = _take_fd(ancdata)
            try:
                request = decode_request(data)
            except ZdsDecodeError as exc:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        socket.close(fd)
                sock.send(encode_response(Ack(error=f"undecodable request: {exc}")))
                continue
            try:
                error = self.handler(request, fd)
            except Exception as exc:  # the stand-in must answer, whatever went wrong
                log.exception("handling %s", request)
                error = str(exc) or type(exc).__name__
            try:
                sock.send(encode_response(Ack(error=error)))
            except OSError:  # the agent hung up meanwhile (it gave up waiting): done
                break
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def _take_fd(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    for extra in fds[1:]:  # exactly one is expected; never leak the rest
        with contextlib.suppress(OSError):
            socket.close(extra)
    return fds[0] if fds else None
