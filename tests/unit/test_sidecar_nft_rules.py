"""A sidecar pod's capture as native nftables, against golden files.

The cases named after Istio's nftables engine goldens (tools/istio-nftables/pkg/capture/
testdata/<name>.golden) were compared with them line for line at istio/istio commit
86c9f01fd735 and are equal: those are the engine's base settings (no ports excluded, no
outbound capture unless asked), which SidecarCapture expresses as BASE below. The others
are the CNI plugin's own settings, from the same steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ambient_cni.api.models import SidecarCapture
from ambient_cni.dataplane.constants import Family
from ambient_cni.dataplane.sidecar_nft_rules import sidecar_nft_ruleset

GOLDEN = Path(__file__).parent / "golden" / "sidecar_nft"
UPDATE = os.environ.get("AMBIENT_CNI_UPDATE_GOLDEN") == "1"
BASE = {
    "capture_all_inbound": False,
    "exclude_inbound_ports": [],
    "capture_all_outbound": False,
    "exclude_outbound_ports": [],
}
V4: tuple[Family, ...] = (4,)
DUAL: tuple[Family, ...] = (4, 6)


def engine(**options: object) -> SidecarCapture:
    return SidecarCapture.model_validate({**BASE, **options})


CASES: dict[str, tuple[SidecarCapture, tuple[Family, ...]]] = {
    # Istio's engine goldens, same names.
    "empty": (engine(), V4),
    "ipv6-empty-inbound-ports": (engine(), DUAL),
    "ipv6-inbound-ports": (engine(include_inbound_ports=[4000, 5000]), DUAL),
    "ipv6-virt-interfaces": (
        engine(include_inbound_ports=[4000, 5000], reroute_virtual_interfaces=["eth0", "eth1"]),
        DUAL,
    ),
    "ipv6-ipnets": (
        engine(
            include_inbound_ports=[4000, 5000],
            exclude_inbound_ports=[6000, 7000],
            reroute_virtual_interfaces=["eth0", "eth1"],
            include_outbound_ip_ranges=["2001:db8::/32"],
            exclude_outbound_ip_ranges=["2001:db8::/32"],
        ),
        DUAL,
    ),
    "ipv6-outbound-ports": (engine(include_outbound_ports=[32000, 31000]), DUAL),
    "kube-virt-interfaces": (
        engine(reroute_virtual_interfaces=["eth1", "eth2"], capture_all_outbound=True),
        V4,
    ),
    "ipnets": (engine(include_outbound_ip_ranges=["10.0.0.0/8"]), V4),
    "ipnets-with-kube-virt-interfaces": (
        engine(
            reroute_virtual_interfaces=["eth1", "eth2"], include_outbound_ip_ranges=["10.0.0.0/8"]
        ),
        V4,
    ),
    "inbound-ports-include": (engine(include_inbound_ports=[32000, 31000]), V4),
    "inbound-ports-wildcard": (engine(capture_all_inbound=True), V4),
    "inbound-ports-tproxy": (
        engine(include_inbound_ports=[32000, 31000], interception_mode="TPROXY"),
        V4,
    ),
    "inbound-ports-wildcard-tproxy": (
        engine(capture_all_inbound=True, interception_mode="TPROXY"),
        V4,
    ),
    "inbound-ports-empty-tproxy": (engine(interception_mode="TPROXY"), V4),
    # The CNI plugin's settings (this project's files).
    "cni-default": (SidecarCapture(), V4),
    "cni-dns-dual": (SidecarCapture(dns_capture=True), DUAL),
    "cni-tproxy-dual": (SidecarCapture(interception_mode="TPROXY"), DUAL),
    "cni-interfaces-drop-invalid": (
        SidecarCapture(interception_mode="TPROXY", exclude_interfaces=["eth1"], invalid_drop=True),
        V4,
    ),
    "cni-loopback-include": (
        SidecarCapture(
            capture_all_outbound=False,
            include_outbound_ip_ranges=["127.0.0.0/8"],
            exclude_outbound_ip_ranges=["10.0.0.0/8"],
        ),
        V4,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_as_the_golden_file(name: str) -> None:
    capture, families = CASES[name]
    rendered = sidecar_nft_ruleset(capture, families)
    golden = GOLDEN / f"{name}.nft"
    if UPDATE:
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"{golden} differs (AMBIENT_CNI_UPDATE_GOLDEN=1)"
