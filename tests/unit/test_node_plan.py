"""The legacy node mode's routes and rules, said as the `ip` commands Istio ran: equal to
the ones source document 000's agent log prints, in its order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ambient_cni.dataplane.node_plan import (
    TunnelKind,
    as_ip_command,
    as_rule_command,
    host_routes,
    host_rules,
    host_tunnels,
    pod_route,
    ztunnel_rules,
)
from ambient_cni.dataplane.node_rules import NodeHost

DOC_000 = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "000_aca19a760a174693.txt"
# The node whose agent log document 000 prints.
NODE = NodeHost(ztunnel_veth="veth87a7244e", ztunnel_ip="10.244.1.5", host_ip="10.244.1.1")


@pytest.mark.skipif(not DOC_000.exists(), reason="the source documents are not beside the repo")
def test_routes_and_rules_are_the_commands_istio_ran() -> None:
    logged = re.findall(r"Running command: (ip (?:route|rule) add .*)", DOC_000.read_text())
    ours = [as_ip_command(r) for r in host_routes(NODE)] + [
        as_rule_command(r) for r in host_rules()
    ]
    assert ours == logged[: len(ours)]


@pytest.mark.skipif(not DOC_000.exists(), reason="the source documents are not beside the repo")
def test_a_pods_route_is_the_one_istio_added() -> None:
    node = NodeHost(ztunnel_veth="veth1", ztunnel_ip="10.244.2.3", host_ip="10.244.2.1")
    logged = re.search(r"Adding route for [^:]+: \[(table 100 [^\]]+)\]", DOC_000.read_text())
    assert logged is not None
    assert as_ip_command(pod_route("10.244.2.19", node)) == f"ip route add {logged.group(1)}"


def test_tunnels_keep_istios_names_vnis_and_addresses_in_either_kind() -> None:
    kinds: tuple[TunnelKind, ...] = ("geneve", "vxlan")
    for kind in kinds:
        inbound, outbound = host_tunnels(NODE, kind)
        assert (inbound.name, inbound.vni, inbound.address) == ("istioin", 1000, "192.168.126.1/30")
        assert (outbound.name, outbound.vni, outbound.address) == (
            "istioout",
            1001,
            "192.168.127.1/30",
        )
        assert inbound.remote == outbound.remote == "10.244.1.5"
    assert [as_rule_command(r) for r in ztunnel_rules()] == [
        "ip rule add priority 20000 fwmark 0x400/0xfff lookup 100",
        "ip rule add priority 20003 fwmark 0x4d3/0xfff lookup 100",
    ]
