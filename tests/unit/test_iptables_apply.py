"""The apply algorithm (learn, compare, replace; refused rules) over a fake runner, no root.

The e2e tests prove the same against the real kernel; these reach the paths
that are hard to provoke there: a half-applied namespace, a kernel that
loses a rule, a restore failing half-way, the exact commands each path runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import NO_CHANGES, Exec
from ambient_cni.dataplane.iptables_chains import IptablesChains
from ambient_cni.dataplane.iptables_flavour import Flavour, detect_flavour
from ambient_cni.dataplane.iptables_host import IptablesHostDataplane
from ambient_cni.dataplane.iptables_pod import IptablesPodDataplane
from ambient_cni.dataplane.iptables_rules import host_ruleset, pod_ruleset
from ambient_cni.dataplane.redirection import PodRedirect
from tests.unit.fake_kernel import FakeAddressSets, FakeIptables, FakeRouting

NFT = Flavour("nft")


def at(iptables: FakeIptables, netns: Path) -> Exec:
    """The Exec a runner hands out inside `netns`."""
    return lambda argv, stdin: iptables.run(argv, netns=netns, stdin=stdin)


DEFAULT = pod_ruleset(PodRedirect())


@pytest.fixture
def iptables() -> FakeIptables:
    return FakeIptables()


def enrolled(iptables: FakeIptables, pod: Path) -> tuple[IptablesChains, list[str]]:
    """Our rules applied to a fresh namespace; returns the chains and the rules it holds."""
    chains = IptablesChains(NFT, iptables)
    chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)
    before = iptables.rules(pod)
    iptables.calls.clear()
    return chains, before


@pytest.fixture
def pod(tmp_path: Path) -> Path:
    # A real file, so the fast-path memory (keyed by inode) tells pods apart.
    path = tmp_path / "pod-netns"
    path.touch()
    return path


def test_learning_happens_once_in_scratch_and_reads_back_the_kernels_spelling(
    iptables: FakeIptables,
) -> None:
    chains = IptablesChains(NFT, iptables)
    learnt = chains.learn(4, DEFAULT)
    assert chains.learn(4, DEFAULT) is learnt  # cached: one scratch namespace per ruleset
    assert [where for where, _, _ in iptables.calls] == ["scratch-0", "scratch-0"]
    nat = "\n".join(learnt["nat"])
    assert "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 " in nat
    assert "--to-port 15053" not in nat  # the input's spelling
    assert "--to-ports 15053" in nat
    assert ":ISTIO_PRERT" in learnt["mangle"]


def test_a_fresh_namespace_takes_one_restore_and_nothing_else(
    iptables: FakeIptables, pod: Path
) -> None:
    chains = IptablesChains(NFT, iptables)
    assert bool(chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)) is True
    assert iptables.calls_in(pod) == ["restore"]
    assert chains.read(at(iptables, pod), 4) == chains.learn(4, DEFAULT)


def test_a_namespace_already_right_is_read_once_and_left_alone(
    iptables: FakeIptables, pod: Path
) -> None:
    chains, before = enrolled(iptables, pod)
    assert bool(chains.ensure(at(iptables, pod), 4, DEFAULT)) is False
    assert iptables.calls_in(pod) == ["save"]
    # Even when asked to try the fast path (an agent restart): its -N fails, nothing changes.
    assert bool(chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)) is False
    assert iptables.rules(pod) == before


def test_drift_is_replaced_in_one_restore_and_foreign_rules_survive(
    iptables: FakeIptables, pod: Path
) -> None:
    chains = IptablesChains(NFT, iptables)
    iptables.add_foreign(str(pod), "nat", "-N CNI_HOSTPORT", "-A PREROUTING -j CNI_HOSTPORT")
    chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)
    table = iptables.state[(str(pod), 4)]["nat"]
    table.rules = [r for r in table.rules if not r.startswith("-A ISTIO_OUTPUT")]  # flushed
    iptables.calls.clear()

    changes = chains.ensure(at(iptables, pod), 4, DEFAULT)
    assert [(c.kind, c.what) for c in changes.items] == [
        ("rules", "IPv4 nat: 6 of our rules missing: replaced in one transaction")
    ]
    assert iptables.calls_in(pod) == ["save", "restore", "save"]  # read, replace, verify
    assert chains.read(at(iptables, pod), 4) == chains.learn(4, DEFAULT)
    assert "nat: -A PREROUTING -j CNI_HOSTPORT" in iptables.rules(pod)
    assert sum(r.endswith("-j ISTIO_PRERT") for r in iptables.rules(pod)) == 3  # one per table


def test_a_half_applied_namespace_is_completed_exactly(iptables: FakeIptables, pod: Path) -> None:
    chains = IptablesChains(NFT, iptables)
    # Only the nat table holds our chains (e.g. an older agent died half-way).
    nat_only = "*nat\n" + DEFAULT.split("*nat\n")[1].split("*raw")[0]
    assert iptables.restore(iptables.state.setdefault((str(pod), 4), {}), nat_only).returncode == 0
    # The fast path commits mangle, then fails on nat's -N; the replace path finishes.
    assert bool(chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)) is True
    assert chains.read(at(iptables, pod), 4) == chains.learn(4, DEFAULT)


def test_a_refused_ruleset_fails_in_scratch_and_never_touches_the_pod(
    iptables: FakeIptables, pod: Path
) -> None:
    chains, before = enrolled(iptables, pod)
    iptables.refuse = "tun-refused"
    bad = pod_ruleset(PodRedirect(virtual_interfaces=("tun-refused",)))
    with pytest.raises(DataplaneError) as caught:
        chains.ensure(at(iptables, pod), 4, bad, try_fresh=True)
    assert caught.value.reason == "RuleRejected"
    assert "refused by the kernel" in caught.value.message  # the kernel's own words
    assert not caught.value.retryable
    assert iptables.calls_in(pod) == []
    assert iptables.rules(pod) == before


def test_rules_the_kernel_loses_are_reported_not_trusted(iptables: FakeIptables, pod: Path) -> None:
    chains = IptablesChains(NFT, iptables)
    chains.learn(4, DEFAULT)  # learnt from an honest kernel
    iptables.add_foreign(str(pod), "nat", "-N ISTIO_OUTPUT", "-A OUTPUT -j ISTIO_OUTPUT")
    iptables.lose = "--to-ports 15001"
    with pytest.raises(DataplaneError) as caught:
        chains.ensure(at(iptables, pod), 4, DEFAULT)
    assert caught.value.reason == "RulesNotApplied"
    assert caught.value.retryable


def test_a_failing_read_is_an_error_not_an_empty_namespace(
    iptables: FakeIptables, pod: Path
) -> None:
    chains = IptablesChains(NFT, iptables)
    iptables.missing.add(str(pod))
    with pytest.raises(DataplaneError) as caught:
        chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)
    assert caught.value.reason == "NetnsNotFound"


def test_changing_knobs_drops_the_tables_the_new_ruleset_no_longer_uses(
    iptables: FakeIptables, pod: Path
) -> None:
    chains = IptablesChains(NFT, iptables)
    chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)
    no_dns = pod_ruleset(PodRedirect(dns_capture=False))
    assert bool(chains.ensure(at(iptables, pod), 4, no_dns)) is True
    assert set(chains.read(at(iptables, pod), 4)) == {"mangle", "nat"}
    assert not [r for r in iptables.rules(pod) if r.startswith("raw:")]


def test_remove_takes_out_ours_only_and_then_finds_nothing(
    iptables: FakeIptables, pod: Path
) -> None:
    chains = IptablesChains(NFT, iptables)
    iptables.add_foreign(str(pod), "nat", "-N CNI_HOSTPORT", "-A PREROUTING -j CNI_HOSTPORT")
    chains.ensure(at(iptables, pod), 4, DEFAULT, try_fresh=True)
    assert chains.remove(at(iptables, pod), 4) is True
    assert iptables.rules(pod) == ["nat: -A PREROUTING -j CNI_HOSTPORT"]
    iptables.calls.clear()
    assert chains.remove(at(iptables, pod), 4) is False
    assert iptables.calls_in(pod) == ["save"]


def test_the_pod_dataplane_tries_the_fast_path_once_per_namespace(
    iptables: FakeIptables, pod: Path
) -> None:
    routing = FakeRouting()
    pods = IptablesPodDataplane(NFT, iptables, routing, lambda: NO_CHANGES)
    assert bool(pods.ensure(pod, [PodRedirect(), PodRedirect(family=6)])) is True
    assert iptables.calls_in(pod) == ["restore", "restore"]  # one per family
    assert pods.verify(pod, [PodRedirect(), PodRedirect(family=6)])
    iptables.calls.clear()
    assert bool(pods.ensure(pod, [PodRedirect(), PodRedirect(family=6)])) is False
    assert iptables.calls_in(pod) == ["save", "save"]
    assert routing.calls == [("ensure", "None")] * 2  # "here": inside the pod, same thread
    assert iptables.entered.count(str(pod)) == 3  # ensure, verify, ensure: one entry each


def test_a_refused_ruleset_leaves_the_pods_routing_alone(iptables: FakeIptables, pod: Path) -> None:
    routing = FakeRouting()
    pods = IptablesPodDataplane(NFT, iptables, routing, lambda: NO_CHANGES)
    iptables.refuse = "tun-refused"
    with pytest.raises(DataplaneError):
        pods.ensure(pod, [PodRedirect(virtual_interfaces=("tun-refused",))])
    assert routing.calls == []
    assert not pods.verify(pod, [PodRedirect()])


def test_the_host_learns_its_rule_with_the_sets_it_matches_in_scratch(
    iptables: FakeIptables,
) -> None:
    sets = FakeAddressSets()
    host = IptablesHostDataplane(NFT, iptables, sets)
    assert bool(host.ensure()) is True
    # Sets made on the host, and in each family's scratch namespace before learning there.
    assert sets.created_in == ["None", "scratch-0", "scratch-1"]
    assert host.verify()
    assert bool(host.ensure()) is False
    assert "nat: -A POSTROUTING -j ISTIO_POSTRT" in iptables.rules("host")
    assert host.uninstall() is True
    assert iptables.rules("host") == []
    assert sets.created_in == []


def test_a_refused_host_rule_says_so(iptables: FakeIptables) -> None:
    iptables.refuse = "--match-set"
    host = IptablesHostDataplane(NFT, iptables, FakeAddressSets())
    with pytest.raises(DataplaneError) as caught:
        host.ensure()
    assert caught.value.reason == "HostRuleRejected"
    assert iptables.calls_in("host") == []


@pytest.mark.parametrize(
    ("legacy_rules", "nft_rules", "expected"),
    [(0, 0, "nft"), (3, 0, "legacy"), (0, 3, "nft"), (2, 5, "nft"), (5, 2, "legacy")],
)
def test_the_flavour_with_more_rules_on_the_host_wins(
    legacy_rules: int, nft_rules: int, expected: str
) -> None:
    class Counting(FakeIptables):
        def run(self, argv, *, netns=None, stdin=None):  # type: ignore[no-untyped-def]
            count = legacy_rules if "-legacy-" in argv[0] else nft_rules
            return (
                super()
                .run(argv, netns=netns, stdin=stdin)
                .__class__(0, "*filter\n" + "-A INPUT -j ACCEPT\n" * count + "COMMIT\n")
            )

    assert detect_flavour(Counting()).name == expected


def test_host_ruleset_is_what_the_host_learns() -> None:
    iptables = FakeIptables()
    learnt = IptablesChains(NFT, iptables).learn(4, host_ruleset(4))
    assert learnt["nat"][0] == ":ISTIO_POSTRT"


def test_iptables_nft_reads_a_namespace_again_only_when_its_nftables_generation_moved(
    iptables: FakeIptables, pod: Path
) -> None:
    generation = [(7, 1)]  # (the namespace's cookie, its nftables generation)
    pods = IptablesPodDataplane(
        NFT, iptables, FakeRouting(), lambda: NO_CHANGES, generation=lambda: generation[0]
    )
    assert pods.ensure(pod, [PodRedirect()])  # applied
    generation[0] = (7, 2)  # by that commit of ours
    iptables.calls.clear()
    assert not pods.ensure(pod, [PodRedirect()])
    assert iptables.calls_in(pod) == ["save"]  # read, found right: remembered at generation 2
    iptables.calls.clear()
    assert not pods.ensure(pod, [PodRedirect()])
    assert iptables.calls_in(pod) == []  # nothing committed since: no process at all
    assert pods.ensure(pod, [PodRedirect(dns_capture=False)])  # another ruleset: read, replaced
    assert iptables.calls_in(pod) == ["save", "restore", "save"]
    table = iptables.state[(str(pod), 4)]["nat"]
    table.rules = [r for r in table.rules if not r.startswith("-A ISTIO_OUTPUT")]  # flushed
    generation[0] = (7, 4)  # by our replacement, then someone's flush
    iptables.calls.clear()
    assert pods.ensure(pod, [PodRedirect(dns_capture=False)])  # read and repaired
    generation[0] = (7, 5)  # by the repair
    iptables.calls.clear()
    assert not pods.ensure(pod, [PodRedirect(dns_capture=False)])
    assert iptables.calls_in(pod) == ["save"]  # after a repair, one more read to be sure
    iptables.calls.clear()
    assert not pods.ensure(pod, [PodRedirect(dns_capture=False)])
    assert iptables.calls_in(pod) == []
    generation[0] = (8, 5)  # another namespace (a new sandbox), however alike its generation
    assert not pods.ensure(pod, [PodRedirect(dns_capture=False)])
    assert iptables.calls_in(pod) == ["save"]


def test_without_a_generation_every_check_reads(iptables: FakeIptables, pod: Path) -> None:
    pods = IptablesPodDataplane(NFT, iptables, FakeRouting(), lambda: NO_CHANGES, generation=None)
    pods.ensure(pod, [PodRedirect()])
    for _ in range(2):
        iptables.calls.clear()
        assert not pods.ensure(pod, [PodRedirect()])
        assert iptables.calls_in(pod) == ["save"]
