"""The legacy node mode's host rules, applied in a scratch network namespace, read back as
iptables-save prints them: line for line what source document 000 shows (Istio's own
listing on a kind node), but for the one rule Istio 1.20 narrowed."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient_cni.dataplane.node_rules import IPSET, NodeHost, host_ruleset, ztunnel_ruleset
from tests.e2e.kernel import run_in

DOC_000 = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "000_aca19a760a174693.txt"
NODE = NodeHost(ztunnel_veth="veth9f651c51", ztunnel_ip="10.244.2.3", host_ip="10.244.2.1")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"acni-test-{uuid.uuid4().hex[:8]}"  # `sandbox down --all` removes a leftover
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def restore(netns: str, text: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-restore", "--noflush"],
        input=text,
        text=True,
        check=True,
    )


def documented(chain_prefix: str) -> list[str]:
    """The document's listing lines of ztunnel chains (both tables, in its order)."""
    text = DOC_000.read_text() if DOC_000.exists() else ""
    return [line for line in text.splitlines() if re.match(rf"-A {chain_prefix}", line)]


@pytest.mark.skipif(not DOC_000.exists(), reason="the source documents are not beside the repo")
def test_the_kernel_holds_what_document_000_lists(netns: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "ipset", "create", IPSET, "hash:ip", "comment"],
        check=True,
    )
    restore(netns, host_ruleset(NODE))
    mangle = run_in(netns, "iptables-save", "-t", "mangle").splitlines()
    nat = run_in(netns, "iptables-save", "-t", "nat").splitlines()
    ours = [line for line in mangle + nat if line.startswith("-A ztunnel-")]
    listed = documented("ztunnel-")
    # Istio 1.20 narrowed ztunnel-OUTPUT to the host's own connections to enrolled pods.
    assert [line for line in listed if line.startswith("-A ztunnel-OUTPUT")] == [
        "-A ztunnel-OUTPUT -s 10.244.2.1/32 -j MARK --set-xmark 0x220/0xffffffff"
    ]
    assert [line for line in ours if line.startswith("-A ztunnel-OUTPUT")] == [
        "-A ztunnel-OUTPUT -s 10.244.2.1/32 -p tcp -m owner --socket-exists "
        "-m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0xffffffff"
    ]
    same = [line for line in listed if not line.startswith("-A ztunnel-OUTPUT")]
    assert [line for line in ours if not line.startswith("-A ztunnel-OUTPUT")] == same
    # Each chain is jumped to first.
    for table in (mangle, nat):
        jumps = [line for line in table if re.match(r"-A [A-Z]+ -j ztunnel-", line)]
        assert jumps
    # And inside the ztunnel pod's netns, what the document lists there (its ztunnel pod
    # was 10.244.1.5 on another node).
    restore(netns, ztunnel_ruleset("10.244.1.5"))
    inside = [
        line
        for line in run_in(netns, "iptables-save", "-t", "mangle").splitlines()
        if line.startswith("-A PREROUTING") and "ztunnel-" not in line
    ]
    text = DOC_000.read_text()
    assert inside == [
        line
        for line in text.splitlines()
        if line.startswith("-A PREROUTING") and ("pistio" in line or "0x4d3" in line)
    ]
