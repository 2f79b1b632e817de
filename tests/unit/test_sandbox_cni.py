"""The sandbox's CNI configuration and what it passes plugins (pure parts of cni.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ambient_cni_sandbox.cni import (
    REFERENCE_PLUGINS,
    SandboxPod,
    in_node_view,
    primary_conflist,
    result_addresses,
)
from ambient_cni_sandbox.topology import NODE_BRIDGE, PodNetwork, plan


def test_the_primary_network_is_the_node_bridge_with_its_pod_cidr() -> None:
    node = plan("demo", 2, ip_family="ipv4").nodes[1]
    conflist = primary_conflist(node, Path("/state/ipam"))
    assert len(conflist["plugins"]) == 1
    bridge = conflist["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == NODE_BRIDGE
    assert bridge["ipam"]["ranges"] == [[{"subnet": node.pod_cidr, "gateway": node.gateway}]]
    assert bridge["ipam"]["dataDir"] == "/state/ipam"


def test_the_ptp_network_is_kindnets_a_veth_per_pod_with_the_node_pod_cidr() -> None:
    node = plan("demo", 2, "ptp", "ipv4").nodes[1]
    conflist = primary_conflist(node, Path("/state/ipam"), "ptp")
    assert conflist["name"] == "simnet"
    assert conflist["plugins"] == [
        {
            "type": "ptp",
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.244.4.0/22", "gateway": "10.244.4.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": "/state/ipam",
            },
        }
    ]
    assert "ptp" in REFERENCE_PLUGINS


def test_a_pod_is_named_to_plugins_as_a_cri_runtime_names_it() -> None:
    pod = SandboxPod("shop", "web", "0b8f7c1e-4b8a", "acni-pod-0b8f7c1e")
    assert pod.cni_args() == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=0b8f7c1e-4b8a;K8S_POD_UID=0b8f7c1e-4b8a"
    )


@pytest.mark.parametrize("pod_network", ["bridge", "ptp"])
def test_a_dual_stack_node_has_a_range_and_a_default_route_per_family(
    pod_network: PodNetwork,
) -> None:
    node = plan("demo", 2, pod_network).nodes[1]
    ipam = primary_conflist(node, Path("/state/ipam"), pod_network)["plugins"][0]["ipam"]
    assert ipam["ranges"] == [
        [{"subnet": "10.244.4.0/22", "gateway": "10.244.4.1"}],
        [{"subnet": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::1"}],
    ]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]


def test_an_ipv6_node_has_ipv6_alone() -> None:
    node = plan("demo", 1, "bridge", "ipv6").nodes[0]
    ipam = primary_conflist(node, Path("/state/ipam"))["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "fd00:10:244::/64", "gateway": "fd00:10:244::1"}]]
    assert ipam["routes"] == [{"dst": "::/0"}]


def test_every_address_of_a_result_by_family() -> None:
    result = {
        "ips": [
            {"address": "10.244.0.5/22", "gateway": "10.244.0.1", "interface": 2},
            {"address": "fd00:10:244::5/64", "gateway": "fd00:10:244::1", "interface": 2},
            {"address": "10.244.0.6/22", "interface": 2},
        ]
    }
    assert result_addresses(result) == {4: "10.244.0.5", 6: "fd00:10:244::5"}
    assert result_addresses({}) == {}


def test_a_cni_call_sees_the_nodes_own_paths_in_a_private_mount_namespace() -> None:
    argv = ["cni-run", "add"]
    assert in_node_view({}, argv) == argv  # nothing to show: run as it is
    wrapped = in_node_view({"/var/run/istio-cni": Path("/state/node-2/istio-cni")}, argv)
    assert wrapped[:4] == ["unshare", "--mount", "--propagation=private", "--"]
    # The script binds SOURCE onto TARGET, then execs what follows the `--`.
    assert wrapped[-5:] == ["/state/node-2/istio-cni", "/var/run/istio-cni", "--", *argv]


def test_the_node_view_script_binds_then_runs_the_command(tmp_path: Path) -> None:
    # The shell part alone, with `mount` replaced by a recorder on PATH: what it binds, in
    # order, and that the command runs with its own arguments (never when a bind fails).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "mounts"
    recorder = bin_dir / "mount"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$3" != /fail ]\n')
    recorder.chmod(0o755)
    view = {"/b": Path("/src-b"), "/a": Path("/src-a")}
    script = in_node_view(view, ["echo", "ran", "x y"])[4:]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(script, capture_output=True, text=True, env=env, check=False)
    assert (done.returncode, done.stdout) == (0, "ran x y\n")
    assert log.read_text().splitlines() == ["--bind /src-a /a", "--bind /src-b /b"]
    failing = in_node_view({"/fail": Path("/src")}, ["echo", "ran"])[4:]
    done = subprocess.run(failing, capture_output=True, text=True, env=env, check=False)
    assert done.returncode != 0
    assert "ran" not in done.stdout
