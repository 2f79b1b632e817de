"""Benchmarks 4 and 5: the controller against many nodes and pods, and what one
agent's watch receives while every AmbientNodeConfig changes.

Nodes and pods are API objects only (status.podIP set as a kubelet would), on
the sandbox's real API server; no kubelet or netns is involved.
"""

from __future__ import annotations

import functools
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import CustomObjectsApi

from ambient_cni.api import names
from ambient_cni.kube import MERGE_PATCH, as_body
from ambient_cni.reflector import Reflector, name_of
from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.components import AGENT_USER, Component, controller
from ambient_cni_sandbox.network import create_netns, delete_netns
from ambient_cni_sandbox.processes import tagged_pids

from .measure import ProcessUsage, Profile, wait_until
from .objects import (
    BENCH_LABEL,
    NETNS_PREFIX,
    BulkClient,
    create_many_running_pods,
    create_nodes,
    delete_bench_objects,
    ensure_crd,
    wait_default_service_accounts,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
PROFILE_SECONDS = 20  # of the API server, from the burst's start and from the restart's


def pod_ip(index: int) -> str:
    return f"10.{96 + index // 65536}.{index // 256 % 256}.{index % 256}"


class SpecWatch:
    """Every AmbientNodeConfig's workload count and generation, with what the watch cost."""

    def __init__(self, cluster: SandboxCluster):
        self.objects = 0
        self.bytes = 0
        self.changed_at = 0.0
        self._lock = threading.Lock()
        custom = CustomObjectsApi(cluster.api)
        self.reflector: Reflector = Reflector(
            "bench-ancs",
            functools.partial(
                custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.PLURAL
            ),
            self._changed,
            key=name_of,
            on_received=self._received,
        )

    def _received(self, objects: int, size: int) -> None:
        with self._lock:
            self.objects += objects
            self.bytes += size

    def _changed(self, _key: str) -> None:
        self.changed_at = time.monotonic()

    def counts(self) -> dict[str, int]:
        return {
            name_of(obj): len((obj.get("spec") or {}).get("workloads") or [])
            for obj in self.reflector.items()
        }

    def generations(self) -> dict[str, int]:
        return {
            name_of(obj): int(obj["metadata"].get("generation") or 0)
            for obj in self.reflector.items()
        }


def apiserver_profile(cluster: SandboxCluster, seconds: int, path: Path) -> threading.Thread:
    """The API server's CPU profile (Go pprof, its /debug/pprof) over the next `seconds`, to
    `path`, on a thread: where a missed mark's time went on the server's side. Read it with
    `go tool pprof -top PATH`."""

    def fetch() -> None:
        kubectl = Path(cluster.state.bin_dir) / "kubectl"
        raw = f"/debug/pprof/profile?seconds={seconds}"
        with path.open("wb") as out:
            subprocess.run(
                [str(kubectl), "--kubeconfig", str(cluster.kubeconfig), "get", "--raw", raw],
                stdout=out,
                check=False,
                timeout=seconds + 60,
            )

    thread = threading.Thread(target=fetch, name="apiserver-profile", daemon=True)
    thread.start()
    return thread


class _Sampler:
    """py-spy on the controller's restart, attached as soon as its process exists (the
    first ~0.2 s, imports, are not sampled). Samples slow it: a profiled restart's time is
    not the benchmark's figure."""

    def __init__(self, ctl: Component, output: Path):
        self.profile: Profile | None = None
        self._done = threading.Event()

        def attach() -> None:
            while not self._done.is_set() and ctl.pid is None:
                time.sleep(0.01)
            if ctl.pid is not None and not self._done.is_set():
                self.profile = Profile(ctl.pid, output, rate=100)

        self._thread = threading.Thread(target=attach, name="restart-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)
        if self.profile is not None:
            self.profile.stop()


def _sample_once_started(ctl: Component, profile_dir: Path, nodes: int) -> _Sampler:
    return _Sampler(ctl, profile_dir / f"controller-restart-{nodes}.folded")


def run(
    cluster: SandboxCluster,
    nodes: int = 1000,
    pods: int = 20000,
    relabel: int = 100,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    bulk = BulkClient(cluster)
    namespaces = [f"bench-scale-{i:03d}" for i in range(2 * relabel)]
    node_names = [f"bench-scale-{i:04d}" for i in range(nodes)]
    stop = threading.Event()
    ctl: Component | None = None
    agent: Component | None = None
    profiles: list[threading.Thread] = []
    host_netns = f"{NETNS_PREFIX}scale-host"
    try:
        ensure_crd(cluster)
        if cluster.namespace(names.DEFAULT_SYSTEM_NAMESPACE) is None:  # the leader Lease's
            cluster.create_namespace(names.DEFAULT_SYSTEM_NAMESPACE)
        started = time.monotonic()
        bulk.each(lambda ns: cluster.create_namespace(ns, labels={BENCH_LABEL: "true"}), namespaces)
        create_nodes(bulk, node_names)
        wait_default_service_accounts(bulk, namespaces)
        rng = random.Random(7)  # noqa: S311 - a reproducible spread, not a secret
        ns_of = [rng.randrange(len(namespaces)) for _ in range(pods)]
        placed = [(f"pod-{i:06d}", node_names[i % nodes], pod_ip(i)) for i in range(pods)]
        create_many_running_pods(
            bulk,
            [(name, namespaces[ns_of[i]], node, ip) for i, (name, node, ip) in enumerate(placed)],
        )
        populate_s = time.monotonic() - started

        watch = SpecWatch(cluster)
        watch.reflector.start(stop)
        ctl = controller(cluster)
        spawned = time.monotonic()
        ctl.start(timeout=300)
        usage = ProcessUsage(ctl.pid or 0)
        wait_until(
            "an AmbientNodeConfig per node",
            lambda: sum(1 for n in watch.counts() if n in set(node_names)) == nodes,
            timeout=600,
            interval=0.1,
        )
        first_sync_s = time.monotonic() - spawned

        # Benchmark 5's agent: one node's, with a host netns of its own and no pods to find.
        create_netns(host_netns)
        socket_dir = Path(cluster.state.state_dir) / "bench-scale"
        socket_dir.mkdir(parents=True, exist_ok=True)
        agent = Component(
            cluster,
            "bench-scale-agent",
            [
                "agent",
                f"--node={node_names[0]}",
                f"--kubeconfig={cluster.user_kubeconfig(AGENT_USER, groups='system:masters')}",
                f"--zds-socket={socket_dir / 'ztunnel.sock'}",
                f"--host-netns=/run/netns/{host_netns}",
                f"--netns-prefix={NETNS_PREFIX}scale-none-",
            ],
        )
        agent.start(timeout=60)

        expected: dict[str, int] = dict.fromkeys(node_names, 0)
        for i in range(pods):
            if ns_of[i] < relabel:
                expected[placed[i][1]] += 1
        generations_before = watch.generations()
        writes_before = _spec_writes(ctl)
        cpu_before = usage.cpu_seconds()
        plane = control_plane(cluster)  # where the rest of the burst's time goes
        plane_before = {name: u.cpu_seconds() for name, u in plane.items()}
        seen_before = (watch.objects, watch.bytes)
        agent_before = _agent_received(agent)

        if profile_dir is not None:
            profile = profile_dir / f"apiserver-burst-{nodes}.pprof"
            profiles.append(apiserver_profile(cluster, PROFILE_SECONDS, profile))
        burst_at = time.monotonic()
        bulk.each(
            lambda ns: bulk.core().patch_namespace(
                ns,
                as_body({"metadata": {"labels": AMBIENT}}),
                _content_type=MERGE_PATCH,
                _preload_content=False,
            ),
            namespaces[:relabel],
        )

        def converged() -> bool:
            counts = watch.counts()
            return all(counts.get(node) == want for node, want in expected.items())

        wait_until("every spec to converge", converged, timeout=600, interval=0.05)
        converge_s = watch.changed_at - burst_at
        # A measuring window, not synchronisation: a write still owed would come within
        # the 1 s per-node write interval, and must be counted.
        time.sleep(3.0)
        generations_after = watch.generations()
        per_node = [
            generations_after.get(node, 0) - generations_before.get(node, 0) for node in node_names
        ]
        burst_writes = _spec_writes(ctl) - writes_before
        burst_cpu = usage.cpu_seconds() - cpu_before
        plane_burst = {n: u.cpu_seconds() - plane_before[n] for n, u in plane.items()}
        agent_after = _agent_received(agent)
        cluster_objects = watch.objects - seen_before[0]
        cluster_bytes = watch.bytes - seen_before[1]
        peak_rss = usage.peak_rss_mib()
        total_cpu = usage.cpu_seconds()

        ctl.stop()
        plane_before = {name: u.cpu_seconds() for name, u in plane.items()}
        if profile_dir is not None:
            for thread in profiles:  # one CPU profile at a time, the server says
                thread.join(timeout=PROFILE_SECONDS + 60)
            profile = profile_dir / f"apiserver-restart-{nodes}.pprof"
            profiles.append(apiserver_profile(cluster, PROFILE_SECONDS, profile))
        restart_at = time.monotonic()
        sampler = None if profile_dir is None else _sample_once_started(ctl, profile_dir, nodes)
        ctl.start(timeout=300)
        wait_until(
            "every node's spec confirmed after the restart",
            lambda: (
                ctl is not None
                and ctl.metric("ambient_cni_controller_reconcile_seconds_count") >= nodes
            ),
            timeout=600,
            interval=0.05,
        )
        restart_s = time.monotonic() - restart_at
        if sampler is not None:
            sampler.stop()
        restart_writes = _spec_writes(ctl)
        restart_rss = ProcessUsage(ctl.pid or 0).peak_rss_mib()
        restart_cpu = ProcessUsage(ctl.pid or 0).cpu_seconds()
        plane_restart = {n: u.cpu_seconds() - plane_before[n] for n, u in plane.items()}
        return {
            "nodes": nodes,
            "pods": pods,
            "namespaces": len(namespaces),
            "relabelled": relabel,
            "enrolled_after": sum(expected.values()),
            "populate_s": populate_s,
            "first_sync_s": first_sync_s,
            "converge_s": converge_s,
            "spec_writes": burst_writes,
            "spec_writes_per_node_max": max(per_node),
            "spec_writes_per_node_mean": sum(per_node) / nodes,
            "controller_burst_cpu_s": burst_cpu,
            "controller_total_cpu_s": total_cpu,
            "controller_peak_rss_mib": peak_rss,
            "restart_relist_s": restart_s,
            "restart_writes": restart_writes,
            "restart_peak_rss_mib": restart_rss,
            "restart_cpu_s": restart_cpu,
            # The API server's and etcd's CPU over the same windows (2 cores in all).
            "apiserver_burst_cpu_s": plane_burst.get("kube-apiserver", 0.0),
            "etcd_burst_cpu_s": plane_burst.get("etcd", 0.0),
            "apiserver_restart_cpu_s": plane_restart.get("kube-apiserver", 0.0),
            "agent_objects": agent_after[0] - agent_before[0],
            "agent_bytes": agent_after[1] - agent_before[1],
            "all_objects": cluster_objects,
            "all_bytes": cluster_bytes,
        }
    finally:
        for thread in profiles:
            thread.join(timeout=PROFILE_SECONDS + 60)
        stop.set()
        if agent is not None:
            agent.stop()
        if ctl is not None:
            ctl.stop()
        delete_netns(host_netns)
        delete_bench_objects(bulk, namespaces)


def control_plane(cluster: SandboxCluster) -> dict[str, ProcessUsage]:
    """The sandbox's kube-apiserver and etcd processes, by name."""
    found = {}
    for pid in tagged_pids(cluster.name):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("kube-apiserver", "etcd"):
            found[name] = ProcessUsage(pid)
    return found


def _spec_writes(ctl: Component) -> float:
    samples = ctl.metrics()
    return sum(
        value
        for key, value in samples.items()
        if key.startswith("ambient_cni_controller_spec_writes_total{")
    )


def _agent_received(agent: Component) -> tuple[float, float]:
    samples = agent.metrics()
    return (
        samples.get("ambient_cni_agent_watch_objects_total", 0.0),
        samples.get("ambient_cni_agent_watch_bytes_total", 0.0),
    )
