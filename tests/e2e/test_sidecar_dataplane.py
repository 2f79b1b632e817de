"""Sidecar capture's two appliers in real network namespaces: exact, idempotent, repaired,
with TPROXY's routing, and a node switched between backends keeps every sidecar pod
captured by exactly one form."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient_cni.api.models import SidecarCapture
from ambient_cni.dataplane import factory
from ambient_cni.dataplane.interfaces import SidecarDataplane
from tests.e2e.kernel import our_nft_tables, run_in, scratch_netns

TPROXY = SidecarCapture(interception_mode="TPROXY")


@pytest.fixture
def pod() -> Iterator[str]:
    with scratch_netns() as name:
        yield name


def sidecars(backend: str) -> SidecarDataplane:
    return factory.build(backend, factory.BackendOptions(kubelet_uid=0)).sidecars


def iptables_capture(name: str) -> list[str]:
    return [line for line in run_in(name, "iptables-save").splitlines() if "ISTIO_" in line]


def nft_capture(name: str) -> list[str]:
    return our_nft_tables(run_in(name, "nft", "list", "ruleset"), "table inet istio-proxy-")


def tproxy_rule(name: str) -> list[str]:
    return [r for r in run_in(name, "ip", "rule").splitlines() if "lookup 133" in r]


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_applied_once_exactly_then_nothing_then_repaired_and_said(pod: str, backend: str) -> None:
    path = Path("/run/netns", pod)
    dataplane = sidecars(backend)
    assert dataplane.ensure(path, TPROXY, (4,))
    captured = nft_capture(pod) if backend == "nftables" else iptables_capture(pod)
    assert captured
    assert tproxy_rule(pod) == ["32765:\tfrom all fwmark 0x539 lookup 133"]
    assert (
        run_in(pod, "ip", "route", "show", "table", "133").strip()
        == "local default dev lo scope host"
    )
    assert not dataplane.ensure(path, TPROXY, (4,))  # level-based: nothing to do
    # Someone flushes the nat output hook behind the agent's back.
    if backend == "nftables":
        run_in(pod, "nft", "flush", "chain", "inet", "istio-proxy-nat", "output")
    else:
        run_in(pod, "iptables", "-t", "nat", "-F", "OUTPUT")
    repaired = dataplane.ensure(path, TPROXY, (4,))
    assert "missing" in repaired.describe()
    assert (nft_capture(pod) if backend == "nftables" else iptables_capture(pod)) == captured
    # REDIRECT now: TPROXY's mangle rules and routing go in the same pass.
    assert dataplane.ensure(path, SidecarCapture(), (4,))
    assert tproxy_rule(pod) == []
    assert not any(
        "mangle" in line or "TPROXY" in line
        for line in (nft_capture(pod) if backend == "nftables" else iptables_capture(pod))
    )


def test_a_node_switched_between_backends_keeps_one_capture(pod: str) -> None:
    path = Path("/run/netns", pod)
    sidecars("iptables-nft").ensure(path, SidecarCapture(), (4,))
    assert iptables_capture(pod)
    changes = sidecars("nftables").ensure(path, SidecarCapture(), (4,))
    assert "iptables-nft chains removed (now nftables)" in changes.describe()
    assert iptables_capture(pod) == []
    assert nft_capture(pod)
    changes = sidecars("iptables-nft").ensure(path, SidecarCapture(), (4,))
    assert "nftables tables removed (now iptables)" in changes.describe()
    assert nft_capture(pod) == []
    assert iptables_capture(pod)
