"""What the benchmarks measure with: percentiles, a process's CPU and peak
memory, kernel rule events per network namespace, a ZDS peer that acks, and a
sampling profile of a process."""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ambient_cni.netns import run_in_netns
from ambient_cni.zds import WorkloadRequest
from ambient_cni_sandbox.zds_client import ZdsClient

RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33
NLMSG_HEADER = struct.Struct("=IHHII")


def percentiles(values: list[float]) -> dict[str, float]:
    """Min, nearest-rank p50/p95/p99 and max, in the values' unit; zeros when empty."""
    if not values:
        return {"min": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        index = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
        return ordered[index]

    return {
        "min": ordered[0],
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": ordered[-1],
    }


class ProcessUsage:
    """CPU seconds and peak RSS of one process, read from /proc."""

    def __init__(self, pid: int):
        self.pid = pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


def _multicast_socket(groups: int, buffer: int) -> socket.socket:
    """A NETLINK_ROUTE socket in this thread's namespace, subscribed to `groups`."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sock.bind((0, groups))
    return sock


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Each netlink message in a datagram: its type and its bytes."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return
        yield kind, data[offset : offset + length]
        offset += (length + 3) & ~3


class RuleEvents:
    """When each namespace's first IPv4 policy rule was added, and removed.

    The agent adds a pod's `ip rule` after its iptables transaction, so the
    rule's arrival marks the pod's redirection complete in the kernel. Events
    come from netlink multicast, so observing costs nothing while waiting.
    """

    def __init__(self, namespaces: Mapping[str, Path]):
        self.added: dict[str, float] = {}
        self.removed: dict[str, float] = {}
        self._stop = threading.Event()
        self._epoll = select.epoll()
        self._sockets: dict[int, tuple[str, socket.socket]] = {}
        for key, path in namespaces.items():
            sock = run_in_netns(path, lambda: _multicast_socket(RTMGRP_IPV4_RULE, 1 << 20))
            self._sockets[sock.fileno()] = (key, sock)
            self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="rule-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for fd, _ in self._epoll.poll(0.1):
                now = time.monotonic()
                key, sock = self._sockets[fd]
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    continue
                for kind, _ in _messages(data):
                    if kind == RTM_NEWRULE:
                        self.added.setdefault(key, now)
                    elif kind == RTM_DELRULE:
                        self.removed.setdefault(key, now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for _, sock in self._sockets.values():
            sock.close()
        self._epoll.close()


class RouteEvents:
    """When each address's route in one table of one namespace was added, and removed:
    node mode's mark that a pod's redirection is complete (its set entry goes first)."""

    def __init__(self, netns: Path, table: int):
        self.table = table
        self.added: dict[str, float] = {}
        self.removed: dict[str, float] = {}
        self._stop = threading.Event()
        self._sock = run_in_netns(netns, lambda: _multicast_socket(RTMGRP_IPV4_ROUTE, 1 << 22))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name="route-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            for kind, raw in _messages(data):
                if kind in (RTM_NEWROUTE, RTM_DELROUTE):
                    message = rtmsg(raw)
                    message.decode()
                    table = message.get_attr("RTA_TABLE") or message["table"]
                    dst = message.get_attr("RTA_DST")
                    if table == self.table and dst:
                        seen = self.added if kind == RTM_NEWROUTE else self.removed
                        seen.setdefault(str(dst), now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


class AckingZtunnel:
    """A ZDS peer that acks every request at once: the agent's cost, not ztunnel's."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acking-ztunnel", daemon=True)
        self._thread.start()

    def _handle(self, _request: WorkloadRequest, fd: int | None) -> str:
        if fd is not None:
            os.close(fd)
        self.requests += 1
        return ""

    def _run(self) -> None:
        while not self._stop.is_set():
            client = ZdsClient(self.socket_path, self._handle)
            if not client.connect(self._stop):
                return
            client.serve(self._stop)
            if client.sock is not None:
                client.sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll `probe` until truthy; raise with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.0f} GiB",
        "kernel": os.uname().release,
    }


class Profile:
    """py-spy sampling every thread of one process while it is busy, as collapsed stacks
    (one "frame;frame;... count" line each, for flamegraph.pl or speedscope)."""

    def __init__(self, pid: int, output: Path, rate: int = 250):
        self.output = output
        py_spy = Path(sys.executable).with_name("py-spy")
        self._process = subprocess.Popen(
            [
                *(str(py_spy), "record", f"--pid={pid}", f"--rate={rate}", "--format=raw"),
                *("--threads", "--nolineno", "--nonblocking", f"--output={output}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        said: list[str] = []
        said_by_py_spy = self._process.stdout
        assert said_by_py_spy is not None
        # py-spy says when it samples; what comes before is not the window measured.
        for line in said_by_py_spy:
            said.append(line)
            if "Sampling process" in line:
                break
        else:
            raise RuntimeError(f"py-spy did not attach to {pid}: {''.join(said).strip()}")
        # The rest of what it says is read off, so it never blocks on a full pipe.
        self._drain = threading.Thread(
            target=said_by_py_spy.read, name="py-spy-output", daemon=True
        )
        self._drain.start()

    def stop(self) -> dict[str, Any]:
        self._process.send_signal(signal.SIGINT)
        self._process.wait(timeout=30)
        self._drain.join(timeout=5)
        return summarise(self.output)


def summarise(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """The functions most often on the stack (inclusive) and at its top (self), as a share
    of all samples, and the samples per thread name."""
    samples = 0
    at_top: collections.Counter[str] = collections.Counter()
    on_stack: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    text = collapsed.read_text() if collapsed.exists() else ""  # no samples, no file
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        samples += n
        threads[frames[0].split(": ", 1)[-1].rstrip("-0123456789")] += n
        at_top[frames[-1]] += n
        on_stack.update(dict.fromkeys(set(frames[1:]), n))

    def shares(counter: collections.Counter[str]) -> dict[str, float]:
        return {name: round(n / samples, 3) for name, n in counter.most_common(top)}

    return {
        "samples": samples,
        "threads": shares(threads) if samples else {},
        "self": shares(at_top) if samples else {},
        "inclusive": shares(on_stack) if samples else {},
    }
