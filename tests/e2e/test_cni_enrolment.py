"""istio-cni in every node's chain, the agent answering it: a pod in an ambient namespace is
redirected before its process starts, so its very first connection goes through ztunnel;
with the agent away, such a pod waits and pods outside the mesh start."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni_sandbox import cni as cni_chain
from ambient_cni_sandbox.binaries import PLUGIN_BINARY
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.components import CNI_EXCLUDED, Mesh, uninstall_cni

UNTAINTING_USER = "ambient-cni-controller-untaint"

# The client's process makes its one call the moment it starts, and exits.
CALL_AT_ONCE = (
    "import sys, urllib.request\n"
    "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
)


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster) -> Iterator[Mesh]:
    running = Mesh(
        sandbox,
        "--drift-interval=2",
        cni=True,
        controller_args=["--untaint-nodes"],
        # Its own user: the audit log then tells its node patches from the default
        # controller's, which never writes nodes (test_controller.py).
        controller_kubeconfig=sandbox.user_kubeconfig(UNTAINTING_USER, groups="system:masters"),
    )
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
    sandbox: SandboxCluster,
    namespace: str,
    name: str,
    server: dict[str, Any],
    *,
    scheduled: bool = False,
) -> None:
    """On node-1: bound there at once, or (`scheduled`) placed there by the scheduler."""
    sandbox.create_pod(
        namespace,
        name,
        node=None if scheduled else "node-1",
        node_selector={"kubernetes.io/hostname": "node-1"} if scheduled else None,
        command=[sys.executable, "-c", CALL_AT_ONCE, f"http://{pod_ip(server)}:8080/"],
        restart_policy="Never",
    )


def finished(
    sandbox: SandboxCluster, namespace: str, name: str, *, phases: tuple[str, ...] = ("Succeeded",)
) -> dict[str, Any]:
    return sandbox.wait_pod(
        namespace,
        name,
        lambda p: p["status"].get("phase") in phases,
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
    installer = mesh.installers["node-1"]
    installer.stop()
    uninstall_cni(sandbox, "node-1")
    try:
        start_client(sandbox, ambient, "unguarded", server)
        # Its call goes direct, or fails when the spec's redirection lands in the middle of
        # it, before ztunnel has taken the pod (the in-pod mode's own moment): either way,
        # not ztunnel's to see.
        finished(sandbox, ambient, "unguarded", phases=("Succeeded", "Failed"))
        assert relayed(mesh, ambient, "unguarded") == []
    finally:
        installer.start()


def condition(mesh: Mesh, node: str, kind: str) -> tuple[str, str, str] | None:
    status = (mesh.anc(node) or {}).get("status") or {}
    for found in status.get("conditions") or []:
        if found["type"] == kind:
            return found["status"], found["reason"], found["message"]
    return None


def chain(mesh: Mesh, node: str) -> list[str]:
    conflist = mesh.node_cni[node].conf_dir / cni_chain.PRIMARY_CONFIG
    return [p["type"] for p in json.loads(conflist.read_text())["plugins"]]


def test_a_conflist_the_primary_cni_rewrites_is_chained_again_at_once(
    sandbox: SandboxCluster, mesh: Mesh, ambient: str
) -> None:
    node_cni = mesh.node_cni["node-1"]
    conflist = node_cni.conf_dir / cni_chain.PRIMARY_CONFIG
    assert chain(mesh, "node-1") == ["bridge", PLUGIN_BINARY]
    # What a primary CNI does when it starts: its own file, written whole.
    conflist.write_text(
        json.dumps(
            cni_chain.primary_conflist(sandbox.state.topology.node("node-1"), node_cni.ipam_dir)
        )
    )
    wait_for(
        "istio-cni chained again",
        lambda: chain(mesh, "node-1") == ["bridge", PLUGIN_BINARY],
        timeout=2,
    )
    sandbox.create_pod(ambient, "server", node="node-2", port=8080)
    server = sandbox.wait_running(ambient, "server")
    start_client(sandbox, ambient, "after", server)
    finished(sandbox, ambient, "after")
    assert [c["direction"] for c in relayed(mesh, ambient, "after")] == ["outbound"]


def test_stopping_install_cni_leaves_it_installed_and_uninstall_leaves_nothing(
    sandbox: SandboxCluster, mesh: Mesh
) -> None:
    node_cni = mesh.node_cni["node-1"]
    installer = mesh.installers["node-1"]
    conflist = node_cni.conf_dir / cni_chain.PRIMARY_CONFIG
    installed = ("True", "Installed", f"istio-cni is chained in {conflist}")
    assert condition(mesh, "node-1", "CniPluginInstalled") == installed
    installer.stop()  # an upgrade: new pods must keep waiting for the agent
    try:
        assert (node_cni.bin_dir / PLUGIN_BINARY).exists()
        assert chain(mesh, "node-1") == ["bridge", PLUGIN_BINARY]
        assert condition(mesh, "node-1", "CniPluginInstalled") == installed
        uninstall_cni(sandbox, "node-1")
        assert not (node_cni.bin_dir / PLUGIN_BINARY).exists()
        assert chain(mesh, "node-1") == ["bridge"]
        assert sorted(p.name for p in node_cni.conf_dir.iterdir()) == [cni_chain.PRIMARY_CONFIG]
        # The node says so: pods starting now would not be redirected in time.
        wait_for(
            "node-1 not Ready without the plugin",
            lambda: (condition(mesh, "node-1", "Ready") or ("",))[0] == "False",
        )
        assert condition(mesh, "node-1", "CniPluginInstalled") == (
            "False",
            "NotInstalled",
            "install-cni has not reported (running?)",
        )
    finally:
        installer.start()
    wait_for(
        "node-1 Ready again", lambda: (condition(mesh, "node-1", "Ready") or ("",))[0] == "True"
    )


def sandbox_failures(sandbox: SandboxCluster, namespace: str, pod: str) -> list[dict[str, Any]]:
    return sandbox.pod_events(namespace, pod, "FailedCreatePodSandBox")


def test_during_an_upgrade_an_ambient_pod_waits_then_starts_redirected_and_excluded_ones_start(
    sandbox: SandboxCluster, mesh: Mesh, ambient: str
) -> None:
    """An upgrade replaces the agent's pod: agent and install-cni are both away a while."""
    sandbox.create_pod(ambient, "server", node="node-2", port=8080)
    server = sandbox.wait_running(ambient, "server")
    outside = f"outside-{uuid.uuid4().hex[:8]}"
    mesh.installers["node-1"].stop()
    mesh.agents["node-1"].stop()
    try:
        start_client(sandbox, ambient, "during", server)
        sandbox.create_pod(CNI_EXCLUDED[0], outside, node="node-1")
        failures = wait_for(
            "the plugin to hold the pod", lambda: sandbox_failures(sandbox, ambient, "during")
        )
        assert "the node agent did not answer" in failures[0]["message"]
        sandbox.wait_running(CNI_EXCLUDED[0], outside)
        pod = sandbox.pod(ambient, "during") or {}
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == (
            "ContainerCreating"
        )
    finally:
        sandbox.delete_pod(CNI_EXCLUDED[0], outside, grace=0)
        mesh.agents["node-1"].start(timeout=60)
        mesh.installers["node-1"].start()

    client = finished(sandbox, ambient, "during")
    outbound = [c for c in relayed(mesh, ambient, "during") if c["direction"] == "outbound"]
    assert len(outbound) == 1, "its first and only call went through ztunnel"
    assert outbound[0]["src"].startswith(pod_ip(client) + ":")


def test_a_tainted_node_takes_pods_once_its_agent_is_ready_and_they_start_redirected(
    sandbox: SandboxCluster, mesh: Mesh, ambient: str
) -> None:
    sandbox.create_pod(ambient, "server", node="node-2", port=8080)
    server = sandbox.wait_running(ambient, "server")
    not_ready = {"key": names.NOT_READY_TAINT_KEY, "effect": "NoSchedule"}
    before = sandbox.node_taints("node-1")
    mesh.agents["node-1"].stop()
    try:
        assert condition(mesh, "node-1", "Ready") == (
            "False",
            "AgentStopped",
            "the node agent is stopped; new pods on this node wait for it",
        )
        # As a node pool registers a new (or rebooted) node.
        sandbox.set_node_taints("node-1", [*before, not_ready])
        start_client(sandbox, ambient, "early", server, scheduled=True)
        waiting = sandbox.wait_pod(
            ambient,
            "early",
            lambda p: any(
                c["type"] == "PodScheduled" and c["status"] == "False"
                for c in p["status"].get("conditions") or []
            ),
            "to be held off the tainted node",
        )
        assert "untolerated taint {cni.istio.io/not-ready: }" in str(waiting["status"])
        assert not waiting["spec"].get("nodeName")
        assert not_ready in sandbox.node_taints("node-1")  # not Ready: the taint stays
    finally:
        mesh.agents["node-1"].start(timeout=60)
        try:
            wait_for(
                "the controller to take the taint off",
                lambda: sandbox.node_taints("node-1") == before,
                timeout=30,
            )
        finally:
            sandbox.set_node_taints("node-1", before)  # whatever happened, as it was
    client = finished(sandbox, ambient, "early")
    assert client["spec"]["nodeName"] == "node-1"
    outbound = [c for c in relayed(mesh, ambient, "early") if c["direction"] == "outbound"]
    assert len(outbound) == 1, "its first and only call went through ztunnel"
    assert outbound[0]["src"].startswith(pod_ip(client) + ":")
