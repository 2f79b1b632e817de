"""What the kernel holds of ours, read with the system's own tools, whichever backend wrote it.

Both iptables chains (ISTIO_*) and native nftables tables (istio-ambient-*)
are read, so the same assertions hold for every backend and catch leftovers
of the other one after a switch.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

from ambient_cni_sandbox.cluster import SandboxCluster

COUNTERS = re.compile(r"counter packets \d+ bytes \d+")


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    """A named network namespace with lo up, deleted afterwards whatever happens."""
    name = f"acni-test-{uuid.uuid4().hex[:8]}"  # `sandbox down --all` removes a leftover
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_in(netns: str, *argv: str) -> str:
    """A command's output inside a named netns ("" when it fails, e.g. a table never made)."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
    ).stdout


def our_nft_tables(listing: str, prefix: str = "table inet istio-ambient-") -> list[str]:
    """The lines of our native tables in an `nft list ruleset` listing, counters taken out."""
    found: list[str] = []
    inside = False
    for line in listing.splitlines():
        if line.startswith("table "):
            inside = line.startswith(prefix)
        if inside and line.strip():
            found.append(COUNTERS.sub("counter", line.strip()))
    return found


def istio_rules(netns: str) -> list[str]:
    iptables = [line for line in run_in(netns, "iptables-save").splitlines() if "ISTIO" in line]
    iptables += [line for line in run_in(netns, "ip6tables-save").splitlines() if "ISTIO" in line]
    return iptables + our_nft_tables(run_in(netns, "nft", "list", "ruleset"))


def kernel_state(cluster: SandboxCluster, pod: dict[str, Any]) -> dict[str, Any]:
    netns = cluster.pod_netns(pod)
    return {
        "istio_rules": istio_rules(netns),
        "ip_rules": [
            line
            for family in ("-4", "-6")
            for line in run_in(netns, "ip", family, "rule").splitlines()
            if line.startswith("32764:")
        ],
        "table_100": "\n".join(
            run_in(netns, "ip", family, "route", "show", "table", "100").strip()
            for family in ("-4", "-6")
        ).strip(),
    }


def probe_members(cluster: SandboxCluster, node: str) -> list[str]:
    """The node's probe set members, both families, from the ipsets or the nft sets, sorted."""
    netns = cluster.state.topology.node(node).netns
    members: list[str] = []
    for name in ("istio-inpod-probes-v4", "istio-inpod-probes-v6"):
        listing = run_in(netns, "ipset", "list", name)
        if "Members:" in listing:
            members += [
                line.split()[0] for line in listing.split("Members:")[1].splitlines() if line
            ]
        nft = run_in(netns, "nft", "list", "set", "inet", "istio-ambient-nat", name)
        for match in re.finditer(r"elements = \{([^}]*)\}", nft):
            members += [part.split()[0] for part in match.group(1).split(",") if part.strip()]
    return sorted(members)
