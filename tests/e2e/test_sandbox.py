"""The sandbox cluster: real control plane, simulated nodes and pods, real traffic."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.netns import netns_inode, process_netns_inode
from ambient_cni_sandbox import lifecycle
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.cni import NETWORK_NAME
from ambient_cni_sandbox.processes import is_running
from ambient_cni_sandbox.state import paths_for


def container_pid(pod: dict[str, Any]) -> int:
    container_id = pod["status"]["containerStatuses"][0]["containerID"]
    assert container_id.startswith("sandbox://"), container_id
    return int(container_id.removeprefix("sandbox://"))


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def node_links(sandbox: SandboxCluster, node: str) -> str:
    netns = sandbox.state.topology.node(node).netns
    return subprocess.run(
        ["ip", "-n", netns, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout


def test_nodes_are_ready_with_underlay_addresses(sandbox: SandboxCluster) -> None:
    nodes = json.loads(sandbox.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    seen = {}
    for node in nodes:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert [c["status"] for c in ready] == ["True"], node["status"]["conditions"]
        internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
        seen[node["metadata"]["name"]] = (internal, node["spec"]["podCIDRs"])
    # Dual stack: an address and a pod CIDR per family, IPv4 first.
    assert seen == {
        "node-1": (["172.18.0.11", "fd00:172:18::11"], ["10.244.0.0/22", "fd00:10:244::/64"]),
        "node-2": (["172.18.0.12", "fd00:172:18::12"], ["10.244.4.0/22", "fd00:10:244:1::/64"]),
    }


def test_kubectl_reports_the_built_release(sandbox: SandboxCluster) -> None:
    version = json.loads(sandbox.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]
    assert version["serverVersion"]["gitVersion"].startswith("v1.")


def test_pod_gets_netns_process_and_ip_then_delete_removes_them(
    sandbox: SandboxCluster, namespace: str
) -> None:
    sandbox.create_pod(namespace, "web", node="node-1")
    pod = sandbox.wait_running(namespace, "web")
    netns = sandbox.pod_netns(pod)
    ip = pod_ip(pod)
    pid = container_pid(pod)

    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.244.0.0/22")
    # Dual stack, IPv4 first, as a dual-stack kubelet reports them.
    ip6 = pod_ip(pod, family=6)
    assert ipaddress.IPv6Address(ip6) in ipaddress.IPv6Network("fd00:10:244::/64")
    assert pod["status"]["podIPs"] == [{"ip": ip}, {"ip": ip6}]
    assert pod["status"]["hostIP"] == "172.18.0.11"
    assert netns_exists(netns)
    assert process_netns_inode(pid) == netns_inode(netns), "the process runs in the pod's netns"
    addresses = subprocess.run(
        ["ip", "-n", netns, "-o", "-4", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"inet {ip}/22" in addresses
    addresses6 = subprocess.run(
        ["ip", "-n", netns, "-o", "-6", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"inet6 {ip6}/64" in addresses6
    # Made by the node's CNI chain: libcni cached the ADD result, host-local holds the IP.
    uid = pod["metadata"]["uid"]
    cni = paths_for(sandbox.name).node_cni("node-1")
    cached = cni.cache_dir / "results" / f"{NETWORK_NAME}-{uid}-eth0"
    leased = cni.ipam_dir / NETWORK_NAME / ip
    veth = json.loads(cached.read_text())["result"]["interfaces"][1]["name"]
    assert leased.read_text().startswith(uid)
    assert veth in node_links(sandbox, "node-1")

    sandbox.delete_pod(namespace, "web")
    sandbox.wait_pod_gone(namespace, "web")
    wait_for("the pod netns to be removed", lambda: not netns_exists(netns))
    wait_for("the pod process to exit", lambda: not is_running(pid))
    # CNI DEL ran: the veth, the cached result and the lease are gone.
    assert veth not in node_links(sandbox, "node-1")
    assert not cached.exists()
    assert not leased.exists()


def test_pod_on_node_1_gets_http_answer_from_pod_on_node_2(
    sandbox: SandboxCluster, namespace: str
) -> None:
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2", port=9090)
    client = sandbox.wait_running(namespace, "client")
    server = sandbox.wait_running(namespace, "server")

    reply = wait_for(
        "an HTTP answer across nodes",
        lambda: sandbox.http_get(client, pod_ip(server), 9090, "/hello"),
    )
    # The body proves the answer came from the server pod, and that its source
    # address was not rewritten on the way.
    assert reply.status == 200
    body = reply.json()
    assert (body["pod"], body["local"], body["path"]) == (
        "server",
        f"{pod_ip(server)}:9090",
        "/hello",
    )
    assert body["client_ip"] == pod_ip(client)
    # And over IPv6.
    reply6 = sandbox.http_get(client, pod_ip(server, family=6), 9090, "/hello6").json()
    assert (reply6["pod"], reply6["local_ip"]) == ("server", pod_ip(server, family=6))
    assert reply6["client_ip"] == pod_ip(client, family=6)


def test_a_replacement_pod_answers_at_once(sandbox: SandboxCluster, namespace: str) -> None:
    # host-local hands out the address after the last one it gave, so a replacement
    # gets a new address; when one is reused after a wrap, the kubelet drops the
    # node's neighbour entry for it (network.forget_neighbour).
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "bystander", node="node-2")  # keeps node-2's bridge up
    sandbox.create_pod(namespace, "server", node="node-2")
    client = sandbox.wait_running(namespace, "client")
    sandbox.wait_running(namespace, "bystander")
    first = sandbox.wait_running(namespace, "server")
    assert sandbox.http_get(client, pod_ip(first), 8080, timeout=2).status == 200
    sandbox.delete_pod(namespace, "server", grace=0)
    old_netns = Path("/run/netns") / sandbox.pod_netns(first)
    wait_for("the kubelet to release the first server", lambda: not old_netns.exists())
    sandbox.create_pod(namespace, "server", node="node-2")
    second = sandbox.wait_running(namespace, "server")
    assert pod_ip(second) != pod_ip(first)
    assert sandbox.http_get(client, pod_ip(second), 8080, timeout=2).status == 200


def test_kubectl_wide_and_status_show_nodes_and_pods_with_ips(
    sandbox: SandboxCluster, namespace: str
) -> None:
    sandbox.create_pod(namespace, "a", node="node-1")
    sandbox.create_pod(namespace, "b", node="node-2")
    a = sandbox.wait_running(namespace, "a")
    b = sandbox.wait_running(namespace, "b")

    wide = sandbox.kubectl("get", "nodes,pods", "-A", "-o", "wide").stdout
    rows = {line.split()[0]: line.split() for line in wide.splitlines() if line.strip()}
    assert "172.18.0.11" in rows["node/node-1"]
    assert "172.18.0.12" in rows["node/node-2"]
    pod_rows = {
        line.split()[1]: line.split() for line in wide.splitlines() if line.startswith(namespace)
    }
    assert {"pod/a", "pod/b"} <= set(pod_rows)
    assert pod_ip(a) in pod_rows["pod/a"]
    assert "node-1" in pod_rows["pod/a"]
    assert pod_ip(b) in pod_rows["pod/b"]
    assert "node-2" in pod_rows["pod/b"]

    status = subprocess.run(
        [sys.executable, "-m", "ambient_cni.cli", "sandbox", "status", "--name", sandbox.name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "kube-apiserver" in status
    assert pod_ip(a) in status
    assert pod_ip(b) in status


def test_pod_whose_command_cannot_start_fails_and_others_keep_running(
    sandbox: SandboxCluster, namespace: str
) -> None:
    sandbox.create_pod(namespace, "healthy", node="node-1")
    sandbox.create_pod(namespace, "broken", node="node-1", command=["/nonexistent/server"])
    healthy = sandbox.wait_running(namespace, "healthy")

    broken = sandbox.wait_pod(
        namespace, "broken", lambda p: p.get("status", {}).get("phase") == "Failed", "to fail"
    )
    assert broken["status"]["reason"] == "StartError"
    assert "/nonexistent/server" in broken["status"]["message"]
    terminated = broken["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "StartError"
    assert terminated["exitCode"] == 128

    # The healthy pod on the same node is untouched and still serves.
    sandbox.create_pod(namespace, "probe", node="node-2")
    probe = sandbox.wait_running(namespace, "probe")
    reply = sandbox.http_get(probe, pod_ip(healthy), 8080)
    assert reply.json()["pod"] == "healthy"
    still_healthy = sandbox.pod(namespace, "healthy")
    assert still_healthy is not None
    assert still_healthy["status"]["containerStatuses"][0]["restartCount"] == 0


def test_control_plane_up_and_down_leaves_nothing() -> None:
    name = "e2ecp"
    try:
        state = lifecycle.up(name, nodes=1)
        up = lifecycle.leftovers(name)
        assert up.processes
        assert up.netns
        assert up.paths
        assert lifecycle.is_healthy(state)
        report = lifecycle.down(name)
        assert set(report.processes) == set(up.processes)
        assert lifecycle.leftovers(name).empty
        for pid in up.processes:
            assert not is_running(pid)
        assert not any(Path("/run/netns").glob(f"acni-{name}-*"))
        assert not paths_for(name).state_dir.exists()
        assert not paths_for(name).etcd_dir.exists()
    finally:
        lifecycle.down(name)


def test_down_after_a_killed_up_cleans_everything() -> None:
    name = "e2ekill"
    first_node = f"acni-{name}-node-1"
    up = subprocess.Popen(
        [sys.executable, "-m", "ambient_cni.cli", "sandbox", "up", "--name", name, "--nodes", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill it as soon as the control plane runs and the node network is being made.
        wait_for("the first node netns", lambda: netns_exists(first_node) or up.poll() is not None)
        up.send_signal(signal.SIGKILL)
        assert up.wait(timeout=10) == -signal.SIGKILL, "up finished before it could be killed"
        left = lifecycle.leftovers(name)
        assert left.processes, "a killed up leaves its control plane running"
        assert first_node in left.netns

        result = subprocess.run(
            [sys.executable, "-m", "ambient_cni.cli", "sandbox", "down", "--name", name],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert lifecycle.leftovers(name).empty
        assert all(not is_running(pid) for pid in left.processes)
        assert not netns_exists(first_node)
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait()
        lifecycle.down(name)


@pytest.mark.parametrize("nodes", [0])
def test_up_refuses_a_bad_size_without_side_effects(nodes: int) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ambient_cni.cli",
            "sandbox",
            "up",
            "--name",
            "e2ebad",
            "--nodes",
            str(nodes),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "1 to 64 nodes" in result.stderr
    assert lifecycle.leftovers("e2ebad").empty
