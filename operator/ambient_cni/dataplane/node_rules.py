"""The legacy node-level mode's iptables (reference ambient-redirection.md section 3): pure.

Istio 1.16-1.20 steered every enrolled pod's traffic from the node itself: marks in the
host's mangle table, policy routing into two tunnels to the ztunnel pod, and TPROXY
inside the ztunnel pod's netns. The rules here are Istio 1.20.8's
(cni/pkg/ambient/net_linux.go, CreateRulesOnNode and CreateRulesWithinNodeProxyNS), in
its order, as iptables-restore input: chains declared, each jumped to from position 1
of its built-in chain, the rules appended. Source document 000 prints the host's
mangle `ztunnel-PREROUTING` and nat chains as iptables-save shows them (Istio 1.18/1.19:
its `ztunnel-OUTPUT` rule predates 1.20's narrower match).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ambient_cni.api.models import IP, InterfaceName, is_interface_name

from .errors import UnsafeInput

IPSET = "ztunnel-pods-ips"
INBOUND_TUNNEL, OUTBOUND_TUNNEL = "istioin", "istioout"
ZTUNNEL_INBOUND_TUNNEL, ZTUNNEL_OUTBOUND_TUNNEL = "pistioin", "pistioout"
INBOUND_VNI, OUTBOUND_VNI = 1000, 1001
DEFAULT_TUNNEL_PORT = 6081
# Marks (value/mask).
OUTBOUND_MARK = "0x100/0x100"
SKIP_MARK = "0x200/0x200"
CONN_SKIP_MARK = "0x220/0x220"
PROXY_MARK = "0x210/0x210"
PROXY_RETURN_MARK = "0x040/0x040"
TPROXY_MARK = "0x400/0xfff"
ORIGINAL_SOURCE_RETURN_MARK = "0x4d3/0xfff"

PREROUTING, POSTROUTING = "ztunnel-PREROUTING", "ztunnel-POSTROUTING"
INPUT, OUTPUT, FORWARD = "ztunnel-INPUT", "ztunnel-OUTPUT", "ztunnel-FORWARD"
NODE_CHAINS = frozenset({PREROUTING, POSTROUTING, INPUT, OUTPUT, FORWARD})
# (table, our chain, the built-in chain that jumps to it), in Istio's order of creation.
_JUMPS = (
    ("nat", PREROUTING, "PREROUTING"),
    ("nat", POSTROUTING, "POSTROUTING"),
    ("mangle", PREROUTING, "PREROUTING"),
    ("mangle", POSTROUTING, "POSTROUTING"),
    ("mangle", OUTPUT, "OUTPUT"),
    ("mangle", INPUT, "INPUT"),
    ("mangle", FORWARD, "FORWARD"),
    ("filter", FORWARD, "FORWARD"),
)
_TABLE_ORDER = ("mangle", "nat", "filter")


class NodeHost(BaseModel):
    """What the node's rules depend on: the active ztunnel pod and the node itself."""

    model_config = ConfigDict(frozen=True)

    ztunnel_veth: InterfaceName  # the host side of the ztunnel pod's veth
    ztunnel_ip: IP
    host_ip: IP  # the node's address on the pod network (its pod CIDR's gateway)
    tunnel_port: int = DEFAULT_TUNNEL_PORT
    dns_capture: bool = False


def _save_mark(mark: str) -> str:
    mask = mark.split("/")[1]
    return f"-m mark --mark {mark} -j CONNMARK --save-mark --nfmask {mask} --ctmask {mask}"


def host_ruleset(host: NodeHost) -> str:
    """The host's chains, jumps and rules (IPv4 only, as in Istio)."""
    if not is_interface_name(host.ztunnel_veth):
        raise UnsafeInput(f"interface name {host.ztunnel_veth!r}")
    veth, ztunnel = host.ztunnel_veth, host.ztunnel_ip
    rules: dict[str, list[str]] = {
        "mangle": [
            f"-A {PREROUTING} -i {INBOUND_TUNNEL} -j MARK --set-mark {SKIP_MARK}",
            f"-A {PREROUTING} -i {INBOUND_TUNNEL} -j RETURN",
            f"-A {PREROUTING} -i {OUTBOUND_TUNNEL} -j MARK --set-mark {SKIP_MARK}",
            f"-A {PREROUTING} -i {OUTBOUND_TUNNEL} -j RETURN",
            f"-A {PREROUTING} -p udp -m udp --dport {host.tunnel_port} -j RETURN",
            f"-A {PREROUTING} -m connmark --mark {CONN_SKIP_MARK} -j MARK --set-mark {SKIP_MARK}",
            f"-A {PREROUTING} -m mark --mark {SKIP_MARK} -j RETURN",
            f"-A {PREROUTING} ! -i {veth} -m connmark --mark {PROXY_MARK} "
            f"-j MARK --set-mark {PROXY_RETURN_MARK}",
            f"-A {PREROUTING} -m mark --mark {PROXY_RETURN_MARK} -j RETURN",
            f"-A {PREROUTING} -i {veth} ! -s {ztunnel}/32 -j MARK --set-mark {PROXY_MARK}",
            f"-A {PREROUTING} -m mark --mark {SKIP_MARK} -j RETURN",
            f"-A {PREROUTING} -i {veth} -j MARK --set-mark {CONN_SKIP_MARK}",
            f"-A {PREROUTING} -p udp -j MARK --set-mark {CONN_SKIP_MARK}",
            f"-A {PREROUTING} -m mark --mark {SKIP_MARK} -j RETURN",
            f"-A {PREROUTING} -p tcp -m set --match-set {IPSET} src "
            f"-j MARK --set-mark {OUTBOUND_MARK}",
            f"-A {FORWARD} {_save_mark(CONN_SKIP_MARK)}",
            f"-A {FORWARD} {_save_mark(PROXY_MARK)}",
            f"-A {INPUT} {_save_mark(CONN_SKIP_MARK)}",
            f"-A {INPUT} {_save_mark(PROXY_MARK)}",
            # Istio 1.20: only the host's own connections to enrolled pods skip ztunnel.
            f"-A {OUTPUT} -s {host.host_ip}/32 -p tcp -m owner --socket-exists "
            f"-m set --match-set {IPSET} dst -j MARK --set-mark 0x220",
        ],
        "nat": [
            f"-A {PREROUTING} -m mark --mark {OUTBOUND_MARK} -j ACCEPT",
            *(
                [
                    f"-A {PREROUTING} -p udp -m set --match-set {IPSET} src -m udp --dport 53 "
                    f"-j DNAT --to-destination {ztunnel}:15053"
                ]
                if host.dns_capture
                else []
            ),
            f"-A {POSTROUTING} -m mark --mark {OUTBOUND_MARK} -j ACCEPT",
        ],
        "filter": [f"-A {FORWARD} -m mark --mark {OUTBOUND_MARK} -j ACCEPT"],
    }
    blocks = []
    for table in _TABLE_ORDER:
        chains = [chain for t, chain, _ in _JUMPS if t == table]
        jumps = [f"-I {builtin} 1 -j {chain}" for t, chain, builtin in _JUMPS if t == table]
        lines = [f"*{table}", *(f"-N {c}" for c in chains), *jumps, *rules[table], "COMMIT"]
        blocks.append("\n".join(lines) + "\n")
    return "".join(blocks)


def ztunnel_ruleset(ztunnel_ip: str, ztunnel_if: str = "eth0") -> str:
    """Inside the ztunnel pod's netns: TPROXY what arrives through the tunnels to its
    listeners on 127.0.0.1, and mark what it sends out so replies come back to it."""
    if not is_interface_name(ztunnel_if):
        raise UnsafeInput(f"interface name {ztunnel_if!r}")
    tproxy = f"-j TPROXY --tproxy-mark {TPROXY_MARK}"
    return (
        "*mangle\n"
        f"-A PREROUTING -p tcp -i {ZTUNNEL_INBOUND_TUNNEL} -m tcp --dport 15008 "
        f"{tproxy} --on-port 15008 --on-ip 127.0.0.1\n"
        f"-A PREROUTING -p tcp -i {ZTUNNEL_OUTBOUND_TUNNEL} {tproxy} --on-port 15001 "
        "--on-ip 127.0.0.1\n"
        f"-A PREROUTING -p tcp -i {ZTUNNEL_INBOUND_TUNNEL} {tproxy} --on-port 15006 "
        "--on-ip 127.0.0.1\n"
        f"-A PREROUTING -p tcp -i {ztunnel_if} ! -d {ztunnel_ip}/32 "
        f"-j MARK --set-mark {ORIGINAL_SOURCE_RETURN_MARK}\n"
        "COMMIT\n"
    )
