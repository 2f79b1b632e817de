"""In-pod mode on the dual-stack sandbox, with a ztunnel stand-in that keeps the client's
address, as ztunnel does: both families carry traffic, and the return path (connmark 0x111,
`ip rule fwmark 0x111/0xfff lookup 100`) and the probe SNAT are load-bearing."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni.netns import run_in_netns
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.components import Component, Mesh
from tests.e2e.conftest import agent_args

REDIRECTION = names.REDIRECTION_ANNOTATION
PROBE_SOURCE = {4: "169.254.7.127", 6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"}


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster, backend: str) -> Iterator[Mesh]:
    running = Mesh(sandbox, "--drift-interval=1", *agent_args(backend))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def enrolled_pair(sandbox: SandboxCluster, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2")
    client = sandbox.wait_running(namespace, "client")
    server = sandbox.wait_running(namespace, "server")
    wait_for(
        "both enabled",
        lambda: all(
            sandbox.pod_annotation(namespace, p, REDIRECTION) == "enabled"
            for p in ("client", "server")
        ),
    )
    return client, server


def records(mesh: Mesh, node: str, since: int, direction: str) -> list[dict[str, Any]]:
    return [c for c in mesh.connections(node)[since:] if c["direction"] == direction]


def address(endpoint: str) -> str:
    """The address of a stand-in record's `ip:port` (IPv6 has colons of its own)."""
    return endpoint.rsplit(":", 1)[0]


@pytest.mark.parametrize("family", [4, 6])
def test_through_both_ztunnels_from_the_client_with_probes_and_the_return_path_load_bearing(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str, backend: str, family: int
) -> None:
    client, server = enrolled_pair(sandbox, namespace)
    target = pod_ip(server, family=family)

    # 1. Across nodes, through both ztunnels; the app sees the client pod's own address:
    # ztunnel kept it, and the reply found its way back to ztunnel's socket through the
    # connmark and table 100.
    seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
    reply = sandbox.http_get(client, target, 8080, f"/v{family}").json()
    assert (reply["pod"], reply["client_ip"]) == ("server", pod_ip(client, family=family))
    out = wait_for("node-1's outbound record", lambda: records(mesh, "node-1", seen_1, "outbound"))
    into = wait_for("node-2's inbound record", lambda: records(mesh, "node-2", seen_2, "inbound"))
    assert [(c["pod"], c["dst"]) for c in out] == [(f"{namespace}/client", f"{target}:8080")]
    assert [(c["pod"], c["dst"]) for c in into] == [(f"{namespace}/server", f"{target}:8080")]
    assert address(out[0]["src"]) == pod_ip(client, family=family)

    # 2. Kubelet-style probes from the node: SNATed to the probe source, which the pod's
    # rules let straight in, while its address is in the probe set.
    seen = len(mesh.connections("node-2"))
    port = fresh_port()
    direct = from_node(sandbox, "node-2", target, source_port=port)
    # SNAT keeps the port; a relay would not.
    assert (direct["client_ip"], direct["client_port"]) == (PROBE_SOURCE[family], port)
    assert mesh.connections("node-2")[seen:] == []
    # Out of it (the agent frozen, so it cannot put it back first): through ztunnel.
    with frozen(mesh.agents["node-2"]):
        unset_probe(backend, sandbox.state.topology.node("node-2").netns, family, target)
        port = fresh_port()
        probe = from_node(sandbox, "node-2", target, source_port=port)
    assert probe["client_ip"] != PROBE_SOURCE[family]
    assert probe["client_port"] != port
    inbound = wait_for("the stand-in's record", lambda: records(mesh, "node-2", seen, "inbound"))
    assert address(inbound[0]["src"]) == probe["client_ip"]
    wait_for(
        "the agent to put the address back",
        lambda: from_node(sandbox, "node-2", target)["client_ip"] == PROBE_SOURCE[family],
        timeout=15,
    )

    # 3. Without its `ip rule ... lookup 100`, the app's reply to the client's address leaves
    # the pod instead of returning to ztunnel's socket: inbound calls fail, until drift
    # repair puts the rule back.
    with frozen(mesh.agents["node-2"]):
        netns = sandbox.pod_netns(server)
        rule = ["ip", f"-{family}", "rule", "del", "pref", "32764"]
        subprocess.run(["ip", "netns", "exec", netns, *rule], check=True)
        assert call(sandbox, client, target) is None, "a call succeeded without the rule"
    repair = wait_for(
        "the repair in status",
        lambda: (mesh.workload("node-2", "server") or {}).get("lastRepair"),
        timeout=15,
    )
    assert "ip rule" in repair["message"]
    reply = wait_for("a call through again", lambda: call(sandbox, client, target))
    assert reply["client_ip"] == pod_ip(client, family=family)


@contextlib.contextmanager
def frozen(agent: Component) -> Iterator[None]:
    """The agent stopped in its tracks (SIGSTOP), so it cannot repair anything before the
    test has looked; the kernel and the stand-ins go on."""
    assert agent.pid is not None
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(agent.pid, signal.SIGCONT)


def call(sandbox: SandboxCluster, client: dict[str, Any], target: str) -> dict[str, Any] | None:
    try:
        return dict(sandbox.http_get(client, target, 8080, "/return", timeout=2).json())
    except OSError:
        return None


def fresh_port() -> int:
    """A source port below the kernel's ephemeral range, so no relay picks it too; random,
    since the node's namespace outlives tests and keeps their connections in TIME_WAIT."""
    return random.SystemRandom().randrange(20000, 32000)


def from_node(
    sandbox: SandboxCluster, node: str, target: str, source_port: int | None = None
) -> dict[str, Any]:
    """A GET from the node's own namespace, as kubelet's probes come (from `source_port`,
    below the ephemeral range, when given)."""
    source = None if source_port is None else ("", source_port)

    def get() -> dict[str, Any]:
        conn = http.client.HTTPConnection(target, 8080, timeout=2, source_address=source)
        try:
            conn.request("GET", "/healthz")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()

    return run_in_netns(Path("/run/netns") / sandbox.state.topology.node(node).netns, get)


def unset_probe(backend: str, node_netns: str, family: int, ip: str) -> None:
    """Take one address out of the node's probe set, whichever backend made it."""
    name = f"istio-inpod-probes-v{family}"
    if backend == "nftables":
        argv = ["nft", "delete", "element", "inet", "istio-ambient-nat", name, f"{{ {ip} }}"]
    else:
        argv = ["ipset", "del", name, ip]
    subprocess.run(["ip", "netns", "exec", node_netns, *argv], check=True)
