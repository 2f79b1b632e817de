"""The legacy node redirect mode on a sandbox with a kindnet-like (ptp) pod network, as Istio
1.20 needed: real chains, tunnels, routes and TPROXY; real traffic between the nodes.

Istio's node mode reaches the ztunnel pod through a veth of its own, so this module brings
up its own sandbox with the ptp network (the session's `e2e` sandbox uses a bridge).
"""

from __future__ import annotations

import functools
import http.client
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni.netns import run_in_netns
from ambient_cni_sandbox import components, lifecycle
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.components import Mesh
from tests.e2e.conftest import namespace_for_test
from tests.e2e.kernel import istio_rules, run_in

SANDBOX = "e2enode"
REDIRECTION = names.REDIRECTION_ANNOTATION
SEEDS = Path(__file__).resolve().parents[3] / "shared" / "seeds"
DOC_002 = SEEDS / "002_a1daaa0de1689e5f.txt"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SandboxCluster]:
    lifecycle.up(SANDBOX, nodes=2, pod_network="ptp")
    try:
        yield SandboxCluster.open(SANDBOX)
    finally:
        lifecycle.down(SANDBOX)
    left = lifecycle.leftovers(SANDBOX)
    assert left.empty, f"sandbox {SANDBOX} left things behind: {left}"


@pytest.fixture(scope="module")
def mesh(cluster: SandboxCluster) -> Iterator[Mesh]:
    running = Mesh(cluster, "--drift-interval=1", controller_args=["--redirect-mode=node"])
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def namespace(cluster: SandboxCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    with namespace_for_test(cluster, request) as name:
        yield name


# -- what a person checks on a node, by hand ---------------------------------------------------


def node_netns(cluster: SandboxCluster, node: str) -> str:
    return cluster.state.topology.node(node).netns


def set_members(cluster: SandboxCluster, node: str) -> list[str]:
    listing = run_in(node_netns(cluster, node), "ipset", "list", "ztunnel-pods-ips")
    if "Members:" not in listing:
        return []
    return sorted(line.split()[0] for line in listing.split("Members:")[1].splitlines() if line)


def node_side(cluster: SandboxCluster, node: str) -> dict[str, Any]:
    """Everything node mode puts on a node, as the tools print it."""
    netns = node_netns(cluster, node)
    return {
        "chains": [
            line for line in run_in(netns, "iptables-save").splitlines() if "ztunnel-" in line
        ],
        "ipset": "ztunnel-pods-ips" in run_in(netns, "ipset", "list", "-n").split(),
        "tunnels": [
            name for name in ("istioin", "istioout") if run_in(netns, "ip", "link", "show", name)
        ],
        "rules": [
            line
            for line in run_in(netns, "ip", "rule").splitlines()
            if line.split(":")[0] in ("100", "101", "102", "103")
        ],
        "tables": [
            run_in(netns, "ip", "route", "show", "table", t).strip() for t in ("100", "101", "102")
        ],
    }


def set_empty(cluster: SandboxCluster, node: str) -> bool:
    return set_members(cluster, node) == []


NOTHING = {"chains": [], "ipset": False, "tunnels": [], "rules": [], "tables": ["", "", ""]}


def condition(mesh: Mesh, node: str, kind: str) -> dict[str, Any]:
    status = (mesh.anc(node) or {}).get("status") or {}
    found = [c for c in status.get("conditions") or [] if c["type"] == kind]
    return found[0] if found else {}


def node_mode_ready(mesh: Mesh, node: str) -> bool:
    status = (mesh.anc(node) or {}).get("status") or {}
    return status.get("mode") == "node" and all(
        condition(mesh, node, kind).get("status") == "True"
        for kind in ("Ready", "HostRulesReady", "TunnelsReady", "ZtunnelRulesReady")
    )


def enabled(cluster: SandboxCluster, namespace: str, *pods: str) -> bool:
    return all(cluster.pod_annotation(namespace, p, REDIRECTION) == "enabled" for p in pods)


def relayed(mesh: Mesh, node: str, since: int, direction: str) -> list[dict[str, Any]]:
    return [c for c in mesh.connections(node)[since:] if c["direction"] == direction]


def call_through_both(
    cluster: SandboxCluster, mesh: Mesh, client: dict[str, Any], server: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A call from client (node-1) to server (node-2): the reply, and the two stand-ins'
    records of it."""
    seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
    reply = cluster.http_get(client, pod_ip(server), 8080, "/meshed").json()
    out = wait_for("node-1's outbound record", lambda: relayed(mesh, "node-1", seen_1, "outbound"))
    into = wait_for("node-2's inbound record", lambda: relayed(mesh, "node-2", seen_2, "inbound"))
    return reply, out[0], into[0]


def two_pods(cluster: SandboxCluster, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster.create_pod(namespace, "client", node="node-1")
    cluster.create_pod(namespace, "server", node="node-2")
    return cluster.wait_running(namespace, "client"), cluster.wait_running(namespace, "server")


# -- the headline ------------------------------------------------------------------------------


def test_headline_in_node_mode_through_both_ztunnels_and_nothing_left_after_unlabel(
    cluster: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    outside = f"{namespace[:40]}-out"
    cluster.create_namespace(outside)
    try:
        client, server = two_pods(cluster, namespace)
        cluster.create_pod(outside, "plain", node="node-1")
        cluster.create_pod(outside, "plain-server", node="node-2")
        plain = cluster.wait_running(outside, "plain")
        plain_server = cluster.wait_running(outside, "plain-server")
        cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
        wait_for("annotations", lambda: enabled(cluster, namespace, "client", "server"))
        wait_for(
            "both nodes Ready in node mode",
            lambda: all(node_mode_ready(mesh, n) for n in ("node-1", "node-2")),
        )
        tunnels = condition(mesh, "node-1", "TunnelsReady")
        assert tunnels["reason"] == "Vxlan"  # this kernel has no geneve
        assert "istioin (VNI 1000) and istioout (VNI 1001) are vxlan tunnels" in tunnels["message"]
        assert condition(mesh, "node-1", "ZtunnelConnected")["reason"] == "Ready"

        # Out through node-1's ztunnel, in through node-2's; both caught by TPROXY there.
        reply, out, into = call_through_both(cluster, mesh, client, server)
        assert reply["pod"] == "server"
        assert (out["mode"], out["dst"]) == ("node", f"{pod_ip(server)}:8080")
        assert out["src"].split(":")[0] == pod_ip(client)
        assert (into["mode"], into["dst"]) == ("node", f"{pod_ip(server)}:8080")
        # Nothing inside the pods: no chains, no policy routing.
        for pod in (client, server):
            netns = cluster.pod_netns(pod)
            assert istio_rules(netns) == []
            assert run_in(netns, "ip", "rule").count("lookup") == 3  # local, main, default

        # Pods outside the mesh talk directly, and no ztunnel sees it.
        seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
        direct = cluster.http_get(
            plain, pod_ip(plain_server), 8080, "/plain", source_port=20001
        ).json()
        assert direct["client"] == f"{pod_ip(plain)}:20001"  # its very socket: no relay
        assert mesh.connections("node-1")[seen_1:] == mesh.connections("node-2")[seen_2:] == []
        # While a mesh pod is reached through its node's ztunnel, whoever calls (the node
        # routes every packet for it through istioin, as Istio's did).
        # ztunnel keeps the caller's address (not its port): the reply back to it goes
        # through the node's table 102 and ztunnel's own rules (mark 0x4d3), Istio's way.
        reply = call_from(cluster, plain, pod_ip(server), source_port=20002)
        assert reply["client"] != f"{pod_ip(plain)}:20002"
        assert reply["client"].rsplit(":", 1)[0] == pod_ip(plain)
        inbound = wait_for("node-2's record", lambda: relayed(mesh, "node-2", seen_2, "inbound"))
        assert inbound[0]["src"] == f"{pod_ip(plain)}:20002"
        # IPv6 on this ptp network: node mode redirects IPv4 only, as Istio's did, so a mesh
        # pod's IPv6 is reached directly.
        seen_2 = len(mesh.connections("node-2"))
        six = cluster.http_get(
            client, pod_ip(server, family=6), 8080, "/v6", source_port=20003
        ).json()
        assert six["client"] == f"{pod_ip(client, family=6)}:20003"
        assert relayed(mesh, "node-2", seen_2, "inbound") == []

        # Unlabelled: the same pods talk directly, nothing of theirs left on either node.
        cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)
        wait_for(
            "annotations removed",
            lambda: all(
                cluster.pod_annotation(namespace, p, REDIRECTION) is None
                for p in ("client", "server")
            ),
        )
        for node in ("node-1", "node-2"):
            wait_for(f"{node}'s set empty", functools.partial(set_empty, cluster, node))
            assert "via 192.168.126.2" not in node_side(cluster, node)["tables"][0]
        seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
        after = cluster.http_get(client, pod_ip(server), 8080, "/direct", source_port=20004).json()
        assert after["client"] == f"{pod_ip(client)}:20004"
        assert mesh.connections("node-1")[seen_1:] == mesh.connections("node-2")[seen_2:] == []
    finally:
        cluster.delete_namespace(outside)


def doc_002_listing() -> list[str]:
    """The `iptables -t mangle -L ztunnel-PREROUTING` rows document 002 prints."""
    text = DOC_002.read_text()
    block = text.split("-L ztunnel-PREROUTING", 1)[1].split("{{< /text >}}", 2)[1]
    return [line for line in block.splitlines() if line and not line.startswith("{{")]


@pytest.mark.skipif(not DOC_002.exists(), reason="the source documents are not beside the repo")
def test_document_002s_checks_show_what_it_says(
    cluster: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    for name in ("a", "b"):
        cluster.create_pod(namespace, name, node="node-2")
    pods = [cluster.wait_running(namespace, n) for n in ("a", "b")]
    wait_for("annotations", lambda: enabled(cluster, namespace, "a", "b"))
    netns = node_netns(cluster, "node-2")
    # `ipset list`: the set, and the IPs of the node's ambient pods in it.
    listing = run_in(netns, "ipset", "list", "ztunnel-pods-ips")
    assert "Name: ztunnel-pods-ips" in listing
    assert "Type: hash:ip" in listing
    assert "Header: family inet hashsize 1024 maxelem 65536" in listing
    assert set_members(cluster, "node-2") == sorted(pod_ip(p) for p in pods)
    # `iptables -t mangle -L ztunnel-PREROUTING`: the document's listing, row for row, but
    # for its ztunnel pod's address and the port's name (its node's /etc/services knew 6081
    # as geneve; this machine's may not).
    ztunnel = (mesh.anc("node-2") or {})["spec"]["ztunnel"]["ip"]
    rows = run_in(netns, "iptables", "-t", "mangle", "-L", "ztunnel-PREROUTING").splitlines()

    def words(row: str) -> str:
        return " ".join(row.replace(ztunnel, "10.240.1.17").replace(":6081", ":geneve").split())

    assert [words(r) for r in rows] == [words(r) for r in doc_002_listing()]
    assert rows[-1].endswith("match-set ztunnel-pods-ips src MARK or 0x100")


# -- repairs -------------------------------------------------------------------------------------


def test_drift_on_the_node_is_repaired_with_the_reason_in_status(
    cluster: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    client, server = two_pods(cluster, namespace)
    wait_for("annotations", lambda: enabled(cluster, namespace, "client", "server"))
    wait_for("Ready", lambda: node_mode_ready(mesh, "node-2"))
    netns = node_netns(cluster, "node-2")
    whole = node_side(cluster, "node-2")

    def repaired(kind: str, said: str) -> bool:
        return said in condition(mesh, "node-2", kind).get("message", "")

    # A flushed ztunnel-PREROUTING.
    subprocess.run(
        ["ip", "netns", "exec", netns, "iptables", "-t", "mangle", "-F", "ztunnel-PREROUTING"],
        check=True,
    )
    wait_for(
        "the chain repaired",
        lambda: repaired("HostRulesReady", "repaired: IPv4 mangle: 15 of our rules missing"),
        timeout=15,
    )
    assert node_side(cluster, "node-2") == whole
    # A deleted tunnel (which takes the pods' routes in table 100 with it).
    subprocess.run(["ip", "-n", netns, "link", "del", "istioin"], check=True)
    wait_for(
        "the tunnel repaired",
        lambda: repaired("TunnelsReady", "repaired: istioin (vxlan) created"),
        timeout=15,
    )
    wait_for("table 100 back", lambda: node_side(cluster, "node-2") == whole)
    server_repair = wait_for(
        "the server's own repair",
        lambda: (mesh.workload("node-2", "server") or {}).get("lastRepair"),
        timeout=15,
    )
    assert f"{pod_ip(server)}/32 via 192.168.126.2 dev istioin: added" in server_repair["message"]
    # A removed ip rule.
    subprocess.run(["ip", "-n", netns, "rule", "del", "priority", "101"], check=True)
    wait_for(
        "the rule repaired",
        lambda: repaired("TunnelsReady", "ip rule priority 101 added"),
        timeout=15,
    )
    assert node_side(cluster, "node-2") == whole
    # And traffic goes through both ztunnels again.
    _, out, into = call_through_both(cluster, mesh, client, server)
    assert out["mode"] == into["mode"] == "node"


def test_a_replaced_ztunnel_gets_the_node_side_again(
    cluster: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    client, server = two_pods(cluster, namespace)
    wait_for("annotations", lambda: enabled(cluster, namespace, "client", "server"))
    old = (mesh.anc("node-1") or {})["spec"]["ztunnel"]
    old_rules = condition(mesh, "node-1", "HostRulesReady")["message"]  # names the old veth
    cluster.delete_pod(names.DEFAULT_SYSTEM_NAMESPACE, old["name"], grace=0)
    cluster.wait_pod_gone(names.DEFAULT_SYSTEM_NAMESPACE, old["name"])
    components.start_ztunnel(cluster, "node-1")
    new = wait_for(
        "the new ztunnel in the spec",
        lambda: (
            ((mesh.anc("node-1") or {}).get("spec") or {}).get("ztunnel")
            if (((mesh.anc("node-1") or {}).get("spec") or {}).get("ztunnel") or {}).get("uid")
            not in (None, old["uid"])
            else None
        ),
        timeout=30,
    )
    wait_for(
        "the new ztunnel's side in place",
        lambda: (
            f"({new['ip']})" in condition(mesh, "node-1", "ZtunnelRulesReady").get("message", "")
            and condition(mesh, "node-1", "HostRulesReady").get("message") != old_rules
            and node_mode_ready(mesh, "node-1")
        ),
        timeout=30,
    )
    side = node_side(cluster, "node-1")
    assert f"! -s {new['ip']}/32" in "\n".join(side["chains"])
    assert old["ip"] == new["ip"] or old["ip"] not in "\n".join(side["chains"] + side["tables"])
    _, out, _ = call_through_both(cluster, mesh, client, server)
    assert out["mode"] == "node"


# -- switching modes on a live node ------------------------------------------------------------


def call_from(
    cluster: SandboxCluster, pod: dict[str, Any], host: str, *, source_port: int
) -> dict[str, Any]:
    """A GET from inside `pod` from a port of our choosing: the server seeing that very port
    means no proxy stood between (ztunnel keeps a caller's address, not its port)."""

    def call() -> dict[str, Any]:
        conn = http.client.HTTPConnection(host, 8080, timeout=2, source_address=("", source_port))
        try:
            conn.request("GET", "/switch")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()

    return run_in_netns(cluster.pod_netns(pod), call)


@dataclass
class Calls:
    """Calls client -> server, made continuously from another thread, each from a port of
    its own: when, and whether the server saw the client's very port (None: it failed)."""

    cluster: SandboxCluster
    client: dict[str, Any]
    server: dict[str, Any]
    made: list[tuple[float, bool | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        ports = itertools.cycle(range(21000, 29000))  # below the ephemeral range
        while not self.stop.is_set():
            started, port = time.monotonic(), next(ports)
            try:
                reply = call_from(self.cluster, self.client, pod_ip(self.server), source_port=port)
                self.made.append((started, reply["client"] == f"{pod_ip(self.client)}:{port}"))
            except (OSError, ValueError):
                self.made.append((started, None))
            self.stop.wait(0.02)  # pacing the load, not waiting for anything

    def since(self, start: float, count: int) -> bool:
        """At least `count` calls were made after `start`."""
        return sum(1 for t, _ in self.made if t > start) >= count

    def direct(self, since: float = 0.0) -> list[float]:
        """Calls the server saw from the client's own socket: they bypassed ztunnel."""
        return [t for t, direct in self.made if t >= since and direct]

    def longest_gap(self, since: float, until: float) -> float:
        """The longest run of failed calls between `since` and `until`, in seconds."""
        longest, start = 0.0, None
        for t, seen in self.made:
            if not since <= t <= until:
                continue
            if seen is None and start is None:
                start = t
            elif seen is not None and start is not None:
                longest, start = max(longest, t - start), None
        return longest


def switch_to(mesh: Mesh, mode: str) -> None:
    """As `helm upgrade --set redirectMode=...` does: the controller restarts with it."""
    controller = mesh.controller
    controller.argv = [a for a in controller.argv if not a.startswith("--redirect-mode")]
    controller.argv.append(f"--redirect-mode={mode}")
    controller.restart()


def inpod_everywhere(cluster: SandboxCluster, mesh: Mesh, pods: list[dict[str, Any]]) -> bool:
    statuses = [(mesh.anc(n) or {}).get("status") or {} for n in ("node-1", "node-2")]
    return (
        all(s.get("mode") == "inpod" for s in statuses)
        and all(
            c["status"] == "True"
            for s in statuses
            for c in s.get("conditions") or []
            if c["type"] in ("Ready", "InSync")
        )
        and all(istio_rules(cluster.pod_netns(p)) for p in pods)
        and all(node_side(cluster, n) == NOTHING for n in ("node-1", "node-2"))
    )


def node_everywhere(cluster: SandboxCluster, mesh: Mesh, pods: list[dict[str, Any]]) -> bool:
    in_sync = all(
        condition(mesh, n, "InSync").get("status") == "True" for n in ("node-1", "node-2")
    )
    return (
        in_sync
        and all(node_mode_ready(mesh, n) for n in ("node-1", "node-2"))
        and all(istio_rules(cluster.pod_netns(p)) == [] for p in pods)
        and set_members(cluster, "node-1") == [pod_ip(pods[0])]
        and set_members(cluster, "node-2") == [pod_ip(pods[1])]
    )


def test_switching_modes_under_continuous_calls_both_ways(
    cluster: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    client, server = two_pods(cluster, namespace)
    wait_for("annotations", lambda: enabled(cluster, namespace, "client", "server"))
    wait_for("node mode", lambda: node_everywhere(cluster, mesh, [client, server]), timeout=30)
    calls = Calls(cluster, client, server)
    load = threading.Thread(target=calls.run, name="calls", daemon=True)
    load.start()
    try:
        for mode, done in (("inpod", inpod_everywhere), ("node", node_everywhere)):
            wait_for("calls before the switch", lambda: len(calls.made) >= 5)
            began = time.monotonic()
            switch_to(mesh, mode)
            wait_for(
                f"{mode} everywhere",
                functools.partial(done, cluster, mesh, [client, server]),
                timeout=60,
            )
            completed = time.monotonic()
            wait_for("20 calls after the switch", functools.partial(calls.since, completed, 20))
            after = [seen for t, seen in calls.made if t > completed]
            gap = calls.longest_gap(began, completed)
            sys.stdout.write(
                f"switch to {mode}: {completed - began:.2f} s, longest gap "
                f"{gap:.2f} s, {len(after)} calls after\n"
            )
            assert None not in after, f"calls failed after the switch to {mode}"
            assert calls.direct(began) == [], f"calls bypassed ztunnel switching to {mode}"
            assert enabled(cluster, namespace, "client", "server")
    finally:
        calls.stop.set()
        load.join(timeout=10)
    # Through ztunnel in node mode again, on both nodes.
    _, out, into = call_through_both(cluster, mesh, client, server)
    assert out["mode"] == into["mode"] == "node"


# -- uninstall -----------------------------------------------------------------------------------


def test_uninstall_cleans_the_node_and_a_restarted_agent_puts_it_back(
    cluster: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    cluster.create_pod(namespace, "pod", node="node-1")
    cluster.wait_running(namespace, "pod")
    wait_for("annotation", lambda: enabled(cluster, namespace, "pod"))
    wait_for("Ready", lambda: node_mode_ready(mesh, "node-1"))
    assert node_side(cluster, "node-1") != NOTHING
    agent = mesh.agents["node-1"]
    agent.stop()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ambient_cni.cli",
                "agent",
                "--node=node-1",
                f"--host-netns=/run/netns/{node_netns(cluster, 'node-1')}",
                "--uninstall",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert node_side(cluster, "node-1") == NOTHING
    finally:
        agent.start(timeout=60)
    wait_for("Ready again", lambda: node_mode_ready(mesh, "node-1"), timeout=30)
    assert set_members(cluster, "node-1") == [pod_ip(cluster.wait_running(namespace, "pod"))]
