"""Native nftables input for in-pod redirection and the host probe rule: pure.

The same semantics as iptables_rules.py, in Istio 1.28+'s native form: `inet`
tables `istio-ambient-nat`, `-mangle` and `-raw` (the raw table only with DNS
capture), base chains `prerouting`/`output` at the nat (-100), mangle (-150)
and raw (-300) priorities jumping to `istio-prerouting`/`istio-output`, rules
in the same order as the iptables ruleset. One `inet` table serves both IP
families: rules that name an address say `ip` or `ip6`, the others match
both. The text is what Istio's agent sends as one transaction, line for line
(tests compare it with Istio's golden files); the applier wraps it so that
tables the new ruleset no longer uses go in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from ambient_cni.api.models import is_interface_name

from .constants import (
    CONN_MARK,
    DNS_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    PROBE_IPSET,
    PROBE_SOURCE,
    ZTUNNEL_MARK,
    Family,
)
from .errors import UnsafeInput
from .redirection import PodRedirect

NAT_TABLE = "istio-ambient-nat"
MANGLE_TABLE = "istio-ambient-mangle"
RAW_TABLE = "istio-ambient-raw"
POD_TABLES = (NAT_TABLE, MANGLE_TABLE, RAW_TABLE)
HOST_TABLE = NAT_TABLE  # the host's table has the same name, in the node's namespace
PRE, OUT = "istio-prerouting", "istio-output"

ZTUNNEL = f"0x{ZTUNNEL_MARK:x}"
MASK = f"0x{MARK_MASK:x}"
CONNECTION = f"0x{CONN_MARK:x}"
LOOPBACK: dict[Family, str] = {4: "ip daddr != 127.0.0.1/32", 6: "ip6 daddr != ::1/128"}
ADDRESS: dict[Family, str] = {4: "ip", 6: "ip6"}
# (table, chain type and hook: priority) of each base chain.
BASE_CHAINS: dict[str, tuple[tuple[str, str, str, int], ...]] = {
    NAT_TABLE: (("prerouting", "nat", "prerouting", -100), ("output", "nat", "output", -100)),
    MANGLE_TABLE: (
        ("prerouting", "filter", "prerouting", -150),
        ("output", "route", "output", -150),
    ),
    RAW_TABLE: (("prerouting", "filter", "prerouting", -300), ("output", "filter", "output", -300)),
}


def _interface(name: str) -> str:
    if not is_interface_name(name):
        raise UnsafeInput(f"virtual interface {name[:64]!r} is not an interface name")
    return name


def _table(table: str, rules: list[tuple[str, str]], *, output_jump_first: bool) -> list[str]:
    """add/flush the table, its chains, the jumps, then its rules (chain, rule) in order."""
    lines = [f"add table inet {table}", f"flush table inet {table}"]
    lines += [
        f"add chain inet {table} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        for name, kind, hook, priority in BASE_CHAINS[table]
    ]
    lines += [f"add chain inet {table} {PRE}", f"add chain inet {table} {OUT}"]
    jumps = [
        f"add rule inet {table} prerouting jump {PRE}",
        f"add rule inet {table} output jump {OUT}",
    ]
    lines += list(reversed(jumps)) if output_jump_first else jumps
    lines += [f"add rule inet {table} {chain} {rule}" for chain, rule in rules]
    return lines


def pod_nft_ruleset(redirects: Sequence[PodRedirect], probe_v6: str = PROBE_SOURCE[6]) -> str:
    """The pod's whole ruleset for all its IP families, as one nft transaction.

    `redirects` has one entry per family the pod has (the knobs are the same in each);
    `probe_v6` is the IPv6 probe source (a parameter only so tests can use Istio's).
    """
    if not redirects:
        raise ValueError("a pod needs at least one IP family")
    knobs = redirects[0]
    families: list[Family] = sorted({r.family for r in redirects})
    probe = {4: PROBE_SOURCE[4], 6: probe_v6}
    not_ztunnel = f"mark and {MASK} != {ZTUNNEL}"

    nat: list[tuple[str, str]] = []
    for name in map(_interface, knobs.virtual_interfaces):
        nat += [
            (PRE, f"iifname {name} meta l4proto tcp counter redirect to :{OUTBOUND_PORT}"),
            (PRE, f"iifname {name} meta l4proto tcp counter return"),
        ]
    if not knobs.bypass_inbound:
        for family in families:
            nat.append(
                (PRE, f"meta l4proto tcp {ADDRESS[family]} saddr {probe[family]} counter accept")
            )
    for family in families:
        nat.append(
            (OUT, f"meta l4proto tcp {ADDRESS[family]} daddr {probe[family]} counter accept")
        )
    if not knobs.bypass_inbound:
        for family in families:
            # Two spaces before "!=" for IPv4, as Istio's agent writes it (its goldens).
            spacing = "  " if family == 4 else " "
            nat.append(
                (
                    PRE,
                    f"{LOOPBACK[family]} tcp dport != {HBONE_PORT} mark and {MASK}{spacing}!= "
                    f"{ZTUNNEL} counter redirect to :{INBOUND_PLAINTEXT_PORT}",
                )
            )
    if knobs.dns_capture:
        nat.append(
            (OUT, f"oifname != lo {not_ztunnel} udp dport 53 counter redirect to :{DNS_PORT}")
        )
        for family in families:
            dns = f"tcp dport 53 {not_ztunnel} counter redirect to :{DNS_PORT}"
            nat.append((OUT, f"{LOOPBACK[family]} {dns}"))
    nat.append((OUT, f"meta l4proto tcp mark and {MASK} == {CONNECTION} counter accept"))
    for family in families:
        nat.append((OUT, f"oifname lo {LOOPBACK[family]} counter accept"))
    for family in families:
        nat.append(
            (
                OUT,
                f"meta l4proto tcp {LOOPBACK[family]} {not_ztunnel} "
                f"counter redirect to :{OUTBOUND_PORT}",
            )
        )

    mangle = [
        (
            PRE,
            f"meta mark & {MASK} == {ZTUNNEL} counter ct mark set ct mark & 0xfffff000 |  "
            f"{CONNECTION}",
        ),
        (OUT, f"ct mark and {MASK} == {CONNECTION} counter meta mark set ct mark"),
    ]
    lines = _table(NAT_TABLE, nat, output_jump_first=True)
    lines += _table(MANGLE_TABLE, mangle, output_jump_first=False)
    if knobs.dns_capture:
        # Keep DNS flows to and from ztunnel apart in conntrack (zone 1).
        raw = [
            (OUT, f"udp dport 53 meta mark and {MASK} == {ZTUNNEL} counter ct zone set 1"),
            (PRE, f"udp sport 53 meta mark and {MASK} != {ZTUNNEL} counter ct zone set 1"),
        ]
        lines += _table(RAW_TABLE, raw, output_jump_first=False)
    return "\n".join(lines) + "\n"


def pod_nft_tables(redirects: Sequence[PodRedirect]) -> tuple[str, ...]:
    """The tables a pod's ruleset uses (raw only with DNS capture)."""
    return POD_TABLES if redirects and redirects[0].dns_capture else POD_TABLES[:2]


def delete_tables(tables: Sequence[str]) -> str:
    """Remove these tables whether or not they exist, as part of a transaction."""
    return "".join(f"add table inet {t}\ndelete table inet {t}\n" for t in tables)


SET_COMMENT = "UUID of the pods that are part of ambient mesh"
SET_TYPE: dict[Family, str] = {4: "ipv4_addr", 6: "ipv6_addr"}


def host_nft_sets() -> str:
    """The host's probe address sets (elements are kept: made once, never flushed here)."""
    lines = [f"add table inet {HOST_TABLE}"]
    for family in (4, 6):
        lines.append(
            f"add set inet {HOST_TABLE} {PROBE_IPSET[family]} "
            f'{{ type {SET_TYPE[family]} ; comment "{SET_COMMENT}" ; }}'
        )
    return "\n".join(lines) + "\n"


def host_nft_ruleset(kubelet_uid: int, probe_v6: str = PROBE_SOURCE[6]) -> str:
    """The host's probe SNAT: kubelet's probes reach enrolled pods from the probe address.

    nft has no `--socket-exists`; as Istio's agent does, the rule matches kubelet's UID.
    """
    probe = {4: PROBE_SOURCE[4], 6: probe_v6}
    lines = [
        f"add table inet {HOST_TABLE}",
        f"flush table inet {HOST_TABLE}",
        f"add chain inet {HOST_TABLE} postrouting {{ type nat hook postrouting priority 100 ; }}",
    ]
    for family in (4, 6):
        lines.append(
            f"add rule inet {HOST_TABLE} postrouting meta l4proto tcp skuid {int(kubelet_uid)} "
            f"{ADDRESS[family]} daddr @{PROBE_IPSET[family]} counter snat to {probe[family]}"
        )
    return "\n".join(lines) + "\n"
