"""The host's probe ipsets and SNAT rule, in a namespace standing in for a node."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient_cni.dataplane import factory
from ambient_cni.dataplane.address_sets import remove_owned, sync
from ambient_cni.dataplane.interfaces import HostDataplane
from ambient_cni.dataplane.runner import SubprocessRunner


@pytest.fixture
def host() -> Iterator[tuple[HostDataplane, str]]:
    name = f"acni-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        backend = factory.detect(SubprocessRunner())  # as the agent would pick on this machine
        options = factory.BackendOptions(host_netns=Path("/run/netns", name))
        yield factory.build(backend, options).host, name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def sh(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


def test_ensure_is_idempotent_and_uninstall_leaves_nothing(host: tuple[HostDataplane, str]) -> None:
    dataplane, netns = host
    assert bool(dataplane.ensure()) is True
    assert dataplane.verify()
    nat = sh(netns, "iptables-save", "-t", "nat")
    assert "-A POSTROUTING -j ISTIO_POSTRT" in nat
    assert "--match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127" in nat
    assert "istio-inpod-probes-v6" in sh(netns, "ip6tables-save", "-t", "nat")
    assert bool(dataplane.ensure()) is False
    assert sh(netns, "iptables-save", "-t", "nat").count("-A ") == nat.count("-A ")

    sh(netns, "iptables", "-t", "nat", "-F", "ISTIO_POSTRT")  # drift
    assert not dataplane.verify()
    assert bool(dataplane.ensure()) is True
    assert dataplane.verify()

    dataplane.addresses.add(["10.244.0.5"], "uid-a")
    assert dataplane.uninstall() is True
    assert "ISTIO" not in sh(netns, "iptables-save") + sh(netns, "ip6tables-save")
    assert sh(netns, "ipset", "list", "-n").strip() == ""


def test_entries_carry_the_pod_uid(host: tuple[HostDataplane, str]) -> None:
    dataplane, netns = host
    dataplane.ensure()
    dataplane.addresses.add(["10.244.0.5", "fd00::5"], "uid-a")
    assert dataplane.addresses.entries() == {"10.244.0.5": "uid-a", "fd00::5": "uid-a"}
    dataplane.addresses.add(["10.244.0.5"], "uid-b")  # the IP was reused by another pod: replaced
    assert dataplane.addresses.entries()["10.244.0.5"] == "uid-b"
    remove_owned(
        dataplane.addresses, ["10.244.0.5", "fd00::5"], "uid-a"
    )  # only what uid-a still owns
    assert dataplane.addresses.entries() == {"10.244.0.5": "uid-b"}
    assert 'comment "uid-b"' in sh(netns, "ipset", "list", "istio-inpod-probes-v4")

    sync(dataplane.addresses, {"10.244.0.7": "uid-c", "10.244.0.5": "uid-d"})
    assert dataplane.addresses.entries() == {"10.244.0.7": "uid-c", "10.244.0.5": "uid-d"}


def test_agent_uninstall_removes_host_rules_and_sets(host: tuple[HostDataplane, str]) -> None:
    dataplane, netns = host
    dataplane.ensure()
    dataplane.addresses.add(["10.244.0.5"], "uid-a")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ambient_cni.cli",
            "agent",
            "--node",
            "node-x",
            "--host-netns",
            f"/run/netns/{netns}",
            "--uninstall",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ISTIO" not in sh(netns, "iptables-save") + sh(netns, "ip6tables-save")
    assert sh(netns, "ipset", "list", "-n").strip() == ""
