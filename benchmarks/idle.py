"""Benchmark 5: the node agent at rest, with 0, 100 and 250 enrolled pods and nothing changing.

One agent per backend enrols the pods (API objects on a node no kubelet runs,
each with a named namespace holding its IP, as in the enrolment benchmark),
then for each size waits a moment and measures, over a window as long as its
full re-check interval (so the window holds exactly one full pass): its CPU,
and the processes and threads it started, counted from the kernel's own fork
events (the proc connector), not from a guess. Then a rule flushed behind its
back in one pod: the time until it is back.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from ambient_cni.api import names
from ambient_cni.api.models import Workload
from ambient_cni.dataplane import factory
from ambient_cni.kube import raw
from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.components import AGENT_USER, Component
from ambient_cni_sandbox.network import create_netns

from .enroll import NODE, _patch_spec, create_empty_config, one_node_of_pods, pod_ip
from .measure import AckingZtunnel, ProcessUsage, Profile, wait_until
from .objects import (
    NETNS_PREFIX,
    BulkClient,
    delete_bench_objects,
    delete_netns_all,
    make_pod_netns,
)

NAMESPACE = "bench-idle"
SIZES = (0, 100, 250)
BACKENDS = ("iptables-nft", "nftables")
DRIFT_INTERVAL = 10.0  # the agent's defaults
RESYNC_INTERVAL = 90.0
SETTLE = 5.0  # after the pods are Enrolled, before the window opens
# How a person flushes the pod's outbound rules, per backend (iptables-nft's nat chain, or the
# nftables table's chain), and what the agent's rules look like there when present.
FLUSH = {
    "iptables-nft": ["iptables-nft", "-t", "nat", "-F", "ISTIO_OUTPUT"],
    "nftables": ["nft", "flush", "chain", "inet", "istio-ambient-nat", "istio-output"],
}
LIST = {
    "iptables-nft": ["iptables-nft", "-t", "nat", "-S", "ISTIO_OUTPUT"],
    "nftables": ["nft", "list", "chain", "inet", "istio-ambient-nat", "istio-output"],
}

# The proc connector (linux/cn_proc.h): the kernel's word on every fork, as it happens.
NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 1
NLMSG = struct.Struct("=IHHII")
CN_MSG = struct.Struct("=IIIIHH")
EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp
# Parent pid and tgid, child pid and tgid. The parent is the task's real parent: for a new
# process the thread that forked it; for a new thread the whole process's parent (not us).
FORK = struct.Struct("=IIII")


class Forks:
    """Processes and threads one process starts, from the proc connector (needs root)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.processes = 0
        self.threads = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self._sock.bind((0, CN_IDX_PROC))
        body = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0) + struct.pack(
            "=I", PROC_CN_MCAST_LISTEN
        )
        self._sock.send(NLMSG.pack(NLMSG.size + len(body), 3, 0, 0, 0) + body)  # NLMSG_DONE
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset = NLMSG.size + CN_MSG.size
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except (TimeoutError, OSError):
                continue
            if len(data) < offset + EVENT_HEAD.size + FORK.size:
                continue
            what, _, _ = EVENT_HEAD.unpack_from(data, offset)
            if what != PROC_EVENT_FORK:
                continue
            _, parent_tgid, child_pid, child_tgid = FORK.unpack_from(data, offset + EVENT_HEAD.size)
            with self._lock:
                if child_tgid == self.pid and child_pid != child_tgid:
                    self.threads += 1  # a new thread of the process
                elif parent_tgid == self.pid and child_pid == child_tgid:
                    self.processes += 1  # a child process

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.processes, self.threads

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def run(
    cluster: SandboxCluster,
    sizes: tuple[int, ...] = SIZES,
    backends: tuple[str, ...] = BACKENDS,
    *,
    drift_interval: float = DRIFT_INTERVAL,
    resync_interval: float = RESYNC_INTERVAL,
    window: float | None = None,
    profile: Path | None = None,
    settle: float = SETTLE,
) -> dict[str, Any]:
    """`window` (default: the resync interval, so it holds one full pass) per size, opened
    `settle` seconds after the pods are Enrolled; with
    `profile` (a directory), the agent is also sampled by py-spy during the largest size's
    window (the sampling costs CPU of its own: a profiled run's figures are not the
    benchmark's)."""
    window = resync_interval if window is None else window
    pods = max(sizes)
    bulk = BulkClient(cluster)
    custom = bulk.custom()
    host_netns = f"{NETNS_PREFIX}idle-host"
    pod_netns = [f"{NETNS_PREFIX}idle-{i:04d}" for i in range(pods)]
    socket_path = Path(cluster.state.state_dir) / "bench" / "ztunnel-idle.sock"
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        workloads = one_node_of_pods(cluster, bulk, [f"idle-{i:04d}" for i in range(pods)])
        create_netns(host_netns)
        make_pod_netns([(pod_netns[i], pod_ip(i)) for i in range(pods)])
        create_empty_config(custom)
        measured = {}
        for backend in backends:
            measured[backend] = _agent_at_rest(
                cluster,
                custom=custom,
                backend=backend,
                workloads=workloads,
                sizes=sizes,
                pod_netns=pod_netns,
                host_netns=host_netns,
                socket_path=socket_path,
                drift_interval=drift_interval,
                resync_interval=resync_interval,
                window=window,
                profile=profile,
                settle=settle,
            )
            _patch_spec(custom, [], "inpod")
            cleanup = factory.build(backend).pods
            for name in pod_netns:
                with contextlib.suppress(Exception):
                    cleanup.remove(Path("/run/netns") / name, families=(4,))
        return {
            "sizes": list(sizes),
            "window_s": window,
            "drift_interval_s": drift_interval,
            "resync_interval_s": resync_interval,
            "backends": measured,
        }
    finally:
        delete_netns_all([*pod_netns, host_netns])
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(
                names.GROUP, names.VERSION, names.PLURAL, NODE, _preload_content=False
            )
        delete_bench_objects(bulk, [NAMESPACE])


def _agent_at_rest(
    cluster: SandboxCluster,
    *,
    custom: Any,
    backend: str,
    workloads: list[Workload],
    sizes: tuple[int, ...],
    pod_netns: list[str],
    host_netns: str,
    socket_path: Path,
    drift_interval: float,
    resync_interval: float,
    window: float,
    profile: Path | None,
    settle: float,
) -> dict[str, Any]:
    agent: Component | None = None
    ztunnel: AckingZtunnel | None = None
    forks: Forks | None = None
    argv = [
        "agent",
        f"--node={NODE}",
        f"--kubeconfig={cluster.user_kubeconfig(AGENT_USER, groups='system:masters')}",
        f"--zds-socket={socket_path}",
        f"--host-netns=/run/netns/{host_netns}",
        "--netns-dir=/run/netns",
        f"--netns-prefix={NETNS_PREFIX}idle-",
        f"--drift-interval={drift_interval:g}",
        f"--backend={backend}",
        "--kubelet-uid=0",
    ]
    if resync_interval != RESYNC_INTERVAL:  # an agent without the flag measures as before
        argv.append(f"--resync-interval={resync_interval:g}")
    try:
        agent = Component(cluster, f"bench-idle-{backend}", argv)
        agent.start(timeout=60)
        ztunnel = AckingZtunnel(socket_path)
        started = agent
        wait_until(
            "ztunnel connected",
            lambda: started.metric("ambient_cni_agent_ztunnel_connected") == 1,
            timeout=30,
        )
        usage = ProcessUsage(agent.pid or 0)
        forks = Forks(agent.pid or 0)

        def enrolled() -> int:
            obj = raw(
                custom.get_cluster_custom_object(
                    names.GROUP, names.VERSION, names.PLURAL, NODE, _preload_content=False
                )
            )
            return int((obj.get("status") or {}).get("enrolled") or 0)

        rows = []
        profiles: dict[int, Any] = {}
        for size in sizes:
            _patch_spec(custom, workloads[:size], "inpod")
            wait_until(
                f"{size} pods Enrolled",
                lambda size=size: enrolled() == size,  # type: ignore[misc]
                timeout=60 + size,
                interval=0.2,
            )
            time.sleep(settle)  # the benchmark's own pacing, not a test's synchronisation
            profiler = None
            if profile is not None and size == sizes[-1]:
                profile.mkdir(parents=True, exist_ok=True)
                profiler = Profile(agent.pid or 0, profile / f"idle-{backend}-{size}.folded")
            cpu, (processes, threads) = usage.cpu_seconds(), forks.counts()
            opened = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - opened
            if profiler is not None:
                profiles[size] = profiler.stop()
            cpu = usage.cpu_seconds() - cpu
            processes_after, threads_after = forks.counts()
            rows.append(
                {
                    "pods": size,
                    "cpu_share": cpu / elapsed,
                    "processes_per_s": (processes_after - processes) / elapsed,
                    "threads_per_s": (threads_after - threads) / elapsed,
                    "processes": processes_after - processes,
                    "threads": threads_after - threads,
                }
            )
        repair = _time_to_repair(backend, pod_netns[0]) if sizes[-1] else None
        return {
            "backend": backend,
            "announced": agent.metric("ambient_cni_agent_drift_announced"),
            "rows": rows,
            "flushed_rule_repaired_s": repair,
            **({"profiles": profiles} if profiles else {}),
        }
    finally:
        if forks is not None:
            forks.close()
        if ztunnel is not None:
            ztunnel.close()
        if agent is not None:
            agent.stop()


def _time_to_repair(backend: str, netns: str, timeout: float = 30.0) -> float:
    """Flush the first pod's outbound rules behind the agent's back; seconds until they are
    back as they were."""
    in_pod = ["ip", "netns", "exec", netns]

    def listed() -> str:
        return subprocess.run(
            [*in_pod, *LIST[backend]], capture_output=True, text=True, check=True
        ).stdout

    before = listed()
    flushed = time.monotonic()
    subprocess.run([*in_pod, *FLUSH[backend]], check=True, capture_output=True)
    wait_until("the flushed rules back", lambda: listed() == before, timeout=timeout)
    return time.monotonic() - flushed
