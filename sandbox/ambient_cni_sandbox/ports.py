"""Loopback ports for the sandbox's listeners, outside the kernel's ephemeral range.

A port found free by binding to port 0 comes from the ephemeral range, the
same range the kernel hands to outgoing connections; between the pick and
the listener's own bind, a connection (kube-apiserver opens many to etcd)
may take it, and the listener fails with "address already in use". Ports
below that range are never given out implicitly, so one free at the pick
stays free unless another listener binds it on purpose.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

LOWEST = 20000
_taken: set[int] = set()  # handed out by this process: never twice
_lock = threading.Lock()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port nothing listens on, below the ephemeral range."""
    highest = max(_ephemeral_start() - 1, LOWEST + 1000)
    for _ in range(200):
        port = random.randint(LOWEST, highest)  # noqa: S311 - not for security
        with _lock:
            if port in _taken:
                continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        with _lock:
            _taken.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {LOWEST} and {highest}")
