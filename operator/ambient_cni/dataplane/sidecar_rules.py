"""A sidecar pod's capture as iptables-restore input, rule for rule as Istio's CNI plugin
writes it (reference sidecar-interception.md sections 3 and 4): a pure function.

The rules are generated in Istio's order, one IP family at a time, then printed
per table (mangle, nat, raw, each only if it has rules) with the chains
declared in order of first use, so the text equals Istio's golden files.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from ambient_cni.api.models import SidecarCapture, is_cidr, is_interface_name

from .constants import Family
from .errors import UnsafeInput

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
TUNNEL_PORT = 15008
DNS_PORT = 15053
TPROXY_MARK = 1337
OUTBOUND_MARK = 1338
TPROXY_TABLE = 133
# Istio's routing for TPROXY has no explicit priority; in a pod's fresh namespace the
# kernel gives it 32765, which is said here so a copy is refused rather than added.
TPROXY_RULE_PRIORITY = 32765

LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}
BUILT_IN = frozenset(
    ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP")
)
TABLE_ORDER = ("mangle", "nat", "raw")


@dataclass(frozen=True)
class _Rule:
    table: str
    chain: str
    spec: str
    insert_at: int | None = None  # -I chain N; None: -A

    def text(self) -> str:
        if self.insert_at is None:
            return f"-A {self.chain} {self.spec}"
        return f"-I {self.chain} {self.insert_at} {self.spec}"


def families(capture: SidecarCapture, ips: Sequence[str]) -> tuple[Family, ...]:
    """IPv4 always; IPv6 too when the pod has only IPv6 addresses, or with dual stack when
    it has any. (Istio takes the first address of the pod's interfaces, and the kernel
    lists IPv4 ones first: a dual-stack pod is IPv6 only with ISTIO_DUAL_STACK.)"""
    versions = {ipaddress.ip_address(ip).version for ip in ips}
    ipv6 = (6 in versions) if capture.dual_stack else (versions == {6})
    return (4, 6) if ipv6 else (4,)


def check_capture(capture: SidecarCapture) -> None:
    """What enters a rule, checked again here (the model validated it once already)."""
    for name in (*capture.exclude_interfaces, *capture.reroute_virtual_interfaces):
        if not is_interface_name(name):
            raise UnsafeInput(f"interface name {name!r}")
    for cidr in (*capture.include_outbound_ip_ranges, *capture.exclude_outbound_ip_ranges):
        if not is_cidr(cidr):
            raise UnsafeInput(f"CIDR {cidr!r}")


def _of_family(cidrs: Sequence[str], family: Family) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_interface(c).version == family]


def _rules(capture: SidecarCapture, family: Family) -> list[_Rule]:
    rules: list[_Rule] = []

    def add(table: str, chain: str, spec: str, insert_at: int | None = None) -> None:
        rules.append(_Rule(table, chain, spec, insert_at))

    tproxy = capture.interception_mode == "TPROXY"
    lo, six = LOOPBACK[family], PASSTHROUGH_SOURCE[family]
    uid, gid = capture.proxy_uid, capture.proxy_gid
    virtual = capture.reroute_virtual_interfaces
    # 1. interfaces never captured
    for name in capture.exclude_interfaces:
        add("nat", "PREROUTING", f"-i {name} -j RETURN")
        add("nat", "OUTPUT", f"-o {name} -j RETURN")
    if tproxy:
        for name in capture.exclude_interfaces:
            add("mangle", "PREROUTING", f"-i {name} -j RETURN")
            add("mangle", "OUTPUT", f"-o {name} -j RETURN")
    # 2. virtual interfaces: their inbound is not the pod's
    for name in virtual:
        add("nat", "PREROUTING", f"-i {name} -j RETURN", 1)
    # 3. invalid packets dropped
    if capture.invalid_drop:
        add("mangle", "PREROUTING", "-m conntrack --ctstate INVALID -j ISTIO_DROP")
        add("mangle", "ISTIO_DROP", "-j DROP")
    # 4-6. the tunnel port, and the two redirections
    add("nat", "ISTIO_INBOUND", f"-p tcp --dport {TUNNEL_PORT} -j RETURN")
    add("nat", "ISTIO_REDIRECT", f"-p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")
    add("nat", "ISTIO_IN_REDIRECT", f"-p tcp -j REDIRECT --to-ports {INBOUND_PORT}")
    # 7. inbound
    if capture.capture_all_inbound or capture.include_inbound_ports:
        table = "mangle" if tproxy else "nat"
        if tproxy:
            add("mangle", "ISTIO_DIVERT", f"-j MARK --set-mark {TPROXY_MARK}")
            add("mangle", "ISTIO_DIVERT", "-j ACCEPT")
            add(
                "mangle",
                "ISTIO_TPROXY",
                f"! -d {lo} -p tcp -j TPROXY --tproxy-mark {TPROXY_MARK}/0xffffffff "
                f"--on-port {INBOUND_PORT}",
            )
        add(table, "PREROUTING", "-p tcp -j ISTIO_INBOUND")
        established = "-m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT"
        if capture.capture_all_inbound:
            for port in capture.exclude_inbound_ports:
                add(table, "ISTIO_INBOUND", f"-p tcp --dport {port} -j RETURN")
            if tproxy:
                add("mangle", "ISTIO_INBOUND", f"-p tcp {established}")
                add("mangle", "ISTIO_INBOUND", "-p tcp -j ISTIO_TPROXY")
            else:
                add("nat", "ISTIO_INBOUND", "-p tcp -j ISTIO_IN_REDIRECT")
        else:
            for port in capture.include_inbound_ports:
                if tproxy:
                    add("mangle", "ISTIO_INBOUND", f"-p tcp --dport {port} {established}")
                    add("mangle", "ISTIO_INBOUND", f"-p tcp --dport {port} -j ISTIO_TPROXY")
                else:
                    add("nat", "ISTIO_INBOUND", f"-p tcp --dport {port} -j ISTIO_IN_REDIRECT")
    # 8-10. outbound: ports never captured, the passthrough source
    add("nat", "OUTPUT", "-j ISTIO_OUTPUT")
    for port in capture.exclude_outbound_ports:
        add("nat", "ISTIO_OUTPUT", f"-p tcp --dport {port} -j RETURN")
        add("nat", "ISTIO_OUTPUT", f"-p udp --dport {port} -j RETURN")
    add("nat", "ISTIO_OUTPUT", f"-o lo -s {six} -j RETURN")
    # 11-12. the proxy's own traffic, by UID then GID
    # The address as written, as Istio tests it (127.0.0.1/0 counts, 10.0.0.0/1 does not).
    loopback_included = any(
        ipaddress.ip_interface(c).ip.is_loopback for c in capture.include_outbound_ip_ranges
    )
    dns = capture.dns_capture
    for match, owner in (("--uid-owner", uid), ("--gid-owner", gid)):
        if dns and match == "--uid-owner":
            ports = f"-p tcp -m multiport ! --dports 53,{TUNNEL_PORT}"
        else:
            ports = f"-p tcp ! --dport {TUNNEL_PORT}"
        add(
            "nat",
            "ISTIO_OUTPUT",
            f"-o lo ! -d {lo} {ports} -m owner {match} {owner} -j ISTIO_IN_REDIRECT",
        )
        if not loopback_included:
            not_dns = "-p tcp ! --dport 53 " if dns else ""
            add("nat", "ISTIO_OUTPUT", f"-o lo {not_dns}-m owner ! {match} {owner} -j RETURN")
        add("nat", "ISTIO_OUTPUT", f"-m owner {match} {owner} -j RETURN")
    # 14. DNS, captured whole (the CNI form)
    if dns:
        add("raw", "OUTPUT", "-j ISTIO_OUTPUT_DNS")
        add("nat", "ISTIO_OUTPUT", "-j ISTIO_OUTPUT_DNS")
        add("nat", "ISTIO_OUTPUT_DNS", f"-p tcp --dport 53 -j REDIRECT --to-ports {DNS_PORT}")
        add("nat", "ISTIO_OUTPUT_DNS", f"-p udp --dport 53 -j REDIRECT --to-port {DNS_PORT}")
        for match, owner in (("--uid-owner", uid), ("--gid-owner", gid)):
            add(
                "raw",
                "ISTIO_OUTPUT_DNS",
                f"-p udp --dport 53 -m owner {match} {owner} -j CT --zone 1",
            )
            add(
                "raw",
                "ISTIO_OUTPUT_DNS",
                f"-p udp --sport {DNS_PORT} -m owner {match} {owner} -j CT --zone 2",
            )
        add("raw", "PREROUTING", "-j ISTIO_INBOUND")
        add("raw", "ISTIO_OUTPUT_DNS", "-p udp --dport 53 -j CT --zone 2")
        add("raw", "ISTIO_INBOUND", "-p udp --sport 53 -j CT --zone 1")
    # 15-18. loopback, excluded ranges, included ports, included ranges
    add("nat", "ISTIO_OUTPUT", f"-d {lo} -j RETURN")
    for cidr in _of_family(capture.exclude_outbound_ip_ranges, family):
        add("nat", "ISTIO_OUTPUT", f"-d {cidr} -j RETURN")
    for port in capture.include_outbound_ports:
        add("nat", "ISTIO_OUTPUT", f"-p tcp --dport {port} -j ISTIO_REDIRECT")
    if capture.capture_all_outbound:
        add("nat", "ISTIO_OUTPUT", "-j ISTIO_REDIRECT")
        for name in virtual:
            add("nat", "PREROUTING", f"-i {name} -j ISTIO_REDIRECT", 1)
    else:
        for cidr in _of_family(capture.include_outbound_ip_ranges, family):
            for name in virtual:
                add("nat", "PREROUTING", f"-i {name} -d {cidr} -j ISTIO_REDIRECT", 1)
            add("nat", "ISTIO_OUTPUT", f"-d {cidr} -j ISTIO_REDIRECT")
    # 19. TPROXY's marks: inbound connections' replies go back through the proxy
    if tproxy:
        mark = TPROXY_MARK
        add("mangle", "PREROUTING", f"-p tcp -m mark --mark {mark} -j CONNMARK --save-mark")
        add("mangle", "OUTPUT", f"-p tcp -o lo -m mark --mark {mark} -j RETURN")
        for match, owner in (("--uid-owner", uid), ("--gid-owner", gid)):
            add(
                "mangle",
                "OUTPUT",
                f"! -d {lo} -p tcp -o lo -m owner {match} {owner} "
                f"-j MARK --set-mark {OUTBOUND_MARK}",
            )
        add("mangle", "OUTPUT", f"-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark")
        add("mangle", "ISTIO_INBOUND", f"-p tcp -m mark --mark {mark} -j RETURN", 1)
        add("mangle", "ISTIO_INBOUND", f"-p tcp -s {six} -i lo -j RETURN", 2)
        add(
            "mangle", "ISTIO_INBOUND", f"-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN", 3
        )
    return rules


def sidecar_ruleset(capture: SidecarCapture, family: Family) -> str:
    """iptables-restore --noflush input (for ip6tables-restore with family 6)."""
    check_capture(capture)
    rules = _rules(capture, family)
    blocks = []
    for table in TABLE_ORDER:
        mine = [r for r in rules if r.table == table]
        if not mine:
            continue
        declared: list[str] = []
        for rule in mine:
            if rule.chain not in BUILT_IN and rule.chain not in declared:
                declared.append(rule.chain)
        for rule in mine:
            words = rule.spec.split()
            target = words[-1] if len(words) >= 2 and words[-2] == "-j" else None
            if target and target not in BUILT_IN and target not in declared:
                declared.append(target)
        lines = [f"* {table}", *(f"-N {c}" for c in declared), *(r.text() for r in mine)]
        blocks.append("\n".join([*lines, "COMMIT"]) + "\n")
    return "".join(blocks)
