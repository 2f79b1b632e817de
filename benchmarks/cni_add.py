"""Benchmark 4: CNI ADD through a node's real chain, as the runtime calls it, one pod at a
time: the `bridge` network alone; with istio-cni for a pod outside the mesh (the agent
answers at once); with istio-cni for a pod in an ambient namespace (the agent enrols it
before it answers). The difference of the last two is how long enrolment delays a pod's
start. Also the plugin binary's size and the cost of one call that needs no agent.

The benchmark plays the container runtime: it makes each pod's network namespace and
runs `cni-run` from node-1's namespace, like the kubelet. The pods are API objects bound
to a node no kubelet runs, so nothing else starts them."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from ambient_cni.api import names
from ambient_cni_sandbox import network
from ambient_cni_sandbox.binaries import PLUGIN_BINARY
from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.cni import CniRuntime, SandboxPod
from ambient_cni_sandbox.components import CNI_EXCLUDED, Mesh, uninstall_cni
from ambient_cni_sandbox.state import paths_for

from .measure import percentiles, wait_until

NODE = "node-1"
GHOST = "bench-no-kubelet"  # pods bound here are started by nobody but this benchmark
OUTSIDE, INSIDE = "bench-cni-out", "bench-cni-in"


def netns_name(cluster: SandboxCluster, uid: str) -> str:
    """Under the sandbox's prefix, so `sandbox down` removes any a crash leaves."""
    return f"{cluster.state.topology.prefix}cnibench-{uid[:12]}"


class _Runtime:
    """ADD and DEL of throwaway pod sandboxes on node-1, timed."""

    def __init__(self, cluster: SandboxCluster):
        self.cluster = cluster
        node = cluster.state.topology.node(NODE)
        self.cni = CniRuntime(
            paths_for(cluster.name).node_cni(NODE),
            node,
            Path(cluster.state.cni_bin_dir) / "cni-run",
        )
        self.made: list[SandboxPod] = []

    def add(self, namespace: str, name: str, uid: str) -> float:
        pod = SandboxPod(namespace, name, uid, netns_name(self.cluster, uid))
        network.create_netns(pod.netns)
        self.made.append(pod)
        started = time.perf_counter()
        self.cni.add(pod)
        return time.perf_counter() - started

    def delete_all(self) -> None:
        for pod in self.made:
            self.cni.delete(pod)
            network.delete_netns(pod.netns)
        self.made.clear()


def _api_pods(
    cluster: SandboxCluster,
    namespace: str,
    count: int,
    *,
    prefix: str = "pod",
    sidecar: bool = False,
) -> list[tuple[str, str]]:
    """`count` pods bound to a node without a kubelet: (name, uid) each; with `sidecar`, as
    Istio's injector leaves a pod (an istio-proxy container, its status annotation)."""
    made = []
    for i in range(count):
        name = f"{prefix}-{i:03d}"
        pod = cluster.create_pod(namespace, name, node=GHOST, sidecar={} if sidecar else None)
        made.append((name, pod["metadata"]["uid"]))
    return made


def _captured(netns: str) -> bool:
    """Whether a sidecar's capture is in the namespace, in either backend's form (the agent's
    `auto` backend follows what the node already holds)."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
        )

    native = run("nft", "list", "table", "inet", "istio-proxy-nat").returncode == 0
    return native or "ISTIO_INBOUND" in run("iptables-save", "-t", "nat").stdout


def _plugin_call_cost(cluster: SandboxCluster, calls: int) -> list[float]:
    """One istio-cni ADD that needs no agent (an excluded namespace), exec to exit."""
    plugin = Path(cluster.state.cni_bin_dir) / PLUGIN_BINARY
    config = json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": PLUGIN_BINARY,
            "exclude_namespaces": list(CNI_EXCLUDED),
        }
    )
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "bench",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_NETNS_OVERRIDE": "1",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(plugin.parent),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={CNI_EXCLUDED[0]};K8S_POD_NAME=x",
    }
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        subprocess.run(
            [str(plugin)], input=config, env=env, capture_output=True, check=True, text=True
        )
        times.append(time.perf_counter() - started)
    return times


def run(cluster: SandboxCluster, pods: int = 50) -> dict[str, Any]:
    mesh = Mesh(cluster, cni=True)
    runtime = _Runtime(cluster)
    try:
        mesh.start()
        cluster.create_namespace(OUTSIDE)
        cluster.create_namespace(INSIDE, {names.DATAPLANE_MODE_LABEL: "ambient"})

        # 1. The primary network alone: install-cni stopped and undone on node-1.
        mesh.installers[NODE].stop()
        uninstall_cni(cluster, NODE)
        bridge_alone = [runtime.add(OUTSIDE, f"alone-{i}", str(uuid.uuid4())) for i in range(pods)]
        runtime.delete_all()
        mesh.installers[NODE].start()

        # 2. and 3. istio-cni chained last: a pod outside the mesh, then one inside. The pods
        # are made just before (the pod GC deletes pods of unknown nodes after a while).
        out_of_mesh = [runtime.add(OUTSIDE, n, uid) for n, uid in _api_pods(cluster, OUTSIDE, pods)]
        runtime.delete_all()
        inside = _api_pods(cluster, INSIDE, pods)
        in_mesh = [runtime.add(INSIDE, name, uid) for name, uid in inside]
        # The answer came after the annotation, the last step of an enrolment.
        enrolled = sum(
            1
            for name, _ in inside
            if cluster.pod_annotation(INSIDE, name, names.REDIRECTION_ANNOTATION) == "enabled"
        )
        runtime.delete_all()

        # 4. A pod with an injected sidecar: its capture in its netns before the answer.
        with_sidecar = _api_pods(cluster, OUTSIDE, pods, prefix="side", sidecar=True)
        sidecar_adds = [runtime.add(OUTSIDE, name, uid) for name, uid in with_sidecar]
        captured = sum(1 for pod in runtime.made if _captured(pod.netns))
        runtime.delete_all()

        plugin = Path(cluster.state.cni_bin_dir) / PLUGIN_BINARY
        call = _plugin_call_cost(cluster, pods)
        alone, out, into = percentiles(bridge_alone), percentiles(out_of_mesh), percentiles(in_mesh)
        return {
            "pods": pods,
            "add_bridge_alone_s": alone,
            "add_outside_mesh_s": out,
            "add_inside_mesh_s": into,
            "add_sidecar_s": percentiles(sidecar_adds),
            "captured_at_add": captured,
            "enrolled_at_add": enrolled,
            "start_delay_by_enrolment_p50_s": into["p50"] - out["p50"],
            "plugin_call_s": percentiles(call),
            "plugin_binary_bytes": plugin.stat().st_size,
        }
    finally:
        runtime.delete_all()
        for namespace in (OUTSIDE, INSIDE):
            # No kubelet confirms these pods' deletion: they go at once, or never.
            for pod in cluster.pods(namespace):
                cluster.delete_pod(namespace, pod["metadata"]["name"], grace=0)
            cluster.delete_namespace(namespace)
        wait_until(
            "the benchmark's namespaces gone",
            lambda: all(cluster.namespace(ns) is None for ns in (OUTSIDE, INSIDE)),
            60,
        )
        mesh.stop()
