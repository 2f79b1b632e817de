"""`ambient-cni demo`: a two-node sandbox and a pod-to-pod call across nodes."""

from __future__ import annotations

import sys

from . import lifecycle
from .cluster import SandboxCluster, pod_ip, wait_for

NAMESPACE = "demo"


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run_demo(name: str, *, keep: bool = False) -> int:
    _step(f"bringing up sandbox {name!r} with 2 nodes")
    lifecycle.up(name, 2)
    try:
        cluster = SandboxCluster.open(name)
        _step(f"creating namespace {NAMESPACE} with one echo pod on each node")
        cluster.delete_namespace(NAMESPACE)  # from an earlier --keep run
        wait_for(
            f"namespace {NAMESPACE} to be gone",
            lambda: cluster.namespace(NAMESPACE) is None,
            timeout=60,
        )
        cluster.create_namespace(NAMESPACE)
        for index, node in enumerate(cluster.node_names[:2], start=1):
            cluster.create_pod(NAMESPACE, f"echo-{index}", node=node)
        client = cluster.wait_running(NAMESPACE, "echo-1")
        server = cluster.wait_running(NAMESPACE, "echo-2")
        print(cluster.kubectl("get", "nodes,pods", "-A", "-o", "wide").stdout, end="")

        _step(
            f"echo-1 ({pod_ip(client)} on {client['spec']['nodeName']}) calls "
            f"echo-2 ({pod_ip(server)} on {server['spec']['nodeName']}) over HTTP"
        )
        reply = cluster.http_get(client, pod_ip(server))
        print(f"HTTP {reply.status}: {reply.body}")
        if reply.status != 200 or reply.json().get("pod") != "echo-2":
            print("unexpected answer: the call did not reach echo-2", file=sys.stderr)
            return 1
        print(
            f"answered by echo-2, which saw the caller as {reply.json()['client']} "
            "(echo-1's own address: no NAT between nodes)"
        )
    finally:
        if keep:
            _step(
                f"leaving sandbox {name} running; use it with: "
                f"eval $(ambient-cni sandbox env --name {name})"
            )
        else:
            _step(f"tearing down sandbox {name}")
            lifecycle.down(name)
    return 0
