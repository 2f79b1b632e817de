from __future__ import annotations

import pytest

from ambient_cni_sandbox.topology import (
    NodePlan,
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


def test_a_dual_stack_node_has_both_families_ipv4_first() -> None:
    topology = plan("demo", 2)  # dual is the default
    assert topology.ip_family == "dual"
    assert topology.ip_versions == (4, 6)
    assert [(n.ips, n.pod_cidrs, n.gateways) for n in topology.nodes] == [
        (
            ("172.18.0.11", "fd00:172:18::11"),
            ("10.244.0.0/22", "fd00:10:244::/64"),
            ("10.244.0.1", "fd00:10:244::1"),
        ),
        (
            ("172.18.0.12", "fd00:172:18::12"),
            ("10.244.4.0/22", "fd00:10:244:1::/64"),
            ("10.244.4.1", "fd00:10:244:1::1"),
        ),
    ]
    node = topology.nodes[1]
    # The single values are the first family's, as before dual-stack.
    assert (node.ip, node.pod_cidr, node.gateway) == ("172.18.0.12", "10.244.4.0/22", "10.244.4.1")
    assert node.ip_versions == (4, 6)
    assert (node.ip_of(6), node.pod_cidr_of(6), node.gateway_of(6)) == (
        "fd00:172:18::12",
        "fd00:10:244:1::/64",
        "fd00:10:244:1::1",
    )


def test_an_ipv4_sandbox_is_the_sandbox_before_dual_stack() -> None:
    dual, ipv4 = plan("demo", 3), plan("demo", 3, ip_family="ipv4")
    assert ipv4.ip_versions == (4,)
    for old, new in zip(dual.nodes, ipv4.nodes, strict=True):
        assert (new.ip, new.pod_cidr, new.gateway) == (old.ip, old.pod_cidr, old.gateway)
        assert (new.ips, new.pod_cidrs, new.gateways) == (
            (new.ip,),
            (new.pod_cidr,),
            (new.gateway,),
        )
        assert new.ip_of(6) is None


def test_an_ipv6_sandbox_has_ipv6_alone() -> None:
    node = plan("demo", 2, "ptp", "ipv6").nodes[0]
    assert (node.ip, node.pod_cidr, node.gateway) == (
        "fd00:172:18::11",
        "fd00:10:244::/64",
        "fd00:10:244::1",
    )
    assert (node.ips, node.ip_versions, node.ip_of(4)) == (("fd00:172:18::11",), (6,), None)


def test_ipv6_pod_cidrs_never_overlap_up_to_the_maximum() -> None:
    nodes = plan("big", 64, ip_family="ipv6").nodes
    assert len({n.pod_cidr for n in nodes}) == len({n.ip for n in nodes}) == 64
    assert (nodes[-1].pod_cidr, nodes[-1].ip) == ("fd00:10:244:3f::/64", "fd00:172:18::74")


def test_a_state_file_from_before_dual_stack_reads_as_ipv4() -> None:
    dual = plan("demo", 2, "ptp")
    assert Topology.model_validate_json(dual.model_dump_json()) == dual
    older = plan("demo", 2, "ptp", "ipv4").model_dump(
        exclude={"ip_family": True, "nodes": {"__all__": {"ips", "pod_cidrs", "gateways"}}}
    )
    assert "ips" not in older["nodes"][0]
    assert Topology.model_validate(older) == plan("demo", 2, "ptp", "ipv4")


def test_the_single_values_must_be_the_first_family() -> None:
    fields = plan("demo", 1).nodes[0].model_dump()
    with pytest.raises(ValueError, match="first of"):
        NodePlan.model_validate({**fields, "ip": "fd00:172:18::11"})
    with pytest.raises(ValueError, match="one entry per family"):
        NodePlan.model_validate({**fields, "gateways": (fields["gateway"],)})


def test_an_unknown_ip_family_is_refused() -> None:
    with pytest.raises(TopologyError, match="IP family"):
        plan("demo", 1, ip_family="ipv5")  # type: ignore[arg-type]
