"""The legacy node mode's rules (Istio 1.20.8's), against golden files; the kernel's form of
them is compared with source document 000's listing in tests/e2e/test_node_rules.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ambient_cni.dataplane.errors import UnsafeInput
from ambient_cni.dataplane.node_rules import NodeHost, host_ruleset, ztunnel_ruleset

GOLDEN = Path(__file__).parent / "golden" / "node"
UPDATE = os.environ.get("AMBIENT_CNI_UPDATE_GOLDEN") == "1"
# The node of source document 000 (a kind worker).
DOC_000 = NodeHost(ztunnel_veth="veth9f651c51", ztunnel_ip="10.244.2.3", host_ip="10.244.2.1")

CASES = {
    "host_doc_000": host_ruleset(DOC_000),
    "host_dns_port_6082": host_ruleset(
        DOC_000.model_copy(update={"dns_capture": True, "tunnel_port": 6082})
    ),
    "ztunnel_doc_000": ztunnel_ruleset("10.244.2.3"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_as_the_golden_file(name: str) -> None:
    golden = GOLDEN / f"{name}.rules"
    if UPDATE:
        golden.write_text(CASES[name])
    assert CASES[name] == golden.read_text(), f"{golden} differs (AMBIENT_CNI_UPDATE_GOLDEN=1)"


def test_a_hostile_interface_name_never_reaches_a_rule() -> None:
    bad = NodeHost.model_construct(
        ztunnel_veth="eth0 -j ACCEPT", ztunnel_ip="10.0.0.1", host_ip="10.0.0.2"
    )
    with pytest.raises(UnsafeInput):
        host_ruleset(bad)
    with pytest.raises(UnsafeInput):
        ztunnel_ruleset("10.0.0.1", "eth0;x")
