"""Applying, checking and removing one pod's redirection in a real network namespace."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient_cni.dataplane import factory
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.iptables_pod import IptablesPodDataplane
from ambient_cni.dataplane.iptables_rules import pod_ruleset
from ambient_cni.dataplane.iptables_state import our_rules
from ambient_cni.dataplane.redirection import PodRedirect
from ambient_cni.dataplane.runner import SubprocessRunner
from tests.e2e.kernel import scratch_netns


def sh(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def pod_netns() -> Iterator[str]:
    with scratch_netns() as name:
        yield name


@pytest.fixture(scope="module")
def rules() -> IptablesPodDataplane:
    # The flavour this machine's own rules use, as the agent would pick on it.
    pods = factory.build(factory.detect(SubprocessRunner())).pods
    assert isinstance(pods, IptablesPodDataplane)
    return pods


def rule_count(netns: str, family: int = 4) -> int:
    save = "iptables-save" if family == 4 else "ip6tables-save"
    return sum(1 for line in sh(netns, save).splitlines() if line.startswith("-A "))


def policy_routing(netns: str, family: int = 4) -> tuple[str, str]:
    flag = "-4" if family == 4 else "-6"
    rule = [
        line for line in sh(netns, "ip", flag, "rule").splitlines() if line.startswith("32764:")
    ]
    route = sh(netns, "ip", flag, "route", "show", "table", "100")
    return "\n".join(rule), route.strip()


def test_ensure_applies_once_and_is_idempotent(rules: IptablesPodDataplane, pod_netns: str) -> None:
    redirect = PodRedirect()
    assert bool(rules.ensure(pod_netns, [redirect])) is True
    assert rules.verify(pod_netns, [redirect])
    count = rule_count(pod_netns)
    assert count == pod_ruleset(redirect).count("\n-A ")  # every rendered rule, read back
    rule, route = policy_routing(pod_netns)
    assert "fwmark 0x111/0xfff lookup 100" in rule
    assert route.startswith("local default dev lo")

    assert bool(rules.ensure(pod_netns, [redirect])) is False
    assert rule_count(pod_netns) == count
    assert len(policy_routing(pod_netns)[0].splitlines()) == 1


def test_drift_is_detected_and_repaired(rules: IptablesPodDataplane, pod_netns: str) -> None:
    redirect = PodRedirect()
    rules.ensure(pod_netns, [redirect])
    count = rule_count(pod_netns)
    sh(pod_netns, "iptables", "-t", "nat", "-F", "ISTIO_OUTPUT")
    assert not rules.verify(pod_netns, [redirect])
    assert bool(rules.ensure(pod_netns, [redirect])) is True
    assert rules.verify(pod_netns, [redirect])
    assert rule_count(pod_netns) == count


def test_changing_knobs_replaces_the_ruleset(rules: IptablesPodDataplane, pod_netns: str) -> None:
    rules.ensure(pod_netns, [PodRedirect()])
    no_dns = PodRedirect(dns_capture=False, bypass_inbound=True)
    assert bool(rules.ensure(pod_netns, [no_dns])) is True
    assert rules.verify(pod_netns, [no_dns])
    saved = sh(pod_netns, "iptables-save")
    assert set(our_rules(saved)) == {"mangle", "nat"}  # raw held only DNS rules
    assert "15053" not in saved
    assert "15006" not in saved


def test_remove_leaves_nothing(rules: IptablesPodDataplane, pod_netns: str) -> None:
    rules.ensure(pod_netns, [PodRedirect(), PodRedirect(family=6)])
    assert rule_count(pod_netns, 6) > 0
    assert rules.remove(pod_netns) is True
    for family in (4, 6):
        assert "ISTIO" not in sh(pod_netns, "iptables-save" if family == 4 else "ip6tables-save")
        assert policy_routing(pod_netns, family) == ("", "")
    assert rules.remove(pod_netns) is False


def test_ipv6_ruleset_and_routing(rules: IptablesPodDataplane, pod_netns: str) -> None:
    redirect = PodRedirect(family=6)
    assert bool(rules.ensure(pod_netns, [redirect])) is True
    assert rules.verify(pod_netns, [redirect])
    rule, route = policy_routing(pod_netns, 6)
    assert "fwmark 0x111/0xfff lookup 100" in rule
    assert route.startswith("local default dev lo")


def test_a_rule_the_kernel_refuses_fails_clearly_and_changes_nothing(
    rules: IptablesPodDataplane, pod_netns: str
) -> None:
    # No input reaches iptables unchecked any more, so the kernel is made to refuse a
    # ruleset here by hand: it matches on an ipset that does not exist.
    rules.ensure(pod_netns, [PodRedirect()])
    before = sh(pod_netns, "iptables-save")
    refused = pod_ruleset(PodRedirect()).replace(
        "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-A ISTIO_OUTPUT -m set --match-set acni-no-such-set dst -j ACCEPT",
    )
    path = Path("/run/netns", pod_netns)
    with pytest.raises(DataplaneError) as caught:
        rules.runner.within(path, lambda run: rules.chains.ensure(run, 4, refused))
    assert caught.value.reason == "RuleRejected"
    assert "acni-no-such-set" in caught.value.message  # the kernel's own words
    assert sh(pod_netns, "iptables-save").count("-A ") == before.count("-A ")
    assert rules.verify(pod_netns, [PodRedirect()])


def test_a_name_that_is_not_an_interface_never_reaches_the_kernel(
    rules: IptablesPodDataplane, pod_netns: str
) -> None:
    before = sh(pod_netns, "iptables-save")
    hostile = PodRedirect.model_construct(virtual_interfaces=("eth0\n-A ISTIO_OUTPUT -j DROP",))
    with pytest.raises(DataplaneError) as caught:
        rules.ensure(pod_netns, [hostile])
    assert caught.value.reason == "UnsafeInput"
    assert sh(pod_netns, "iptables-save") == before


def test_a_missing_netns_is_reported_as_such(rules: IptablesPodDataplane) -> None:
    with pytest.raises(DataplaneError) as caught:
        rules.ensure(Path("/run/netns/acni-test-does-not-exist"), [PodRedirect()])
    assert caught.value.reason == "NetnsNotFound"
    assert not caught.value.retryable
