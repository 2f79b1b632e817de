"""A sidecar pod's capture as one native nftables transaction, as Istio writes it with
`native_nftables` (reference sidecar-interception.md section 8): a pure function.

Three `inet` tables, `istio-proxy-nat`, `-mangle` and `-raw`, each added, flushed and
filled in one go; IPv6 rules sit next to their IPv4 twins when the pod has IPv6 (one
transaction for both families). The steps and their order are those of the iptables
form (sidecar_rules.py), in Istio's nftables words; the text equals Istio's own golden
files for the cases this project's options can express.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from ambient_cni.api.models import SidecarCapture

from .constants import Family
from .sidecar_rules import (
    DNS_PORT,
    INBOUND_PORT,
    OUTBOUND_MARK,
    OUTBOUND_PORT,
    TPROXY_MARK,
    TUNNEL_PORT,
    check_capture,
)

NAT, MANGLE, RAW = "istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"
SIDECAR_NFT_TABLES = (NAT, MANGLE, RAW)
# Per table, the chains Istio declares (those with rules), in its order, with the base
# chains' hooks.
_CHAINS: dict[str, tuple[tuple[str, str], ...]] = {
    NAT: (
        ("prerouting", "{ type nat hook prerouting priority -100 ; }"),
        ("output", "{ type nat hook output priority -100 ; }"),
        ("istio-inbound", ""),
        ("istio-redirect", ""),
        ("istio-in-redirect", ""),
        ("istio-output", ""),
        ("istio-output-dns", ""),
    ),
    MANGLE: (
        ("prerouting", "{ type filter hook prerouting priority -150 ; }"),
        ("output", "{ type route hook output priority -150 ; }"),
        ("istio-divert", ""),
        ("istio-tproxy", ""),
        ("istio-inbound", ""),
        ("istio-drop", ""),
    ),
    RAW: (
        ("prerouting", "{ type filter hook prerouting priority -300 ; }"),
        ("output", "{ type filter hook output priority -300 ; }"),
        ("istio-inbound", ""),
        ("istio-output-dns", ""),
    ),
}


@dataclass(frozen=True)
class _Rule:
    table: str
    chain: str
    text: str
    index: int | None = None  # insert at; None: add


def _rules(capture: SidecarCapture, ipv6: bool) -> list[_Rule]:
    rules: list[_Rule] = []

    def add(
        table: str, chain: str, text: str, *, v6: bool = False, index: int | None = None
    ) -> None:
        if not v6 or ipv6:
            rules.append(_Rule(table, chain, text, index))

    tproxy = capture.interception_mode == "TPROXY"
    uid, gid = capture.proxy_uid, capture.proxy_gid
    virtual = capture.reroute_virtual_interfaces
    dns = capture.dns_capture
    tcp = "meta l4proto tcp"
    # Interfaces never captured, and virtual ones whose inbound is not the pod's.
    for name in capture.exclude_interfaces:
        add(NAT, "prerouting", f"iifname {name} counter return")
        add(NAT, "output", f"oifname {name} counter return")
    if tproxy:
        for name in capture.exclude_interfaces:
            add(MANGLE, "prerouting", f"iifname {name} counter return")
            add(MANGLE, "output", f"oifname {name} counter return")
    for name in virtual:
        add(NAT, "prerouting", f"iifname {name} counter return", index=0)
    if capture.invalid_drop:
        add(MANGLE, "prerouting", f"{tcp} ct state invalid counter jump istio-drop")
        add(MANGLE, "istio-drop", "counter drop")
    add(NAT, "istio-inbound", f"{tcp} tcp dport {TUNNEL_PORT} counter return")
    add(NAT, "istio-redirect", f"{tcp} counter redirect to :{OUTBOUND_PORT}")
    add(NAT, "istio-in-redirect", f"{tcp} counter redirect to :{INBOUND_PORT}")
    # Inbound.
    if capture.capture_all_inbound or capture.include_inbound_ports:
        if tproxy:
            add(MANGLE, "istio-divert", f"counter meta mark set {TPROXY_MARK}")
            add(MANGLE, "istio-divert", "counter accept")
            for nft_family, match, lo in (
                ("ip", "ip daddr", "127.0.0.1/32"),
                ("ip6", "ip6 daddr", "::1/128"),
            ):
                add(
                    MANGLE,
                    "istio-tproxy",
                    f"{tcp} {match} != {lo} tproxy {nft_family} to :{INBOUND_PORT} "
                    f"meta mark set {TPROXY_MARK} counter accept",
                    v6=nft_family == "ip6",
                )
            add(MANGLE, "prerouting", f"{tcp} counter jump istio-inbound")
            established = "ct state related,established"
            if capture.capture_all_inbound:
                for port in capture.exclude_inbound_ports:
                    add(MANGLE, "istio-inbound", f"{tcp} tcp dport {port} counter return")
                add(MANGLE, "istio-inbound", f"{tcp} {established} counter jump istio-divert")
                add(MANGLE, "istio-inbound", f"{tcp} counter jump istio-tproxy")
            else:
                for port in capture.include_inbound_ports:
                    add(
                        MANGLE,
                        "istio-inbound",
                        f"{tcp} {established} tcp dport {port} counter jump istio-divert",
                    )
                    add(
                        MANGLE, "istio-inbound", f"{tcp} tcp dport {port} counter jump istio-tproxy"
                    )
        else:
            add(NAT, "prerouting", f"{tcp} counter jump istio-inbound")
            if capture.capture_all_inbound:
                for port in capture.exclude_inbound_ports:
                    add(NAT, "istio-inbound", f"{tcp} tcp dport {port} counter return")
                add(NAT, "istio-inbound", f"{tcp} counter jump istio-in-redirect")
            else:
                for port in capture.include_inbound_ports:
                    add(
                        NAT,
                        "istio-inbound",
                        f"{tcp} tcp dport {port} counter jump istio-in-redirect",
                    )
    # Outbound: ports never captured, the passthrough source, the proxy's own traffic.
    add(NAT, "output", "counter jump istio-output")
    for port in capture.exclude_outbound_ports:
        add(NAT, "istio-output", f"tcp dport {port} counter return")
        add(NAT, "istio-output", f"udp dport {port} counter return")
    add(NAT, "istio-output", "oifname lo ip saddr 127.0.0.6/32 counter return")
    add(NAT, "istio-output", "oifname lo ip6 saddr ::6/128 counter return", v6=True)
    loopback_included = any(
        ipaddress.ip_interface(c).ip.is_loopback for c in capture.include_outbound_ip_ranges
    )
    for owner, number in (("skuid", uid), ("skgid", gid)):
        ports = f"{{ 53, {TUNNEL_PORT} }}" if dns and owner == "skuid" else str(TUNNEL_PORT)
        for match, lo, v6 in (("ip daddr", "127.0.0.1/32", False), ("ip6 daddr", "::1/128", True)):
            add(
                NAT,
                "istio-output",
                f"oifname lo {tcp} {match} != {lo} tcp dport != {ports} {owner} {number} "
                "counter jump istio-in-redirect",
                v6=v6,
            )
        if not loopback_included:
            if dns:
                add(
                    NAT,
                    "istio-output",
                    f"oifname lo {tcp} tcp dport != 53 {owner} != {number} counter return",
                )
            else:
                add(NAT, "istio-output", f"oifname lo {owner} != {number} counter return")
        add(NAT, "istio-output", f"{owner} {number} counter return")
    # DNS, captured whole (the CNI form).
    if dns:
        add(RAW, "output", "counter jump istio-output-dns")
        add(NAT, "istio-output", "counter jump istio-output-dns")
        add(NAT, "istio-output-dns", f"{tcp} tcp dport 53 counter redirect to :{DNS_PORT}")
        add(NAT, "istio-output-dns", f"udp dport 53 counter redirect to :{DNS_PORT}")
        for owner, number in (("skuid", uid), ("skgid", gid)):
            add(
                RAW, "istio-output-dns", f"udp dport 53 meta {owner} {number} counter ct zone set 1"
            )
            add(
                RAW,
                "istio-output-dns",
                f"udp sport {DNS_PORT} meta {owner} {number} counter ct zone set 2",
            )
        add(RAW, "prerouting", "counter jump istio-inbound")
        add(RAW, "istio-output-dns", "udp dport 53 counter ct zone set 2")
        add(RAW, "istio-inbound", "udp sport 53 counter ct zone set 1")
    add(NAT, "istio-output", "ip daddr 127.0.0.1/32 counter return")
    add(NAT, "istio-output", "ip6 daddr ::1/128 counter return", v6=True)
    for cidr in _of_family(capture.exclude_outbound_ip_ranges, 4):
        add(NAT, "istio-output", f"ip daddr {cidr} counter return")
    for cidr in _of_family(capture.exclude_outbound_ip_ranges, 6):
        add(NAT, "istio-output", f"ip6 daddr {cidr} counter return", v6=True)
    for port in capture.include_outbound_ports:
        add(NAT, "istio-output", f"tcp dport {port} counter jump istio-redirect")
    if capture.capture_all_outbound:
        add(NAT, "istio-output", "counter jump istio-redirect")
        for name in virtual:
            add(NAT, "prerouting", f"iifname {name} counter jump istio-redirect", index=0)
    else:
        families: tuple[tuple[Family, str], ...] = ((4, "ip daddr"), (6, "ip6 daddr"))
        for family, match in families:
            for cidr in _of_family(capture.include_outbound_ip_ranges, family):
                for name in virtual:
                    add(
                        NAT,
                        "prerouting",
                        f"iifname {name} {match} {cidr} counter jump istio-redirect",
                        v6=family == 6,
                        index=0,
                    )
                add(
                    NAT,
                    "istio-output",
                    f"{match} {cidr} counter jump istio-redirect",
                    v6=family == 6,
                )
    # TPROXY's marks: inbound connections' replies go back through the proxy.
    if tproxy:
        mark = TPROXY_MARK
        add(MANGLE, "prerouting", f"{tcp} mark {mark} counter ct mark set mark")
        add(MANGLE, "output", f"oifname lo {tcp} mark {mark} counter return")
        for owner, number in (("skuid", uid), ("skgid", gid)):
            for match, lo, v6 in (
                ("ip daddr", "127.0.0.1/32", False),
                ("ip6 daddr", "::1/128", True),
            ):
                add(
                    MANGLE,
                    "output",
                    f"oifname lo {tcp} {match} != {lo} {owner} {number} counter "
                    f"meta mark set {OUTBOUND_MARK}",
                    v6=v6,
                )
        add(MANGLE, "output", f"{tcp} ct mark {mark} counter meta mark set ct mark")
        add(MANGLE, "istio-inbound", f"{tcp} mark {mark} counter return", index=0)
        add(
            MANGLE,
            "istio-inbound",
            f"iifname lo {tcp} ip saddr 127.0.0.6/32 counter return",
            index=1,
        )
        add(
            MANGLE,
            "istio-inbound",
            f"iifname lo {tcp} ip6 saddr ::6/128 counter return",
            v6=True,
            index=1,
        )
        add(
            MANGLE,
            "istio-inbound",
            f"iifname lo {tcp} mark != {OUTBOUND_MARK} counter return",
            index=2,
        )
    return rules


def _of_family(cidrs: Sequence[str], family: Family) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_interface(c).version == family]


def sidecar_nft_ruleset(capture: SidecarCapture, families: Sequence[Family]) -> str:
    """The whole capture as `nft -f` input (both families when `families` has 6)."""
    check_capture(capture)
    rules = _rules(capture, 6 in families)
    lines: list[str] = []
    for table in SIDECAR_NFT_TABLES:
        mine = [r for r in rules if r.table == table]
        used = {r.chain for r in mine}
        if not mine:
            continue
        lines += [f"add table inet {table}", f"flush table inet {table}"]
        for chain, hook in _CHAINS[table]:
            if chain in used:
                lines.append(f"add chain inet {table} {chain}" + (f" {hook}" if hook else ""))
        count: dict[str, int] = {}
        for rule in mine:
            seen = count.get(rule.chain, 0)
            # As Istio's: an insert into a chain with fewer rules than its index is an add.
            if rule.index is not None and seen > 0 and rule.index < seen:
                lines.append(
                    f"insert rule inet {table} {rule.chain} index {rule.index} {rule.text}"
                )
            else:
                lines.append(f"add rule inet {table} {rule.chain} {rule.text}")
            count[rule.chain] = seen + 1
    return "\n".join(lines) + "\n" if lines else ""
