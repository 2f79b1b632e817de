"""Benchmark 1 and 2: N pods enter and leave the mesh on one node, against the
per-rule way and the iptables-restore floor, on the same pods in the same run.

The pods are API objects on a node no kubelet runs, each with a named network
namespace holding its IP; the real node agent applies the spec, and a ZDS peer
acks at once, so the agent's own cost is what is measured.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ambient_cni.api import names
from ambient_cni.api.models import AmbientNodeConfigSpec, RedirectMode, Workload, ZtunnelRef
from ambient_cni.dataplane import factory
from ambient_cni.dataplane.interfaces import PodDataplane
from ambient_cni.dataplane.iptables_flavour import detect_flavour
from ambient_cni.dataplane.iptables_rules import pod_ruleset
from ambient_cni.dataplane.libnftables import Nft
from ambient_cni.dataplane.nft_rules import pod_nft_ruleset
from ambient_cni.dataplane.redirection import PodRedirect
from ambient_cni.dataplane.routing import PolicyRouting
from ambient_cni.dataplane.runner import SubprocessRunner
from ambient_cni.kube import MERGE_PATCH, as_body, raw
from ambient_cni.netns import NetnsWorkers, run_in_netns
from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.components import AGENT_USER, Component
from ambient_cni_sandbox.network import create_netns

from .measure import (
    AckingZtunnel,
    ProcessUsage,
    Profile,
    RouteEvents,
    RuleEvents,
    percentiles,
    wait_until,
)
from .objects import (
    BENCH_LABEL,
    NETNS_PREFIX,
    BulkClient,
    create_nodes,
    create_running_pods,
    delete_bench_objects,
    delete_netns_all,
    ensure_crd,
    make_pod_netns,
    wait_default_service_accounts,
)

NODE = "bench-enroll-node"
NAMESPACE = "bench-enroll"
WORKERS = 4  # the agent's default worker count; the baselines get as many threads


def pod_ip(index: int) -> str:
    return f"10.250.{index // 250}.{index % 250 + 1}"


def per_rule_commands(ruleset: str, tool: str) -> list[list[str]]:
    """An iptables-restore input as one `iptables` command per chain and per rule."""
    commands: list[list[str]] = []
    table = ""
    for line in ruleset.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith("ISTIO"):
                commands.append([tool, "-t", table, "-N", chain])
        elif line.startswith(("-A", "-N")):
            commands.append([tool, "-t", table, *shlex.split(line)])
    return commands


# Node mode's ztunnel pod: a namespace behind a veth of its own, as on a kindnet node; named
# like the pods' so the agent's lookup of named namespaces finds it by its address.
ZTUNNEL_IP, ZTUNNEL_PEER = "10.249.255.2", "10.249.255.1"


def one_node_of_pods(cluster: SandboxCluster, bulk: BulkClient, pods: list[str]) -> list[Workload]:
    """The benchmark's node and namespace, with `pods` Running on it (pod i at pod_ip(i)), as
    the workloads a spec lists."""
    ensure_crd(cluster)
    cluster.create_namespace(NAMESPACE, labels={BENCH_LABEL: "true"})
    create_nodes(bulk, [NODE])
    wait_default_service_accounts(bulk, [NAMESPACE])
    made = create_running_pods(
        bulk, lambda _: NAMESPACE, [(name, NODE, pod_ip(i)) for i, name in enumerate(pods)]
    )
    return [
        Workload(
            uid=p["metadata"]["uid"],
            name=p["metadata"]["name"],
            namespace=NAMESPACE,
            ips=[p["status"]["podIP"]],
        )
        for p in made
    ]


def create_empty_config(custom: CustomObjectsApi) -> None:
    """The node's AmbientNodeConfig, listing no pod yet."""
    custom.create_cluster_custom_object(
        names.GROUP,
        names.VERSION,
        names.PLURAL,
        as_body(
            {
                "apiVersion": f"{names.GROUP}/{names.VERSION}",
                "kind": names.KIND,
                "metadata": {"name": NODE, "labels": {BENCH_LABEL: "true"}},
                "spec": _spec([]),
            }
        ),
        _preload_content=False,
    )


def _spec(workloads: list[Workload], mode: RedirectMode = "inpod") -> dict[str, Any]:
    spec = AmbientNodeConfigSpec(
        node_name=NODE,
        redirect_mode=mode,
        ztunnel=ZtunnelRef(
            name="ztunnel-bench",
            namespace="istio-system",
            uid="bench",
            ip=ZTUNNEL_IP if mode == "node" else None,
            ready=True,
        ),
        workloads=workloads,
    )
    return spec.to_wire()


def _ztunnel_pod(host_netns: str, name: str) -> None:
    """The ztunnel pod's namespace, joined to the node's by a veth (ptp style)."""
    create_netns(name)
    for command in (
        f"ip -n {host_netns} link add ztveth type veth peer name eth0 netns {name}",
        f"ip -n {host_netns} addr add {ZTUNNEL_PEER}/32 dev ztveth",
        f"ip -n {host_netns} link set ztveth up",
        f"ip -n {host_netns} route add {ZTUNNEL_IP} dev ztveth scope link",
        f"ip -n {name} addr add {ZTUNNEL_IP}/32 dev eth0",
        f"ip -n {name} link set eth0 up",
        f"ip -n {name} link set lo up",
        f"ip -n {name} route add {ZTUNNEL_PEER} dev eth0 scope link",
    ):
        subprocess.run(shlex.split(command), check=True, capture_output=True)


BACKENDS = ("iptables-nft", "nftables")


def run(
    cluster: SandboxCluster,
    pods: int = 250,
    backends: tuple[str, ...] = BACKENDS,
    profile: Path | None = None,
) -> dict[str, Any]:
    """With `profile` (a directory), each agent is also sampled by py-spy while it enrols and
    while it un-enrols: the stacks go there, a summary into the results (and the sampling
    slows the agent down: a profiled run's times are not the benchmark's)."""
    bulk = BulkClient(cluster)
    custom = bulk.custom()
    flavour = detect_flavour(SubprocessRunner())
    host_netns = f"{NETNS_PREFIX}host"
    ztunnel_netns = f"{NETNS_PREFIX}pod-ztunnel"
    pod_netns = [f"{NETNS_PREFIX}pod-{i:04d}" for i in range(pods)]
    socket_path = Path(cluster.state.state_dir) / "bench" / "ztunnel.sock"
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        workloads = one_node_of_pods(cluster, bulk, [f"pod-{i:04d}" for i in range(pods)])
        create_netns(host_netns)
        paths = make_pod_netns([(pod_netns[i], pod_ip(i)) for i in range(pods)])
        create_empty_config(bulk.custom())
        measured = {
            backend: _agent_run(
                cluster,
                custom=custom,
                backend=backend,
                workloads=workloads,
                paths=paths,
                pod_netns=pod_netns,
                host_netns=host_netns,
                socket_path=socket_path,
                profile=profile,
            )
            for backend in backends
        }
        # The legacy node mode on the same pods, last: nothing in their namespaces.
        _ztunnel_pod(host_netns, ztunnel_netns)
        node_mode = _agent_run(
            cluster,
            custom=custom,
            backend="iptables-nft",
            workloads=workloads,
            paths=paths,
            pod_netns=pod_netns,
            host_netns=host_netns,
            socket_path=socket_path,
            profile=None,
            mode="node",
        )
        cleanup = factory.build(flavour.backend).pods
        naive = _timed_per_pod(paths.values(), lambda: _per_rule(flavour.name))
        _remove_all(cleanup, paths.values())
        floor = _timed_per_pod(paths.values(), lambda: _bare_restore(flavour.name))
        _remove_all(cleanup, paths.values())
        in_process = _in_process_floor(list(paths.values()))
        _remove_all(factory.build("nftables").pods, paths.values())
        for result in measured.values():
            result["ratio_per_rule_over_ours"] = naive / result["enroll_kernel_wall_s"]
            result["ratio_ours_over_restore_floor"] = result["enroll_kernel_wall_s"] / floor
            result["ratio_ours_over_in_process_floor"] = result["enroll_kernel_wall_s"] / in_process
        return {
            "pods": pods,
            "workers": WORKERS,
            "iptables_flavour": flavour.backend,
            "backends": measured,
            "node_mode": node_mode,
            "per_rule_wall_s": naive,
            "per_rule_processes_per_pod": len(
                per_rule_commands(pod_ruleset(PodRedirect()), "iptables")
            ),
            "floor_wall_s": floor,
            "in_process_floor_wall_s": in_process,
        }
    finally:
        delete_netns_all([*pod_netns, ztunnel_netns, host_netns])
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(
                names.GROUP, names.VERSION, names.PLURAL, NODE, _preload_content=False
            )
        delete_bench_objects(bulk, [NAMESPACE])


def _agent_run(
    cluster: SandboxCluster,
    *,
    custom: Any,
    backend: str,
    workloads: list[Workload],
    paths: dict[str, Path],
    pod_netns: list[str],
    host_netns: str,
    socket_path: Path,
    profile: Path | None,
    mode: RedirectMode = "inpod",
) -> dict[str, Any]:
    """One agent with this backend enrols every pod, then un-enrols them. In node mode a
    pod is in the kernel when its route in the node's table 100 is."""
    agent: Component | None = None
    ztunnel: AckingZtunnel | None = None
    events: RuleEvents | RouteEvents | None = None
    try:
        if mode == "node":
            _patch_spec(custom, [], mode)
        agent = Component(
            cluster,
            f"bench-agent-{backend}" if mode == "inpod" else "bench-agent-node-mode",
            [
                "agent",
                f"--node={NODE}",
                f"--kubeconfig={cluster.user_kubeconfig(AGENT_USER, groups='system:masters')}",
                f"--zds-socket={socket_path}",
                f"--host-netns=/run/netns/{host_netns}",
                "--netns-dir=/run/netns",
                f"--netns-prefix={NETNS_PREFIX}pod-",
                "--drift-interval=600",
                f"--workers={WORKERS}",
                f"--backend={backend}",
                "--kubelet-uid=0",
            ],
        )
        agent.start(timeout=60)
        ztunnel = AckingZtunnel(socket_path)
        started_agent = agent
        wait_until(
            "ztunnel connected",
            lambda: started_agent.metric("ambient_cni_agent_ztunnel_connected") == 1,
            timeout=30,
        )
        usage = ProcessUsage(agent.pid or 0)
        pods = len(workloads)
        # What each pod's arrival in the kernel is keyed by: its netns, or (node mode) its IP.
        keys = pod_netns
        if mode == "node":
            events = RouteEvents(Path("/run/netns") / host_netns, 100)
            keys = [w.ips[0] for w in workloads]
        else:
            events = RuleEvents(paths)

        def status() -> dict[str, Any]:
            obj = raw(
                custom.get_cluster_custom_object(
                    names.GROUP, names.VERSION, names.PLURAL, NODE, _preload_content=False
                )
            )
            return dict(obj.get("status") or {})

        spec_written: list[float] = []  # seconds the API server took to take each spec

        def patch_workloads(entries: list[Workload]) -> float:
            started = time.monotonic()
            _patch_spec(custom, entries, mode)
            spec_written.append(time.monotonic() - started)
            return started

        if mode == "node":
            wait_until(
                "the node's side of node mode",
                lambda: any(
                    c["type"] == "TunnelsReady" and c["status"] == "True"
                    for c in status().get("conditions") or []
                ),
                timeout=30,
            )

        writes = "ambient_cni_agent_status_writes_total"
        writes_before = agent.metric(writes)
        profiles: dict[str, Any] = {}

        def profiled(phase: str) -> Profile | None:
            if profile is None:
                return None
            profile.mkdir(parents=True, exist_ok=True)
            return Profile(started_agent.pid or 0, profile / f"agent-{backend}-{phase}.folded")

        profiler = profiled("enrol")
        cpu_before = usage.cpu_seconds()
        t_enroll = patch_workloads(workloads)
        wait_until(
            f"{pods} pods Enrolled",
            lambda: status().get("enrolled") == pods,
            timeout=60 + pods,
            interval=0.05,
        )
        enroll_wall = time.monotonic() - t_enroll
        enroll_cpu = usage.cpu_seconds() - cpu_before
        if profiler is not None:
            profiles["enrol"] = profiler.stop()
        enroll_status_writes = agent.metric(writes) - writes_before
        writes_before = agent.metric(writes)
        enroll_latency = [events.added[n] - t_enroll for n in keys if n in events.added]
        enroll_kernel_wall = max(enroll_latency, default=0.0)

        profiler = profiled("unenrol")
        cpu_before = usage.cpu_seconds()
        t_leave = patch_workloads([])
        wait_until(
            "every pod un-enrolled",
            lambda: (s := status()).get("enrolled") == 0 and not s.get("workloads"),
            timeout=60 + pods,
            interval=0.05,
        )
        leave_wall = time.monotonic() - t_leave
        leave_cpu = usage.cpu_seconds() - cpu_before
        if profiler is not None:
            profiles["unenrol"] = profiler.stop()
        leave_status_writes = agent.metric(writes) - writes_before
        leave_latency = [events.removed[n] - t_leave for n in keys if n in events.removed]
        peak_rss = usage.peak_rss_mib()
        return {
            "backend": backend,
            "mode": mode,
            "enroll_wall_s": enroll_wall,
            "enroll_kernel_wall_s": enroll_kernel_wall,
            "enroll_kernel_latency_s": percentiles(enroll_latency),
            "enroll_spec_write_s": spec_written[0],
            "enroll_seen_in_kernel": len(enroll_latency),
            "enroll_agent_cpu_s": enroll_cpu,
            "enroll_status_writes": enroll_status_writes,
            "unenroll_wall_s": leave_wall,
            "unenroll_kernel_latency_s": percentiles(leave_latency),
            "unenroll_spec_write_s": spec_written[1],
            "unenroll_agent_cpu_s": leave_cpu,
            "unenroll_status_writes": leave_status_writes,
            "agent_peak_rss_mib": peak_rss,
            # What went wrong on the way, if anything (a retried pod shows as an outlier).
            "agent_warnings": _warnings(agent.log_path),
            **({"profiles": profiles} if profiles else {}),
        }
    finally:
        if events is not None:
            events.close()
        if ztunnel is not None:
            ztunnel.close()
        if agent is not None:
            agent.stop()


def _patch_spec(custom: Any, entries: list[Workload], mode: RedirectMode) -> None:
    answer = custom.patch_cluster_custom_object(
        names.GROUP,
        names.VERSION,
        names.PLURAL,
        NODE,
        as_body({"spec": _spec(entries, mode)}),
        _content_type=MERGE_PATCH,
        _preload_content=False,
    )
    answer.read()


def _warnings(log: Path, most: int = 10) -> list[str]:
    """The agent's warning and error messages, each once, in order."""
    seen: dict[str, None] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("severity") in ("warning", "error"):
            seen.setdefault(str(entry.get("message")), None)
    return list(seen)[:most]


def _in_process_floor(paths: list[Path]) -> float:
    """The floor of an in-process backend: enter the netns, one libnftables transaction of
    the same ruleset, the netlink rule and route; nothing else (no read-back, no API)."""
    ruleset = pod_nft_ruleset([PodRedirect()])
    workers = NetnsWorkers(WORKERS, name="floor")
    routing = PolicyRouting()

    def apply() -> None:
        Nft().run(ruleset)
        routing.ensure(None, [4])

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda path: workers.run(path, apply), paths))
    elapsed = time.monotonic() - started
    workers.close()
    return elapsed


def _per_rule(flavour: str) -> None:
    """What proxy-init style code does: one iptables process per chain and rule."""
    for command in per_rule_commands(pod_ruleset(PodRedirect()), f"iptables-{flavour}"):
        subprocess.run(command, check=True, capture_output=True)
    PolicyRouting().ensure(None, [4])  # here: the caller is inside the pod's netns


EMPTY_TABLES = "*mangle\nCOMMIT\n*nat\nCOMMIT\n*raw\nCOMMIT\n"


def _bare_restore(flavour: str) -> None:
    """The floor: one iptables-restore that changes nothing, then the netlink calls alone."""
    subprocess.run(
        [f"iptables-{flavour}-restore", "--noflush"],
        input=EMPTY_TABLES,
        text=True,
        check=True,
        capture_output=True,
    )
    PolicyRouting().ensure(None, [4])


def _timed_per_pod(paths: Any, work: Any) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda path: run_in_netns(path, work), list(paths)))
    return time.monotonic() - started


def _remove_all(pods: PodDataplane, paths: Any) -> None:
    for path in paths:
        pods.remove(Path(path), families=(4,))
