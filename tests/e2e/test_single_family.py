"""Single-family clusters keep working: the headline scenario, smoke-sized, on an IPv4-only and
an IPv6-only sandbox of their own (the session's sandbox is dual stack)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni_sandbox import lifecycle
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, pod_ips, wait_for
from ambient_cni_sandbox.components import Mesh
from ambient_cni_sandbox.topology import IpFamily
from tests.e2e.kernel import istio_rules

REDIRECTION = names.REDIRECTION_ANNOTATION
SANDBOX = "e2eone"


@pytest.fixture(scope="module", params=["ipv4", "ipv6"])
def single(request: pytest.FixtureRequest) -> Iterator[tuple[SandboxCluster, Mesh, int]]:
    family: IpFamily = request.param
    lifecycle.up(SANDBOX, nodes=2, ip_family=family)
    try:
        cluster = SandboxCluster.open(SANDBOX)
        mesh = Mesh(cluster, "--drift-interval=1")
        mesh.start()
        try:
            yield cluster, mesh, 4 if family == "ipv4" else 6
        finally:
            mesh.stop()
    finally:
        lifecycle.down(SANDBOX)
    left = lifecycle.leftovers(SANDBOX)
    assert left.empty, f"sandbox {SANDBOX} left things behind: {left}"


def relayed(mesh: Mesh, node: str, since: int, direction: str) -> list[dict[str, Any]]:
    return [c for c in mesh.connections(node)[since:] if c["direction"] == direction]


def test_headline_on_a_single_family_sandbox(single: tuple[SandboxCluster, Mesh, int]) -> None:
    cluster, mesh, family = single
    namespace = "single"
    cluster.create_namespace(namespace)
    cluster.create_pod(namespace, "client", node="node-1")
    cluster.create_pod(namespace, "server", node="node-2")
    client = cluster.wait_running(namespace, "client")
    server = cluster.wait_running(namespace, "server")
    assert [len(pod_ips(p)) for p in (client, server)] == [1, 1]  # one family only
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    wait_for(
        "both enabled",
        lambda: all(
            cluster.pod_annotation(namespace, p, REDIRECTION) == "enabled"
            for p in ("client", "server")
        ),
    )
    target = pod_ip(server, family=family)
    seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
    reply = cluster.http_get(client, target, 8080, "/single").json()
    assert (reply["pod"], reply["client_ip"]) == ("server", pod_ip(client, family=family))
    for node, seen, direction in (("node-1", seen_1, "outbound"), ("node-2", seen_2, "inbound")):
        found = wait_for(
            f"{node}'s {direction} record",
            functools.partial(relayed, mesh, node, seen, direction),
        )
        assert found[0]["dst"] == f"{target}:8080"

    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)
    wait_for(
        "rules gone",
        lambda: all(istio_rules(cluster.pod_netns(p)) == [] for p in (client, server)),
    )
    seen_1, seen_2 = len(mesh.connections("node-1")), len(mesh.connections("node-2"))
    direct = cluster.http_get(client, target, 8080, "/direct", source_port=20001).json()
    assert (direct["client_ip"], direct["client_port"]) == (pod_ip(client, family=family), 20001)
    assert mesh.connections("node-1")[seen_1:] == mesh.connections("node-2")[seen_2:] == []
