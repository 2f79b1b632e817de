"""The node agent with the controller and ztunnel stand-ins: real rules, real traffic, real API."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni.netns import netns_inode
from ambient_cni_sandbox import components
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.components import Mesh
from tests.e2e.conftest import agent_args
from tests.e2e.kernel import kernel_state, probe_members, run_in

REPO = Path(__file__).resolve().parents[2]
SYSTEM = names.DEFAULT_SYSTEM_NAMESPACE
REDIRECTION = names.REDIRECTION_ANNOTATION


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster, backend: str) -> Iterator[Mesh]:
    # Agents that apply in-pod mode only, as ones from before node mode: a spec asking for
    # node mode shows how a mode an agent lacks is refused.
    running = Mesh(sandbox, "--drift-interval=1", "--redirect-modes=inpod", *agent_args(backend))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def wait_enabled(cluster: SandboxCluster, namespace: str, *pods: str) -> None:
    wait_for(
        f"{', '.join(pods)} enabled",
        lambda: all(cluster.pod_annotation(namespace, p, REDIRECTION) == "enabled" for p in pods),
    )


def status_counts(mesh: Mesh, node: str) -> tuple[int, int, int, str]:
    status = (mesh.anc(node) or {}).get("status") or {}
    ready = [c["status"] for c in status.get("conditions") or [] if c["type"] == "Ready"]
    return (
        status.get("enrolled", 0),
        status.get("pending", 0),
        status.get("failed", 0),
        (ready or ["?"])[0],
    )


def test_headline_label_redirects_through_both_ztunnels_and_unlabel_leaves_nothing(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    outside = f"{namespace[:40]}-out"
    sandbox.create_namespace(outside)
    try:
        sandbox.create_pod(namespace, "client", node="node-1")
        sandbox.create_pod(namespace, "server", node="node-2")
        sandbox.create_pod(outside, "plain-client", node="node-1")
        sandbox.create_pod(outside, "plain-server", node="node-2")
        before = {
            name: sandbox.wait_running(ns, name)
            for ns, name in (
                (namespace, "client"),
                (namespace, "server"),
                (outside, "plain-client"),
                (outside, "plain-server"),
            )
        }
        client, server = before["client"], before["server"]
        identity = {
            n: (
                p["status"]["containerStatuses"][0]["containerID"],
                netns_inode(sandbox.pod_netns(p)),
            )
            for n, p in before.items()
        }

        sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
        wait_enabled(sandbox, namespace, "client", "server")
        wait_for(
            "status counts",
            lambda: (
                [status_counts(mesh, n) for n in ("node-1", "node-2")] == [(1, 0, 0, "True")] * 2
            ),
        )
        agent_1 = mesh.agents["node-1"]
        assert agent_1.metric('ambient_cni_agent_workloads{state="Enrolled"}') == 1
        assert agent_1.metric("ambient_cni_agent_ztunnel_connected") == 1
        table = sandbox.kubectl("get", "anc").stdout
        assert "READY" in table.splitlines()[0]

        # Mesh pod to mesh pod across nodes: out through node-1's ztunnel, in through node-2's.
        seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
        reply = sandbox.http_get(client, pod_ip(server), 8080, "/meshed")
        assert reply.json()["pod"] == "server"
        # Each stand-in logs a connection once it has closed: wait for both lines.
        out = wait_for(
            "node-1's outbound record",
            lambda: [
                c for c in mesh.connections("node-1")[seen_1:] if c["direction"] == "outbound"
            ],
        )
        inbound = wait_for(
            "node-2's inbound record",
            lambda: [c for c in mesh.connections("node-2")[seen_2:] if c["direction"] == "inbound"],
        )
        assert [(c["pod"], c["dst"]) for c in out] == [
            (f"{namespace}/client", f"{pod_ip(server)}:8080")
        ]
        assert [(c["pod"], c["dst"]) for c in inbound] == [
            (f"{namespace}/server", f"{pod_ip(server)}:8080")
        ]
        assert out[0]["src"].startswith(pod_ip(client) + ":")

        # Outside the mesh: direct, no ztunnel sees it.
        seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
        plain = sandbox.http_get(
            before["plain-client"],
            pod_ip(before["plain-server"]),
            8080,
            "/plain",
            source_port=20001,
        )
        assert plain.json()["pod"] == "plain-server"
        # The client's very socket: a relay would keep its address but not its port.
        assert plain.json()["client"] == f"{pod_ip(before['plain-client'])}:20001"
        assert mesh.connections("node-1")[seen_1:] == mesh.connections("node-2")[seen_2:] == []

        sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)
        wait_for(
            "annotations removed",
            lambda: (
                sandbox.pod_annotation(namespace, "client", REDIRECTION) is None
                and sandbox.pod_annotation(namespace, "server", REDIRECTION) is None
            ),
        )
        for name in ("client", "server"):
            assert kernel_state(sandbox, before[name]) == {
                "istio_rules": [],
                "ip_rules": [],
                "table_100": "",
            }
        wait_for(
            "ipsets empty",
            lambda: probe_members(sandbox, "node-1") == probe_members(sandbox, "node-2") == [],
        )
        wait_for(
            "status counts zero",
            lambda: [status_counts(mesh, n)[:3] for n in ("node-1", "node-2")] == [(0, 0, 0)] * 2,
        )

        seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
        direct = sandbox.http_get(client, pod_ip(server), 8080, "/direct", source_port=20002)
        assert direct.json()["client"] == f"{pod_ip(client)}:20002"
        assert mesh.connections("node-1")[seen_1:] == mesh.connections("node-2")[seen_2:] == []
        after = {n: sandbox.pod(ns, n) for ns, n in ((namespace, "client"), (namespace, "server"))}
        for name, pod in after.items():
            assert pod is not None
            assert (
                pod["status"]["containerStatuses"][0]["containerID"],
                netns_inode(sandbox.pod_netns(pod)),
            ) == identity[name]
    finally:
        sandbox.delete_namespace(outside)


# Per backend: how a person flushes our outbound chain, and how the agent then says it.
FLUSH = {
    "iptables-nft": (["iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"], "IPv4 nat: 6 of our rules"),
    "nftables": (
        ["nft", "flush", "chain", "inet", "istio-ambient-nat", "istio-output"],
        "nftables istio-ambient-nat: 10 of our rules",  # both families' (dual stack)
    ),
}


def test_a_chain_flushed_by_hand_is_repaired(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str, backend: str
) -> None:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "victim", node="node-1")
    pod = sandbox.wait_running(namespace, "victim")
    wait_for(
        "enabled",
        lambda: sandbox.pod_annotation(namespace, "victim", REDIRECTION) == "enabled",
    )
    rules = kernel_state(sandbox, pod)["istio_rules"]
    agent = mesh.agents["node-1"]
    counter = 'ambient_cni_agent_repairs_total{kind="rules"}'
    repairs = agent.metric(counter)
    flush, said = FLUSH[backend]
    subprocess.run(["ip", "netns", "exec", sandbox.pod_netns(pod), *flush], check=True)
    # The drift check (every second here) may repair it before it could be read back, so
    # the flush is proven by the repair it caused, counted once.
    wait_for(
        "the drift check to repair it",
        lambda: (
            agent.metric(counter) == repairs + 1
            and kernel_state(sandbox, pod)["istio_rules"] == rules
        ),
        timeout=15,
    )
    # And says so: in its log, a counter, and the pod's status.
    repair = wait_for(
        "lastRepair in status",
        lambda: (mesh.workload("node-1", "victim") or {}).get("lastRepair"),
    )
    assert repair["reason"] == "DriftRepaired"
    assert f"{said} missing" in repair["message"]
    assert agent.metric(counter) == repairs + 1
    assert f"repaired {namespace}/victim: {said} missing" in agent.log_path.read_text()


def test_a_workload_without_a_netns_fails_alone(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    sandbox.create_pod(namespace, "healthy", node="node-2")
    sandbox.create_pod(namespace, "lost", node="node-2")
    lost = sandbox.wait_running(namespace, "lost")
    sandbox.wait_running(namespace, "healthy")
    # The process keeps its namespace, but nothing can find it any more.
    subprocess.run(["ip", "netns", "delete", sandbox.pod_netns(lost)], check=True)
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    wait_for(
        "healthy enabled",
        lambda: sandbox.pod_annotation(namespace, "healthy", REDIRECTION) == "enabled",
    )

    def lost_state() -> dict[str, Any] | None:
        for entry in ((mesh.anc("node-2") or {}).get("status") or {}).get("workloads") or []:
            if entry["name"] == "lost" and entry["state"] == "Failed":
                return dict(entry)
        return None

    entry = wait_for("lost reported Failed", lost_state)
    assert entry["reason"] == "NetnsNotFound"
    assert pod_ip(lost) in entry["message"]
    assert sandbox.pod_annotation(namespace, "lost", REDIRECTION) is None


def test_ztunnel_gone_makes_new_pods_pending_and_its_return_enables_them(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "early", node="node-2")
    sandbox.wait_running(namespace, "early")
    wait_for(
        "early enabled",
        lambda: sandbox.pod_annotation(namespace, "early", REDIRECTION) == "enabled",
    )

    sandbox.delete_pod(SYSTEM, "ztunnel-node-2", grace=0)
    sandbox.wait_pod_gone(SYSTEM, "ztunnel-node-2")

    def ztunnel_condition() -> str:
        status = (mesh.anc("node-2") or {}).get("status") or {}
        found = [
            c["status"] for c in status.get("conditions") or [] if c["type"] == "ZtunnelConnected"
        ]
        return found[0] if found else "?"

    wait_for("ZtunnelConnected=False", lambda: ztunnel_condition() == "False")
    sandbox.create_pod(namespace, "late", node="node-2")
    sandbox.wait_running(namespace, "late")
    wait_for(
        "late pending",
        lambda: sandbox.pod_annotation(namespace, "late", REDIRECTION) == "pending",
    )
    assert (
        sandbox.pod_annotation(namespace, "early", REDIRECTION) == "enabled"
    )  # running pods keep working
    wait_for("status shows it", lambda: status_counts(mesh, "node-2")[1] == 1)

    components.start_ztunnel(sandbox, "node-2")
    wait_for("ZtunnelConnected=True", lambda: ztunnel_condition() == "True")
    wait_for(
        "late enabled after the snapshot",
        lambda: sandbox.pod_annotation(namespace, "late", REDIRECTION) == "enabled",
    )
    wait_for("no pending left", lambda: status_counts(mesh, "node-2")[1] == 0)


def test_a_killed_agent_restarts_without_duplicates_and_reconverges(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "steady", node="node-1")
    pod = sandbox.wait_running(namespace, "steady")
    wait_for(
        "enabled",
        lambda: sandbox.pod_annotation(namespace, "steady", REDIRECTION) == "enabled",
    )
    before = kernel_state(sandbox, pod)
    host_before = probe_members(sandbox, "node-1")

    mesh.agents["node-1"].kill()
    assert kernel_state(sandbox, pod) == before  # a dead agent leaves pods redirected
    assert probe_members(sandbox, "node-1") == host_before
    mesh.agents["node-1"].start(timeout=60)
    wait_for("Ready again", lambda: status_counts(mesh, "node-1")[3] == "True")
    assert kernel_state(sandbox, pod) == before  # the same rules, once each
    assert len(before["ip_rules"]) == 2  # once per family (dual stack)
    assert probe_members(sandbox, "node-1") == host_before
    node_netns = sandbox.state.topology.node("node-1").netns
    # The host's probe rule, once: the jump to ours (iptables), or our two SNAT rules (nft).
    nat = run_in(node_netns, "iptables-save", "-t", "nat")
    host_table = run_in(node_netns, "nft", "list", "table", "inet", "istio-ambient-nat")
    assert (nat.count("-A POSTROUTING -j ISTIO_POSTRT"), host_table.count(" snat ")) in {
        (1, 0),
        (0, 2),
    }
    reply = sandbox.http_get(pod, pod_ip(pod), 8080, "/self")
    assert reply.json()["pod"] == "steady"


def condition(mesh: Mesh, node: str, kind: str) -> tuple[str, str]:
    status = (mesh.anc(node) or {}).get("status") or {}
    for c in status.get("conditions") or []:
        if c["type"] == kind:
            return c["status"], c["reason"]
    return "?", "?"


def test_an_unsupported_redirect_mode_is_refused_visibly_and_removes_nothing(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2")
    client = sandbox.wait_running(namespace, "client")
    server = sandbox.wait_running(namespace, "server")
    wait_enabled(sandbox, namespace, "client", "server")
    before = {
        name: kernel_state(sandbox, pod) for name, pod in (("client", client), ("server", server))
    }
    sets_before = {node: probe_members(sandbox, node) for node in ("node-1", "node-2")}

    # The operator switches the controller to the legacy node mode, which these agents lack.
    mesh.controller.stop()
    legacy = components.controller(sandbox, "--redirect-mode=node")
    legacy.start()
    try:
        refused = ("False", "RedirectModeNotSupported")
        wait_for(
            "both nodes to refuse the mode in their status",
            lambda: [condition(mesh, n, "Ready") for n in ("node-1", "node-2")] == [refused] * 2,
        )
        # Even a spec that lists no pod at all removes nothing while the mode is refused.
        sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)

        def spec_empty_and_seen(node: str) -> bool:
            obj = mesh.anc(node) or {}
            return (
                not obj["spec"].get("workloads")
                and (obj.get("status") or {}).get("observedGeneration")
                == obj["metadata"]["generation"]
            )

        wait_for(
            "both agents to see the empty spec",
            lambda: spec_empty_and_seen("node-1") and spec_empty_and_seen("node-2"),
        )
        assert {
            n: kernel_state(sandbox, p) for n, p in (("client", client), ("server", server))
        } == before
        assert {node: probe_members(sandbox, node) for node in ("node-1", "node-2")} == sets_before
        assert sandbox.pod_annotation(namespace, "client", REDIRECTION) == "enabled"
        assert status_counts(mesh, "node-1")[0] == 1
        # Traffic still goes through both ztunnels.
        seen = len(mesh.connections("node-2"))
        assert sandbox.http_get(client, pod_ip(server), 8080, "/held").json()["pod"] == "server"
        wait_for(
            "node-2's inbound record",
            lambda: [c for c in mesh.connections("node-2")[seen:] if c["direction"] == "inbound"],
        )
    finally:
        legacy.stop()
        mesh.controller.start()
    # Back in a mode the agent has: the unlabelled namespace's pods leave the mesh.
    wait_for(
        "annotations removed",
        lambda: sandbox.pod_annotation(namespace, "client", REDIRECTION) is None,
    )
    assert kernel_state(sandbox, client) == {"istio_rules": [], "ip_rules": [], "table_100": ""}
