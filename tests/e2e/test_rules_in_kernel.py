"""The kernel accepts every rendered ruleset, in one iptables-restore transaction each."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from ambient_cni.dataplane.constants import Family
from ambient_cni.dataplane.iptables_rules import host_ruleset, pod_ruleset
from ambient_cni.dataplane.redirection import PodRedirect

VARIANTS = [
    PodRedirect(),
    PodRedirect(family=6),
    PodRedirect(dns_capture=False),
    PodRedirect(bypass_inbound=True, virtual_interfaces=("tun0", "eth1")),
    PodRedirect(family=6, bypass_inbound=True, dns_capture=False, virtual_interfaces=("tun0",)),
]


def run(netns: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    # The acni-<name>- prefix makes a leftover from a crashed run removable by
    # `ambient-cni sandbox down --all` (as sandbox "test").
    name = f"acni-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.parametrize("redirect", VARIANTS, ids=lambda r: str(r).replace(" ", ","))
def test_pod_ruleset_applies_in_one_transaction(scratch_netns: str, redirect: PodRedirect) -> None:
    restore = "iptables-restore" if redirect.family == 4 else "ip6tables-restore"
    save = "iptables-save" if redirect.family == 4 else "ip6tables-save"
    result = run(scratch_netns, restore, "--noflush", stdin=pod_ruleset(redirect))
    assert result.returncode == 0, result.stderr
    saved = run(scratch_netns, save).stdout
    rules = [line for line in saved.splitlines() if line.startswith("-A ")]
    expected = [line for line in pod_ruleset(redirect).splitlines() if line.startswith("-A ")]
    assert len(rules) == len(expected), saved
    assert ":ISTIO_PRERT" in saved
    assert (
        (":ISTIO_PRERT" in saved.split("*raw")[1]) if redirect.dns_capture else "*raw" not in saved
    )

    # Applying again must fail as a whole (the chains exist) and change nothing.
    again = run(scratch_netns, restore, "--noflush", stdin=pod_ruleset(redirect))
    assert again.returncode != 0
    assert run(scratch_netns, save).stdout.count("-A ") == saved.count("-A ")


@pytest.mark.parametrize("family", [4, 6])
def test_host_ruleset_applies_with_its_ipset(scratch_netns: str, family: Family) -> None:
    fam = family
    set_name = f"istio-inpod-probes-v{fam}"
    created = run(
        scratch_netns,
        "ipset",
        "create",
        set_name,
        "hash:ip",
        "family",
        "inet" if fam == 4 else "inet6",
        "comment",
    )
    assert created.returncode == 0, created.stderr
    restore = "iptables-restore" if fam == 4 else "ip6tables-restore"
    result = run(scratch_netns, restore, "--noflush", stdin=host_ruleset(fam))
    assert result.returncode == 0, result.stderr
    save = "iptables-save" if fam == 4 else "ip6tables-save"
    saved = run(scratch_netns, save, "-t", "nat").stdout
    assert "-A POSTROUTING -j ISTIO_POSTRT" in saved
    assert f"--match-set {set_name} dst -j SNAT --to-source" in saved
