"""`ambient-cni demo`: ambient redirection on a two-node sandbox, from label to no trace.

Brings the sandbox up, runs the whole operator on it (CRD, controller, one
node agent per node, a ztunnel stand-in per node), labels a namespace and
shows `kubectl get anc`, a cross-node call passing through both nodes'
ztunnels over IPv4 and over IPv6 (the server seeing the client's own address,
as ztunnel keeps it), a call between pods outside the mesh going direct, then
unlabels the namespace and shows the rules gone and the same pods talking
directly.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

from ambient_cni.api import names
from ambient_cni.kube import MERGE_PATCH, as_body

from . import lifecycle
from .cluster import SandboxCluster, pod_ip, wait_for
from .components import Mesh

MESH_NS = "demo"
_SOURCE_PORTS = itertools.count(20001)  # below the ephemeral range: no relay picks them
PLAIN_NS = "outside"


class DemoFailed(RuntimeError):
    pass


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _label(cluster: SandboxCluster, value: str | None) -> None:
    cluster.core.patch_namespace(
        MESH_NS,
        as_body({"metadata": {"labels": {names.DATAPLANE_MODE_LABEL: value}}}),
        _content_type=MERGE_PATCH,
    )


def _redirection(cluster: SandboxCluster, name: str) -> str | None:
    pod = cluster.pod(MESH_NS, name) or {}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    value: str | None = annotations.get(names.REDIRECTION_ANNOTATION)
    return value


def _istio_rules(cluster: SandboxCluster, pod: dict[str, Any]) -> int:
    """ISTIO rules in the pod's netns, both families."""
    count = 0
    for tool in ("iptables-save", "ip6tables-save"):
        saved = subprocess.run(
            ["ip", "netns", "exec", cluster.pod_netns(pod), tool],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        count += sum(1 for line in saved.splitlines() if "ISTIO" in line)
    return count


def _call(
    cluster: SandboxCluster,
    mesh: Mesh,
    client: dict[str, Any],
    server: dict[str, Any],
    *,
    meshed: bool,
    family: int = 4,
) -> None:
    seen = {node: len(mesh.connections(node)) for node in cluster.node_names}
    port = next(_SOURCE_PORTS)
    reply = cluster.http_get(
        client, pod_ip(server, family=family), 8080, "/hello", source_port=port
    )
    body = reply.json()
    print(
        f"HTTP {reply.status} from {body['pod']} at {body['local']}; "
        f"it saw the call come from {body['client']}"
    )
    if body["pod"] != server["metadata"]["name"]:
        raise DemoFailed(f"the call reached {body['pod']}, not {server['metadata']['name']}")
    if body["client_ip"] != pod_ip(client, family=family):
        raise DemoFailed(f"the server saw {body['client_ip']}, not the client's own address")

    def relayed() -> list[str]:
        return [
            f"  ztunnel on {node}: {c['direction']:8} {c['pod']}  {c['src']} -> {c['dst']}"
            for node in cluster.node_names
            for c in mesh.connections(node)[seen[node] :]
        ]

    # A stand-in records a connection once it has closed: wait for both nodes' records.
    lines = (
        wait_for("both ztunnels' records", lambda: len(r := relayed()) >= 2 and r, timeout=5)
        if meshed
        else relayed()
    )
    # Direct means the server saw the client's very socket: a relay keeps only the address.
    if (lines or body["client_port"] != port) and not meshed:
        raise DemoFailed("a ztunnel relayed a call that should have gone direct")
    if body["client_port"] == port and meshed:
        raise DemoFailed("a call that should have gone through ztunnel went direct")
    print("\n".join(lines) if lines else "  no ztunnel saw it: the call went direct")


def _wait_namespace_gone(cluster: SandboxCluster, namespace: str) -> None:
    wait_for(
        f"namespace {namespace} to be gone",
        lambda: cluster.namespace(namespace) is None,
        timeout=60,
    )


def _ready(mesh: Mesh, node: str) -> bool:
    status = (mesh.anc(node) or {}).get("status") or {}
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
    )


def _enrolled(mesh: Mesh, node: str) -> int:
    return int(((mesh.anc(node) or {}).get("status") or {}).get("enrolled") or 0)


def _show_anc(cluster: SandboxCluster) -> None:
    print(cluster.kubectl("get", "anc").stdout, end="")


def run_demo(name: str, *, keep: bool = False) -> int:
    _step(f"bringing up sandbox {name!r} with 2 nodes")
    lifecycle.up(name, 2)
    try:
        cluster = SandboxCluster.open(name)
        _step("installing the CRD; starting the controller, a node agent and a ztunnel per node")
        mesh = Mesh(cluster)
        mesh.start()
        _show_anc(cluster)

        _step(
            f"namespace {MESH_NS}: echo-1 on node-1, echo-2 on node-2; "
            f"namespace {PLAIN_NS}: plain-1, plain-2"
        )
        for namespace in (MESH_NS, PLAIN_NS):
            cluster.delete_namespace(namespace)  # from an earlier --keep run
            _wait_namespace_gone(cluster, namespace)
            cluster.create_namespace(namespace)
        for prefix, namespace in (("echo", MESH_NS), ("plain", PLAIN_NS)):
            for index, node in enumerate(cluster.node_names[:2], start=1):
                cluster.create_pod(namespace, f"{prefix}-{index}", node=node)
        echo_1, echo_2 = (cluster.wait_running(MESH_NS, f"echo-{i}") for i in (1, 2))
        plain_1, plain_2 = (cluster.wait_running(PLAIN_NS, f"plain-{i}") for i in (1, 2))
        print(cluster.kubectl("get", "pods", "-n", MESH_NS, "-o", "wide").stdout, end="")

        _step(f"kubectl label namespace {MESH_NS} istio.io/dataplane-mode=ambient")
        _label(cluster, names.DATAPLANE_MODE_AMBIENT)
        wait_for(
            "both echo pods enabled",
            lambda: _redirection(cluster, "echo-1") == _redirection(cluster, "echo-2") == "enabled",
            timeout=30,
        )
        wait_for(
            "every node Ready with its echo pod enrolled",
            lambda: all(_ready(mesh, n) and _enrolled(mesh, n) == 1 for n in cluster.node_names),
            timeout=30,
        )
        _show_anc(cluster)
        print(
            f"echo-1: {names.REDIRECTION_ANNOTATION}={_redirection(cluster, 'echo-1')}, "
            f"{_istio_rules(cluster, echo_1)} ISTIO rules in its netns"
        )

        _step("echo-1 (node-1) calls echo-2 (node-2): through both nodes' ztunnels")
        _call(cluster, mesh, echo_1, echo_2, meshed=True)
        _step("the same over IPv6")
        _call(cluster, mesh, echo_1, echo_2, meshed=True, family=6)
        _step("plain-1 calls plain-2, outside the mesh: direct")
        _call(cluster, mesh, plain_1, plain_2, meshed=False)

        _step(f"kubectl label namespace {MESH_NS} istio.io/dataplane-mode-")
        _label(cluster, None)
        wait_for(
            "the annotations to go",
            lambda: (
                _redirection(cluster, "echo-1") is None and _redirection(cluster, "echo-2") is None
            ),
            timeout=30,
        )
        print(
            f"echo-1: {_istio_rules(cluster, echo_1)} ISTIO rules, "
            f"echo-2: {_istio_rules(cluster, echo_2)}; same processes, same network namespaces"
        )
        _step("echo-1 calls echo-2 again: direct")
        _call(cluster, mesh, echo_1, echo_2, meshed=False)
        if not keep:
            mesh.stop()
    except DemoFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
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
