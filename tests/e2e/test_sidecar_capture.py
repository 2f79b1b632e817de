"""Sidecar capture through the CNI plugin: a pod with an injected proxy gets Istio's capture
rules in its netns while its sandbox is created, its proxy (the sandbox's Envoy stand-in,
running as UID/GID 1337) sees its traffic both ways, its annotations shape the capture,
a malformed one holds the pod, and the node's AmbientNodeConfig shows and repairs it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ambient_cni_sandbox.cluster import HttpReply, SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.components import Mesh
from tests.e2e.conftest import agent_args

EXCLUDE_OUTBOUND = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
EXCLUDE_INBOUND = "traffic.sidecar.istio.io/excludeInboundPorts"


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster, backend: str) -> Iterator[Mesh]:
    """On each backend: Istio's iptables form, or its native nftables one."""
    running = Mesh(sandbox, "--drift-interval=2", *agent_args(backend), cni=True)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def relayed(sandbox: SandboxCluster, pod: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    return [c for c in sandbox.sidecar_connections(pod) if c["direction"] == direction]


def state(mesh: Mesh, name: str) -> str | None:
    return (mesh.workload("node-1", name) or {}).get("state")


def client_seen(reply: HttpReply) -> str:
    """The client address the echo server saw, without the port."""
    return str(reply.json()["client"]).rsplit(":", 1)[0]


@pytest.fixture
def peers(sandbox: SandboxCluster, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A plain server and a plain client on node-2, outside any mesh."""
    sandbox.create_pod(namespace, "server", node="node-2", port=8080)
    sandbox.create_pod(namespace, "client", node="node-2", port=8080)
    return sandbox.wait_running(namespace, "server"), sandbox.wait_running(namespace, "client")


def test_a_sidecar_pods_traffic_goes_through_its_proxy_both_ways_and_shows_in_status(
    sandbox: SandboxCluster,
    mesh: Mesh,
    backend: str,
    namespace: str,
    peers: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    server, client = peers
    sandbox.create_pod(namespace, "web", node="node-1", port=8080, sidecar={})
    web = sandbox.wait_running(namespace, "web")
    # The capture in the backend's form, and only in it.
    native = sandbox.exec_in_pod(web, ["nft", "list", "table", "inet", "istio-proxy-nat"])
    legacy = sandbox.exec_in_pod(web, ["iptables-save", "-t", "nat"]).stdout
    assert (native.returncode == 0, "ISTIO_INBOUND" in legacy) == (
        (True, False) if backend == "nftables" else (False, True)
    )

    # Outbound: the app's call goes to the proxy, which calls out as UID 1337, once
    # (the proxy's own connection is not captured again).
    reply = sandbox.http_get(web, pod_ip(server))
    assert reply.status == 200
    # The proxy logs a connection once it has closed.
    outbound = wait_for("the proxy's record", lambda: relayed(sandbox, web, "outbound"))
    assert [c["dst"] for c in outbound] == [f"{pod_ip(server)}:8080"]
    assert "error" not in outbound[0]
    assert client_seen(reply) == pod_ip(web)

    # Inbound: a call to the app arrives through the proxy, from the passthrough source.
    reply = sandbox.http_get(client, pod_ip(web))
    assert reply.status == 200
    inbound = wait_for("the proxy's record", lambda: relayed(sandbox, web, "inbound"))
    assert [(c["src"].rsplit(":", 1)[0], c["dst"]) for c in inbound] == [
        (pod_ip(client), f"{pod_ip(web)}:8080")
    ]
    assert client_seen(reply) == "127.0.0.6"

    entry = wait_for("web in node-1's status", lambda: mesh.workload("node-1", "web"))
    assert entry["state"] == "Enrolled"
    assert entry["capture"] == (
        "REDIRECT; inbound: all ports but 15020,15021,15090; outbound: all; "
        "never ports 15020; proxy uid 1337 gid 1337"
    )
    status = (mesh.anc("node-1") or {})["status"]
    assert status["sidecars"] >= 1
    spec = (mesh.anc("node-1") or {})["spec"]
    spec_entry = next(w for w in spec["workloads"] if w["name"] == "web")
    assert spec_entry["sidecar"]["interceptionMode"] == "REDIRECT"


def test_excluded_ranges_and_ports_go_direct(
    sandbox: SandboxCluster,
    mesh: Mesh,
    namespace: str,
    peers: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    server, client = peers
    node_2_pods = sandbox.state.topology.node("node-2").pod_cidr
    sandbox.create_pod(
        namespace,
        "web",
        node="node-1",
        port=8080,
        sidecar={},
        annotations={EXCLUDE_OUTBOUND: node_2_pods, EXCLUDE_INBOUND: "8080"},
    )
    sandbox.create_pod(namespace, "near", node="node-1", port=8080)
    web = sandbox.wait_running(namespace, "web")
    near = sandbox.wait_running(namespace, "near")
    out = sandbox.http_get(web, pod_ip(server))
    assert out.status == 200
    assert client_seen(out) == pod_ip(web)
    back = sandbox.http_get(client, pod_ip(web))
    assert back.status == 200
    assert client_seen(back) == pod_ip(client)  # not 127.0.0.6: no proxy in between
    # A call the capture does cover, after: once the proxy has logged it, it is all it
    # ever logged, so the two calls before went direct.
    assert sandbox.http_get(web, pod_ip(near)).status == 200
    logged = wait_for("the proxy's record", lambda: sandbox.sidecar_connections(web))
    assert [(c["direction"], c["dst"]) for c in logged] == [("outbound", f"{pod_ip(near)}:8080")]
    entry = wait_for("web in node-1's status", lambda: mesh.workload("node-1", "web"))
    assert entry["capture"] == (
        f"REDIRECT; inbound: all ports but 8080,15020,15021,15090; outbound: all but "
        f"{node_2_pods}; never ports 15020; proxy uid 1337 gid 1337"
    )


def test_a_malformed_annotation_holds_the_pod_with_a_message_naming_it(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    sandbox.create_pod(
        namespace,
        "web",
        node="node-1",
        port=8080,
        sidecar={},
        annotations={EXCLUDE_INBOUND: "99999"},
    )
    failures = wait_for(
        "the plugin to refuse the pod",
        lambda: sandbox.pod_events(namespace, "web", "FailedCreatePodSandBox"),
    )
    assert (
        f"annotation {EXCLUDE_INBOUND}='99999': port 99999 is out of range 0-65535"
        in failures[0]["message"]
    )
    pod = sandbox.pod(namespace, "web") or {}
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == (
        "ContainerCreating"
    )


FLUSH_OUTPUT = {
    "iptables-nft": ["iptables", "-t", "nat", "-F", "OUTPUT"],
    "nftables": ["nft", "flush", "chain", "inet", "istio-proxy-nat", "output"],
}


def test_capture_flushed_behind_the_agents_back_is_repaired_with_a_reason(
    sandbox: SandboxCluster,
    mesh: Mesh,
    backend: str,
    namespace: str,
    peers: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    server, client = peers
    sandbox.create_pod(namespace, "web", node="node-1", port=8080, sidecar={})
    web = sandbox.wait_running(namespace, "web")
    wait_for("web Enrolled", lambda: state(mesh, "web") == "Enrolled")
    flushed = sandbox.exec_in_pod(web, FLUSH_OUTPUT[backend])
    assert flushed.returncode == 0, flushed.stderr
    # Made while the capture is gone, or already back: the agent hears the flush from the
    # kernel and can repair it in less time than this call takes to start.
    assert sandbox.http_get(web, pod_ip(server)).status == 200
    repair = wait_for(
        "the capture repaired",
        lambda: (mesh.workload("node-1", "web") or {}).get("lastRepair"),
        timeout=30,
    )
    assert repair["reason"] == "DriftRepaired"
    assert "nat" in repair["message"]
    assert sandbox.http_get(web, pod_ip(client)).status == 200
    # The call after the repair went through the proxy: it is the last the proxy logged.
    wait_for(
        "the proxy's record of the call after the repair",
        lambda: (
            [c["dst"] for c in relayed(sandbox, web, "outbound")][-1:] == [f"{pod_ip(client)}:8080"]
        ),
    )


def test_in_tproxy_mode_the_app_sees_the_real_client(
    sandbox: SandboxCluster,
    mesh: Mesh,
    namespace: str,
    peers: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    server, client = peers
    sandbox.create_pod(
        namespace,
        "web",
        node="node-1",
        port=8080,
        # As Istio injects a TPROXY proxy: root (for IP_TRANSPARENT), group 1337.
        sidecar={"securityContext": {"runAsUser": 0, "runAsGroup": 1337}},
        annotations={"sidecar.istio.io/interceptionMode": "TPROXY"},
    )
    web = sandbox.wait_running(namespace, "web")
    reply = sandbox.http_get(client, pod_ip(web))
    assert reply.status == 200
    # The proxy bound the client's own address: the reply found its way back to it only
    # through the connmark restore and `fwmark 1337 lookup 133`.
    assert client_seen(reply) == pod_ip(client)
    inbound = wait_for("the proxy's record", lambda: relayed(sandbox, web, "inbound"))
    assert [(c["src"].rsplit(":", 1)[0], c["dst"]) for c in inbound] == [
        (pod_ip(client), f"{pod_ip(web)}:8080")
    ]
    assert sandbox.http_get(web, pod_ip(server)).status == 200
    outbound = wait_for("the proxy's record", lambda: relayed(sandbox, web, "outbound"))
    assert [c["dst"] for c in outbound] == [f"{pod_ip(server)}:8080"]
    entry = wait_for("web in node-1's status", lambda: mesh.workload("node-1", "web"))
    assert entry["capture"].startswith("TPROXY; ")
    rules = sandbox.exec_in_pod(web, ["ip", "rule"]).stdout
    assert "fwmark 0x539 lookup 133" in rules
