"""istio-cni in every node's chain, the agent answering it: a pod in an ambient namespace is
redirected before its process starts, so its very first connection goes through ztunnel;
with the agent away, such a pod waits and pods outside the mesh start."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni.kube import raw
from ambient_cni_sandbox import cni as cni_chain
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.components import CNI_EXCLUDED, Mesh

# The client's process makes its one call the moment it starts, and exits.
CALL_AT_ONCE = (
    "import sys, urllib.request\n"
    "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
)


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster) -> Iterator[Mesh]:
    running = Mesh(sandbox, "--drift-interval=2", cni=True)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def ambient(sandbox: SandboxCluster, namespace: str) -> str:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    return namespace


def start_client(
    sandbox: SandboxCluster, namespace: str, name: str, server: dict[str, Any]
) -> None:
    sandbox.create_pod(
        namespace,
        name,
        node="node-1",
        command=[sys.executable, "-c", CALL_AT_ONCE, f"http://{pod_ip(server)}:8080/"],
        restart_policy="Never",
    )


def finished(sandbox: SandboxCluster, namespace: str, name: str) -> dict[str, Any]:
    return sandbox.wait_pod(
        namespace,
        name,
        lambda p: p["status"].get("phase") == "Succeeded",
        "to make its call and exit",
        timeout=60,
    )


def relayed(mesh: Mesh, namespace: str, name: str) -> list[dict[str, Any]]:
    """What node-1's ztunnel relayed for the pod."""
    return [c for c in mesh.connections("node-1") if c["pod"] == f"{namespace}/{name}"]


def test_a_new_pods_first_connection_goes_through_ztunnel_and_without_the_plugin_not(
    sandbox: SandboxCluster, mesh: Mesh, ambient: str
) -> None:
    sandbox.create_pod(ambient, "server", node="node-2", port=8080)
    server = sandbox.wait_running(ambient, "server")

    start_client(sandbox, ambient, "first", server)
    client = finished(sandbox, ambient, "first")
    outbound = [c for c in relayed(mesh, ambient, "first") if c["direction"] == "outbound"]
    assert len(outbound) == 1, "its one and only call went through ztunnel"
    assert outbound[0]["src"].startswith(pod_ip(client) + ":")
    assert outbound[0]["dst"] == f"{pod_ip(server)}:8080"

    # The same pod on a node whose chain lacks the plugin: redirected only later, by the
    # controller's spec, so its first call is not ztunnel's to see.
    cni_chain.unchain_istio_cni(mesh.node_cni["node-1"])
    try:
        start_client(sandbox, ambient, "unguarded", server)
        finished(sandbox, ambient, "unguarded")
        assert relayed(mesh, ambient, "unguarded") == []
    finally:
        cni_chain.chain_istio_cni(
            mesh.node_cni["node-1"], Path(sandbox.state.cni_bin_dir), CNI_EXCLUDED
        )


def sandbox_failures(sandbox: SandboxCluster, namespace: str, pod: str) -> list[dict[str, Any]]:
    events = raw(sandbox.core.list_namespaced_event(namespace, _preload_content=False))
    return [
        e
        for e in events["items"]
        if e["involvedObject"]["name"] == pod and e["reason"] == "FailedCreatePodSandBox"
    ]


def test_with_the_agent_away_an_ambient_pod_waits_and_an_excluded_one_starts(
    sandbox: SandboxCluster, mesh: Mesh, ambient: str
) -> None:
    outside = f"outside-{uuid.uuid4().hex[:8]}"
    mesh.agents["node-1"].stop()
    try:
        sandbox.create_pod(ambient, "web", node="node-1", port=8080)
        sandbox.create_pod(CNI_EXCLUDED[0], outside, node="node-1")
        failures = wait_for(
            "the plugin to hold web", lambda: sandbox_failures(sandbox, ambient, "web")
        )
        assert "the node agent did not answer" in failures[0]["message"]
        sandbox.wait_running(CNI_EXCLUDED[0], outside)
        pod = sandbox.pod(ambient, "web") or {}
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == (
            "ContainerCreating"
        )
    finally:
        sandbox.delete_pod(CNI_EXCLUDED[0], outside, grace=0)
        mesh.agents["node-1"].start(timeout=60)

    sandbox.wait_running(ambient, "web", timeout=60)
    wait_for(
        "web Enrolled",
        lambda: (mesh.workload("node-1", "web") or {}).get("state") == "Enrolled",
    )
    assert sandbox.pod_annotation(ambient, "web", names.REDIRECTION_ANNOTATION) == "enabled"
