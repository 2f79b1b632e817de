"""iptables-restore input for in-pod redirection and the host probe rule: pure.

The texts match reference sections 2.1 (inside the pod's network namespace)
and 2.2 (the host). One ruleset per IP family is applied in one
`iptables-restore --noflush` transaction.
"""

from __future__ import annotations

from ambient_cni.api.models import is_interface_name

from .constants import (
    CONN_MARK,
    DNS_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    LOOPBACK,
    MARK_MASK,
    OUTBOUND_PORT,
    OUTPUT_CHAIN,
    POSTROUTING_CHAIN,
    PREROUTING_CHAIN,
    PROBE_IPSET,
    PROBE_SOURCE,
    ZTUNNEL_MARK,
    Family,
)
from .errors import UnsafeInput
from .redirection import PodRedirect

ZTUNNEL = f"0x{ZTUNNEL_MARK:x}/0x{MARK_MASK:x}"
CONNECTION = f"0x{CONN_MARK:x}/0x{MARK_MASK:x}"
POD_TABLES = ("mangle", "nat", "raw")


def _chains_and_jumps(*, prerouting_first: bool) -> list[str]:
    jumps = [f"-A PREROUTING -j {PREROUTING_CHAIN}", f"-A OUTPUT -j {OUTPUT_CHAIN}"]
    return [
        f"-N {PREROUTING_CHAIN}",
        f"-N {OUTPUT_CHAIN}",
        *(jumps if prerouting_first else reversed(jumps)),
    ]


def _interface(name: str) -> str:
    """A virtual interface name, checked again here: whatever built the PodRedirect, no
    text reaches iptables-restore that is not a plain interface name."""
    if not is_interface_name(name):
        raise UnsafeInput(f"virtual interface {name[:64]!r} is not an interface name")
    return name


def pod_ruleset(redirect: PodRedirect) -> str:
    """The whole in-pod ruleset for one family, as iptables-restore input."""
    loopback = LOOPBACK[redirect.family]
    probe = PROBE_SOURCE[redirect.family]
    pre, out = PREROUTING_CHAIN, OUTPUT_CHAIN

    mangle = [
        *_chains_and_jumps(prerouting_first=True),
        f"-A {pre} -m mark --mark {ZTUNNEL} -j CONNMARK --set-xmark {CONNECTION}",
        f"-A {out} -m connmark --mark {CONNECTION} -j CONNMARK --restore-mark "
        "--nfmask 0xffffffff --ctmask 0xffffffff",
    ]

    nat = _chains_and_jumps(prerouting_first=False)
    for interface in map(_interface, redirect.virtual_interfaces):
        nat += [
            f"-A {pre} -i {interface} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
            f"-A {pre} -i {interface} -p tcp -j RETURN",
        ]
    if not redirect.bypass_inbound:
        nat.append(f"-A {pre} -s {probe} -p tcp -m tcp -j ACCEPT")
    nat.append(f"-A {out} -d {probe} -p tcp -m tcp -j ACCEPT")
    if not redirect.bypass_inbound:
        nat.append(
            f"-A {pre} ! -d {loopback} -p tcp ! --dport {HBONE_PORT} -m mark ! --mark {ZTUNNEL} "
            f"-j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}"
        )
    if redirect.dns_capture:
        nat += [
            f"-A {out} ! -o lo -p udp -m mark ! --mark {ZTUNNEL} -m udp --dport 53 "
            f"-j REDIRECT --to-port {DNS_PORT}",
            f"-A {out} ! -d {loopback} -p tcp --dport 53 -m mark ! --mark {ZTUNNEL} "
            f"-j REDIRECT --to-ports {DNS_PORT}",
        ]
    nat += [
        f"-A {out} -p tcp -m mark --mark {CONNECTION} -j ACCEPT",
        f"-A {out} ! -d {loopback} -o lo -j ACCEPT",
        f"-A {out} ! -d {loopback} -p tcp -m mark ! --mark {ZTUNNEL} "
        f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
    ]

    tables = [("mangle", mangle), ("nat", nat)]
    if redirect.dns_capture:
        # Keep DNS flows to and from ztunnel apart in conntrack (zone 1).
        raw = [
            *_chains_and_jumps(prerouting_first=True),
            f"-A {out} -p udp -m mark --mark {ZTUNNEL} -m udp --dport 53 -j CT --zone 1",
            f"-A {pre} -p udp -m mark ! --mark {ZTUNNEL} -m udp --sport 53 -j CT --zone 1",
        ]
        tables.append(("raw", raw))
    return _restore_input(tables)


def host_ruleset(family: Family) -> str:
    """The host's probe SNAT: kubelet's probes reach enrolled pods from the probe address."""
    rules = [
        f"-N {POSTROUTING_CHAIN}",
        f"-I POSTROUTING 1 -j {POSTROUTING_CHAIN}",
        f"-A {POSTROUTING_CHAIN} -m owner --socket-exists -p tcp "
        f"-m set --match-set {PROBE_IPSET[family]} dst -j SNAT --to-source {PROBE_SOURCE[family]}",
    ]
    return _restore_input([("nat", rules)])


def _restore_input(tables: list[tuple[str, list[str]]]) -> str:
    lines: list[str] = []
    for table, rules in tables:
        lines += [f"*{table}", *rules, "COMMIT"]
    return "\n".join(lines) + "\n"
