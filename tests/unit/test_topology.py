from __future__ import annotations

import pytest

from ambient_cni_sandbox.topology import (
    TopologyError,
    host_veth_name,
    next_free_ip,
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


def test_host_veth_name_fits_ifnamsiz_and_is_stable() -> None:
    name = host_veth_name("0b8f7c1e-4b8a-4f62-9f0e-5a4d2b0c9e11")
    assert len(name) <= 15
    assert name == host_veth_name("0b8f7c1e-4b8a-4f62-9f0e-5a4d2b0c9e11")
    assert name != host_veth_name("another-uid")


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        ([], "10.244.0.2"),
        (["10.244.0.2"], "10.244.0.3"),
        (["10.244.0.3"], "10.244.0.2"),
        (["10.244.0.2", "10.244.0.3", "10.244.0.5"], "10.244.0.4"),
    ],
)
def test_next_free_ip_skips_gateway_and_used(used: list[str], expected: str) -> None:
    assert next_free_ip("10.244.0.0/22", used) == expected


def test_next_free_ip_reports_a_full_cidr() -> None:
    with pytest.raises(TopologyError, match="full"):
        next_free_ip("10.0.0.0/30", ["10.0.0.2"])
