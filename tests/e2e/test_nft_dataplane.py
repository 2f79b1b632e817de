"""The native nftables backend in real network namespaces: in-process, exact, migrating."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient_cni.dataplane import factory
from ambient_cni.dataplane.address_sets import remove_owned
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.nft_host import NftablesHostDataplane
from ambient_cni.dataplane.nft_pod import NftablesPodDataplane
from ambient_cni.dataplane.redirection import PodRedirect
from ambient_cni.dataplane.runner import SubprocessRunner
from ambient_cni.netns import NetnsWorkers, netns_inode
from tests.e2e.kernel import our_nft_tables, run_in

DUAL = [PodRedirect(), PodRedirect(family=6)]


def new_netns(made: list[str]) -> str:
    name = f"acni-test-{uuid.uuid4().hex[:8]}"  # `sandbox down --all` removes a leftover
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    made.append(name)
    return name


@pytest.fixture
def netns() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], check=False)


def nft_backend(host: str | None = None) -> factory.Dataplane:
    host_netns = Path("/run/netns", host) if host else None
    return factory.build("nftables", factory.BackendOptions(host_netns=host_netns, kubelet_uid=0))


def tables(name: str) -> list[str]:
    return our_nft_tables(run_in(name, "nft", "list", "ruleset"))


def iptables_rules(name: str) -> list[str]:
    return [line for line in run_in(name, "iptables-save").splitlines() if "ISTIO" in line]


def routing(name: str, family: int = 4) -> tuple[list[str], str]:
    flag = "-4" if family == 4 else "-6"
    rules = [r for r in run_in(name, "ip", flag, "rule").splitlines() if r.startswith("32764:")]
    return rules, run_in(name, "ip", flag, "route", "show", "table", "100").strip()


def test_ensure_applies_once_exactly_and_is_idempotent(netns: list[str]) -> None:
    pod = new_netns(netns)
    pods = nft_backend().pods
    changes = pods.ensure(Path("/run/netns", pod), DUAL)
    assert "tables added" in changes.describe()
    assert pods.verify(Path("/run/netns", pod), DUAL)
    listing = tables(pod)
    assert "table inet istio-ambient-nat {" in listing
    assert any("ip6 daddr != ::1 " in line for line in listing)  # dual stack, one inet table
    for family in (4, 6):
        rules, route = routing(pod, family)
        assert len(rules) == 1
        assert route.startswith("local default dev lo")
    assert not pods.ensure(Path("/run/netns", pod), DUAL)  # nothing to do: nothing done
    assert tables(pod) == listing
    assert len(routing(pod)[0]) == 1


def test_drift_is_repaired_in_one_transaction_and_said(netns: list[str]) -> None:
    pod = new_netns(netns)
    pods = nft_backend().pods
    pods.ensure(Path("/run/netns", pod), [PodRedirect()])
    listing = tables(pod)
    run_in(pod, "nft", "flush", "chain", "inet", "istio-ambient-nat", "istio-output")
    assert not pods.verify(Path("/run/netns", pod), [PodRedirect()])
    changes = pods.ensure(Path("/run/netns", pod), [PodRedirect()])
    assert "istio-ambient-nat: 6 of our rules missing" in changes.describe()
    assert tables(pod) == listing


def test_changing_knobs_drops_the_raw_table_in_the_same_transaction(netns: list[str]) -> None:
    pod = new_netns(netns)
    pods = nft_backend().pods
    pods.ensure(Path("/run/netns", pod), [PodRedirect()])
    pods.ensure(Path("/run/netns", pod), [PodRedirect(dns_capture=False, bypass_inbound=True)])
    listing = "\n".join(tables(pod))
    assert "istio-ambient-raw" not in listing
    assert "15053" not in listing
    assert "15006" not in listing


def test_remove_leaves_nothing(netns: list[str]) -> None:
    pod = new_netns(netns)
    pods = nft_backend().pods
    pods.ensure(Path("/run/netns", pod), DUAL)
    assert pods.remove(Path("/run/netns", pod)) is True
    assert tables(pod) == []
    assert routing(pod) == ([], "")
    assert routing(pod, 6) == ([], "")
    assert pods.remove(Path("/run/netns", pod)) is False


def test_a_ruleset_the_kernel_refuses_fails_in_scratch_with_its_words() -> None:
    pods = nft_backend().pods
    assert isinstance(pods, NftablesPodDataplane)
    refused = (
        "add table inet acni-t\nadd chain inet acni-t c\n"
        "add rule inet acni-t c ip daddr @nope accept\n"
    )
    with pytest.raises(DataplaneError) as caught:
        pods.learn(refused)
    assert caught.value.reason == "RuleRejected"
    assert "nope" in caught.value.message or "No such file" in caught.value.message


def test_a_node_switched_from_iptables_keeps_every_pod_redirected(netns: list[str]) -> None:
    pod = new_netns(netns)
    path = Path("/run/netns", pod)
    iptables = factory.build("iptables-nft").pods
    iptables.ensure(path, [PodRedirect()])
    assert iptables_rules(pod)
    changes = nft_backend().pods.ensure(path, [PodRedirect()])
    assert "iptables-nft chains removed (now nftables)" in changes.describe()
    assert iptables_rules(pod) == []
    assert tables(pod)
    assert len(routing(pod)[0]) == 1
    # And back: the iptables backend takes the native tables out, once its chains are in.
    changes = factory.build("iptables-nft").pods.ensure(path, [PodRedirect()])
    assert "nftables tables removed (now iptables)" in changes.describe()
    assert tables(pod) == []
    assert iptables_rules(pod)


def test_host_probe_rule_and_sets(netns: list[str]) -> None:
    node = new_netns(netns)
    host = nft_backend(node).host
    assert host.ensure()
    assert host.verify()
    assert not host.ensure()
    listing = "\n".join(tables(node))
    assert "meta skuid 0 ip daddr @istio-inpod-probes-v4" in listing
    sets = host.addresses
    sets.add(["10.244.0.5", "fd00::5"], "uid-a")
    assert sets.entries() == {"10.244.0.5": "uid-a", "fd00::5": "uid-a"}
    sets.add(["10.244.0.5"], "uid-b")  # a reused IP: the comment is replaced too
    assert sets.entries()["10.244.0.5"] == "uid-b"
    remove_owned(sets, ["10.244.0.5", "fd00::5"], "uid-a")
    assert sets.entries() == {"10.244.0.5": "uid-b"}
    run_in(node, "nft", "flush", "chain", "inet", "istio-ambient-nat", "postrouting")
    assert "host-rules" in [c.kind for c in host.ensure().items]  # repaired
    assert sets.entries() == {"10.244.0.5": "uid-b"}  # the rule's repair keeps the elements
    assert host.uninstall() is True
    assert tables(node) == []


def test_many_pods_addresses_share_transactions(netns: list[str]) -> None:
    node = new_netns(netns)
    host = nft_backend(node).host
    assert isinstance(host, NftablesHostDataplane)
    host.ensure()
    sets = host.addresses
    start = sets.transactions  # type: ignore[attr-defined]

    # Pods enrolled together: each thread adds its pod's address at the same moment.
    together = threading.Barrier(100)

    def enrol(index: int) -> None:
        together.wait()
        sets.add([f"10.244.{index // 200}.{index % 200 + 1}"], f"uid-{index}")

    threads = [threading.Thread(target=enrol, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sets.entries()) == 100
    assert sets.transactions - start < 50  # type: ignore[attr-defined]


def test_a_refused_address_fails_alone(netns: list[str]) -> None:
    node = new_netns(netns)
    host = nft_backend(node).host
    host.ensure()
    with pytest.raises(DataplaneError) as caught:
        host.addresses.add(["10.0.0.1"], 'uid"; flush ruleset; "')
    assert caught.value.reason == "UnsafeInput"
    host.addresses.add(["10.0.0.2"], "uid-ok")
    assert host.addresses.entries() == {"10.0.0.2": "uid-ok"}


def test_auto_follows_native_nftables_on_the_node(netns: list[str]) -> None:
    node = new_netns(netns)
    path = Path("/run/netns", node)
    assert factory.detect(SubprocessRunner(), path) == "iptables-nft"  # nothing there yet
    run_in(node, "nft", "add table inet cni; add chain inet cni c; add rule inet cni c accept")
    assert factory.detect(SubprocessRunner(), path) == "nftables"
    for _ in range(2):
        run_in(node, "iptables", "-A", "INPUT", "-j", "ACCEPT")
    assert factory.detect(SubprocessRunner(), path) == "iptables-nft"


def test_netns_workers_always_come_home(netns: list[str]) -> None:
    pod = new_netns(netns)
    workers = NetnsWorkers(1)
    home = os.stat("/proc/self/ns/net").st_ino

    def where() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    def boom() -> int:
        raise RuntimeError("boom")

    assert workers.run(pod, where) == netns_inode(pod)
    with pytest.raises(RuntimeError):
        workers.run(pod, boom)
    # The same thread, after a failure inside: back home, then in the pod again.
    assert workers.run(f"/proc/{os.getpid()}/ns/net", where) == home
    with pytest.raises(OSError, match="does not exist"):
        workers.run("acni-test-no-such-netns", where)
    assert workers.run(pod, where) == netns_inode(pod)
    workers.close()
