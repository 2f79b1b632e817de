"""A sidecar pod's capture rendered as iptables-restore input, against golden files.

The eight cases named after Istio's CNI plugin goldens (cni/pkg/plugin/testdata/
<name>.txt.golden) were compared with them line for line at istio/istio commit
86c9f01fd735 and are equal; the others follow the same steps of the reference
sheet (section 3) and were reviewed rule by rule against it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ambient_cni.api.models import SidecarCapture
from ambient_cni.dataplane.errors import UnsafeInput
from ambient_cni.dataplane.sidecar_rules import families, sidecar_ruleset

GOLDEN = Path(__file__).parent / "golden" / "sidecar"
UPDATE = os.environ.get("AMBIENT_CNI_UPDATE_GOLDEN") == "1"

CASES: dict[str, tuple[SidecarCapture, int]] = {
    # Istio's own plugin goldens, same names.
    "basic": (SidecarCapture(), 4),
    "tproxy": (SidecarCapture(interception_mode="TPROXY"), 4),
    "dns": (SidecarCapture(dns_capture=True), 4),
    "include-exclude-ip": (
        SidecarCapture(
            capture_all_outbound=False,
            include_outbound_ip_ranges=["127.0.0.0/8"],
            exclude_outbound_ip_ranges=["10.0.0.0/8"],
        ),
        4,
    ),
    "include-exclude-ports": (
        SidecarCapture(
            capture_all_inbound=False,
            include_inbound_ports=[1111, 2222],
            exclude_outbound_ports=[5555, 6666],
        ),
        4,
    ),
    "custom-uid": (SidecarCapture(proxy_uid=1000670000, proxy_gid=1000670001), 4),
    "custom-uid-tproxy": (
        SidecarCapture(interception_mode="TPROXY", proxy_uid=1000670000, proxy_gid=1000670001),
        4,
    ),
    "invalid-drop": (SidecarCapture(invalid_drop=True), 4),
    # This project's, from the sheet's steps.
    "ranges-and-inbound-exclusion": (
        SidecarCapture(
            capture_all_outbound=False,
            include_outbound_ip_ranges=["10.0.0.0/8", "fd00::/8"],
            exclude_inbound_ports=[3306, 15020, 15021, 15090],
        ),
        4,
    ),
    "ranges-and-inbound-exclusion-v6": (
        SidecarCapture(
            capture_all_outbound=False,
            include_outbound_ip_ranges=["10.0.0.0/8", "fd00::/8"],
            exclude_inbound_ports=[3306, 15020, 15021, 15090],
        ),
        6,
    ),
    "ipv6-dns-tproxy": (SidecarCapture(interception_mode="TPROXY", dns_capture=True), 6),
    "tproxy-inbound-ports": (
        SidecarCapture(
            interception_mode="TPROXY", capture_all_inbound=False, include_inbound_ports=[8080]
        ),
        4,
    ),
    "tproxy-no-inbound": (SidecarCapture(interception_mode="TPROXY", capture_all_inbound=False), 4),
    "interfaces": (
        SidecarCapture(
            interception_mode="TPROXY",
            exclude_interfaces=["eth1"],
            reroute_virtual_interfaces=["tun0", "tun1"],
        ),
        4,
    ),
    "virtual-interfaces-ranges": (
        SidecarCapture(
            capture_all_outbound=False,
            include_outbound_ip_ranges=["10.0.0.0/8", "192.168.0.0/16"],
            reroute_virtual_interfaces=["tun0"],
        ),
        4,
    ),
    "outbound-ports-no-outbound": (
        SidecarCapture(
            capture_all_outbound=False, include_outbound_ports=[443], exclude_outbound_ports=[]
        ),
        4,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_as_the_golden_file(name: str) -> None:
    capture, family = CASES[name]
    rendered = sidecar_ruleset(capture, 4 if family == 4 else 6)
    golden = GOLDEN / f"{name}.rules"
    if UPDATE:
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"{golden} differs (AMBIENT_CNI_UPDATE_GOLDEN=1)"


@pytest.mark.parametrize(
    ("dual_stack", "ips", "expected"),
    [
        (False, ["10.0.0.5"], (4,)),
        # Istio takes the first interface address, and the kernel lists IPv4 first.
        (False, ["10.0.0.5", "fd00::5"], (4,)),
        (False, ["fd00::5", "10.0.0.5"], (4,)),
        (False, ["fd00::5"], (4, 6)),
        (True, ["10.0.0.5", "fd00::5"], (4, 6)),
        (True, ["10.0.0.5"], (4,)),
    ],
)
def test_ipv6_rules_only_where_istio_writes_them(
    dual_stack: bool, ips: list[str], expected: tuple[int, ...]
) -> None:
    assert families(SidecarCapture(dual_stack=dual_stack), ips) == expected


def test_a_value_that_slipped_past_the_model_never_reaches_a_rule() -> None:
    bad = SidecarCapture.model_construct(
        **{**SidecarCapture().__dict__, "exclude_interfaces": ["eth0 -j ACCEPT"]}
    )
    with pytest.raises(UnsafeInput):
        sidecar_ruleset(bad, 4)
