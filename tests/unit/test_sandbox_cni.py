"""The sandbox's CNI configuration and what it passes plugins (pure parts of cni.py)."""

from __future__ import annotations

from pathlib import Path

from ambient_cni_sandbox.cni import REFERENCE_PLUGINS, SandboxPod, primary_conflist
from ambient_cni_sandbox.topology import NODE_BRIDGE, plan


def test_the_primary_network_is_the_node_bridge_with_its_pod_cidr() -> None:
    node = plan("demo", 2).nodes[1]
    conflist = primary_conflist(node, Path("/state/ipam"))
    assert len(conflist["plugins"]) == 1
    bridge = conflist["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == NODE_BRIDGE
    assert bridge["ipam"]["ranges"] == [[{"subnet": node.pod_cidr, "gateway": node.gateway}]]
    assert bridge["ipam"]["dataDir"] == "/state/ipam"


def test_the_ptp_network_is_kindnets_a_veth_per_pod_with_the_node_pod_cidr() -> None:
    node = plan("demo", 2, "ptp").nodes[1]
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
