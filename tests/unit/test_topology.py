from __future__ import annotations

import pytest

from ambient_cni_sandbox.topology import (
    Topology,
    TopologyError,
    plan,
    prefix_for,
)


def test_two_node_plan_addresses_and_names() -> None:
    topology = plan("demo", 2)
    assert topology.underlay_netns == "acni-demo-underlay"
    assert [(n.name, n.netns, n.ip, n.pod_cidr, n.gateway) for n in topology.nodes] == [
        ("node-1", "acni-demo-node-1", "172.18.0.11", "10.244.0.0/22", "10.244.0.1"),
        ("node-2", "acni-demo-node-2", "172.18.0.12", "10.244.4.0/22", "10.244.4.1"),
    ]
    assert topology.pod_netns("abc") == "acni-demo-pod-abc"
    assert topology.is_pod_netns("acni-demo-pod-abc")
    assert not topology.is_pod_netns("acni-demo-node-1")


def test_pod_cidrs_never_overlap_up_to_the_maximum() -> None:
    cidrs = [n.pod_cidr for n in plan("big", 64).nodes]
    assert len(set(cidrs)) == 64
    assert cidrs[-1] == "10.244.252.0/22"


@pytest.mark.parametrize("name", ["", "Demo", "1abc", "a-b", "abcdefghijklm", "a_b"])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(TopologyError, match="invalid sandbox name"):
        prefix_for(name)


@pytest.mark.parametrize("count", [0, 65])
def test_node_count_bounds(count: int) -> None:
    with pytest.raises(TopologyError, match="1 to 64 nodes"):
        plan("demo", count)


def test_no_prefix_is_the_start_of_another() -> None:
    # Names cannot contain the separator, so "acni-a-" never prefixes "acni-ab-...".
    assert not prefix_for("ab").startswith(prefix_for("a"))


def test_the_pod_network_is_kept_and_defaults_to_the_bridge() -> None:
    assert plan("demo", 1).pod_network == "bridge"
    ptp = plan("demo", 1, "ptp")
    assert Topology.model_validate_json(ptp.model_dump_json()) == ptp
    # A state file written before the option existed reads as the bridge network.
    older = ptp.model_dump(exclude={"pod_network"})
    assert Topology.model_validate(older).pod_network == "bridge"
    with pytest.raises(TopologyError, match="pod network"):
        plan("demo", 1, "vxlan")  # type: ignore[arg-type]
