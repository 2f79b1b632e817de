"""Rendered rulesets against golden files; the default one is the reference sheet's text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ambient_cni.api.models import Workload
from ambient_cni.dataplane.iptables_rules import host_ruleset, pod_ruleset
from ambient_cni.dataplane.redirection import PodRedirect, pod_redirect

GOLDEN = Path(__file__).parent / "golden" / "iptables"
# Regenerate the generated goldens with AMBIENT_CNI_UPDATE_GOLDEN=1 (never the default one).
UPDATE = os.environ.get("AMBIENT_CNI_UPDATE_GOLDEN") == "1"

VARIANTS = {
    "pod_default_v6": PodRedirect(family=6),
    "pod_no_dns_v4": PodRedirect(dns_capture=False),
    "pod_bypass_inbound_v4": PodRedirect(bypass_inbound=True),
    "pod_virtual_interfaces_v4": PodRedirect(virtual_interfaces=("tun0", "eth1")),
    "pod_bypass_and_interfaces_no_dns_v6": PodRedirect(
        family=6, bypass_inbound=True, dns_capture=False, virtual_interfaces=("tun0",)
    ),
}


def test_default_pod_ruleset_is_the_reference_sheets() -> None:
    # Written by hand from reference section 2.1: never regenerated.
    assert pod_ruleset(PodRedirect()) == (GOLDEN / "pod_default_v4.rules").read_text()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_pod_ruleset_variants(name: str) -> None:
    check(name, pod_ruleset(VARIANTS[name]))


@pytest.mark.parametrize("family", [4, 6])
def test_host_ruleset(family: int) -> None:
    check(f"host_v{family}", host_ruleset(4 if family == 4 else 6))


def check(name: str, rendered: str) -> None:
    golden = GOLDEN / f"{name}.rules"
    if UPDATE:
        golden.write_text(rendered)
    assert rendered == golden.read_text(), (
        f"{golden} differs (AMBIENT_CNI_UPDATE_GOLDEN=1 to accept)"
    )


def test_no_dns_drops_the_raw_table_and_dns_redirects() -> None:
    text = pod_ruleset(PodRedirect(dns_capture=False))
    assert "*raw" not in text
    assert "15053" not in text


def test_bypass_inbound_drops_only_the_inbound_rules() -> None:
    text = pod_ruleset(PodRedirect(bypass_inbound=True))
    assert "--to-ports 15006" not in text
    assert "-A ISTIO_PRERT -s 169.254.7.127" not in text
    assert "-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT" in text


def test_virtual_interfaces_come_first_in_prerouting() -> None:
    lines = pod_ruleset(PodRedirect(virtual_interfaces=("tun0",))).splitlines()
    prerouting = [line for line in lines if line.startswith("-A ISTIO_PRERT")]
    nat_start = lines.index("*nat")
    first_nat_rule = next(line for line in lines[nat_start:] if line.startswith("-A ISTIO_PRERT"))
    assert first_nat_rule == "-A ISTIO_PRERT -i tun0 -p tcp -j REDIRECT --to-ports 15001"
    assert "-A ISTIO_PRERT -i tun0 -p tcp -j RETURN" in prerouting


@pytest.mark.parametrize(
    ("knobs", "default", "expected"),
    [
        ({}, True, PodRedirect()),
        ({}, False, PodRedirect(dns_capture=False)),
        ({"dns_capture": True}, False, PodRedirect()),
        ({"dns_capture": False}, True, PodRedirect(dns_capture=False)),
        ({"bypass_inbound_capture": True}, True, PodRedirect(bypass_inbound=True)),
        ({"reroute_virtual_interfaces": ["tun0"]}, True, PodRedirect(virtual_interfaces=("tun0",))),
    ],
)
def test_pod_redirect_from_a_spec_entry(
    knobs: dict[str, object], default: bool, expected: PodRedirect
) -> None:
    workload = Workload.model_validate(
        {"uid": "u", "name": "n", "namespace": "ns", "ips": ["10.0.0.1"], **knobs}
    )
    assert pod_redirect(workload, 4, default) == expected
