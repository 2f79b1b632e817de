"""The native nftables rulesets: line for line Istio's own goldens, and golden files of ours.

tests/unit/golden/nftables/istio/ holds Istio's test data, as it is in
istio/istio at 86c9f01fd735 (cni/pkg/nftables/testdata): they use the test IPv6
probe address and kubelet UID 1000, which the renderer takes as parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ambient_cni.dataplane.errors import UnsafeInput
from ambient_cni.dataplane.nft_rules import (
    delete_tables,
    host_nft_ruleset,
    host_nft_sets,
    pod_nft_ruleset,
    pod_nft_tables,
)
from ambient_cni.dataplane.redirection import PodRedirect

GOLDEN = Path(__file__).parent / "golden" / "nftables"
ISTIO = GOLDEN / "istio"
ISTIO_PROBE_V6 = "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"
UPDATE = os.environ.get("AMBIENT_CNI_UPDATE_GOLDEN") == "1"


def both(**knobs: object) -> list[PodRedirect]:
    return [PodRedirect.model_validate({"family": f, **knobs}) for f in (4, 6)]


INGRESS_AND_INTERFACES = {
    "dns_capture": False,
    "bypass_inbound": True,
    "virtual_interfaces": ("fake1s0f0", "fake1s0f1"),
}


@pytest.mark.parametrize(
    ("golden", "redirects"),
    [
        ("default", [PodRedirect()]),
        ("default_ipv6", both()),
        ("dns_pod_disabled_and_on_globally", [PodRedirect(dns_capture=False)]),
        ("ingress_and_virtual_interfaces", [PodRedirect.model_validate(INGRESS_AND_INTERFACES)]),
        ("ingress_and_virtual_interfaces_ipv6", both(**INGRESS_AND_INTERFACES)),
    ],
)
def test_pod_rulesets_are_istios(golden: str, redirects: list[PodRedirect]) -> None:
    rendered = pod_nft_ruleset(redirects, probe_v6=ISTIO_PROBE_V6)
    assert rendered == (ISTIO / f"{golden}.golden").read_text()


def test_host_rules_are_istios() -> None:
    assert (
        host_nft_ruleset(1000, probe_v6=ISTIO_PROBE_V6)
        == (ISTIO / "hostprobe_ipv6.golden").read_text()
    )


VARIANTS = {
    "pod_default_v4": [PodRedirect()],
    "pod_default_dual": both(),
    "pod_default_v6": [PodRedirect(family=6)],
    "pod_no_dns_v4": [PodRedirect(dns_capture=False)],
    "pod_bypass_inbound_v4": [PodRedirect(bypass_inbound=True)],
    "pod_virtual_interfaces_dual": both(virtual_interfaces=("tun0", "eth1")),
    "pod_bypass_and_interfaces_no_dns_v6": [
        PodRedirect(family=6, bypass_inbound=True, dns_capture=False, virtual_interfaces=("tun0",))
    ],
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_pod_variants(name: str) -> None:
    check(name, pod_nft_ruleset(VARIANTS[name]))


def test_host_ruleset_and_sets() -> None:
    check("host", host_nft_sets() + host_nft_ruleset(0))


def check(name: str, rendered: str) -> None:
    golden = GOLDEN / f"{name}.nft"
    if UPDATE:
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"{golden} differs (AMBIENT_CNI_UPDATE_GOLDEN=1)"


def test_without_dns_capture_no_raw_table_and_no_port_53() -> None:
    redirects = [PodRedirect(dns_capture=False)]
    text = pod_nft_ruleset(redirects)
    assert "istio-ambient-raw" not in text
    assert "15053" not in text
    assert pod_nft_tables(redirects) == ("istio-ambient-nat", "istio-ambient-mangle")


def test_an_interface_name_is_checked_again_here() -> None:
    hostile = PodRedirect.model_construct(virtual_interfaces=("eth0 ; flush ruleset",))
    with pytest.raises(UnsafeInput):
        pod_nft_ruleset([hostile])


def test_deleting_tables_never_fails_on_a_missing_one() -> None:
    assert delete_tables(["a"]) == "add table inet a\ndelete table inet a\n"
