"""The legacy node mode's links, routes, rules and sysctls, as data: pure.

What Istio 1.20.8's agent made with netlink and `ip` (cni/pkg/ambient/net_linux.go),
said as values an applier makes exactly and a check reads back: on the node, two
tunnels to the ztunnel pod (`istioin` VNI 1000 192.168.126.1/30, `istioout` VNI 1001
192.168.127.1/30), tables 100-102 and rules 100-103, and per enrolled pod a /32 via the
inbound tunnel in table 100; in the ztunnel pod's netns, the tunnels' other ends
(`pistioin`, `pistioout`), rules 20000/20003 and tables 100-102. Geneve as Istio had it;
VXLAN with the same names, VNIs and addresses where the kernel has no geneve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .node_rules import (
    INBOUND_TUNNEL,
    INBOUND_VNI,
    OUTBOUND_TUNNEL,
    OUTBOUND_VNI,
    ZTUNNEL_INBOUND_TUNNEL,
    ZTUNNEL_OUTBOUND_TUNNEL,
    NodeHost,
)

TunnelKind = Literal["geneve", "vxlan"]
INBOUND_NET = ("192.168.126.1", "192.168.126.2")  # the node's end, ztunnel's end (/30)
OUTBOUND_NET = ("192.168.127.1", "192.168.127.2")
TUNNEL_PREFIX = 30
INBOUND_TABLE, OUTBOUND_TABLE, PROXY_TABLE = 100, 101, 102


@dataclass(frozen=True)
class ZtunnelPath:
    """How the node reaches its ztunnel pod: the host side of its veth, and the node's own
    address toward it (the source the kernel picks: on a kindnet/ptp node, the pod CIDR's
    gateway, which is what Istio's GetHostIP found)."""

    veth: str
    host_ip: str


class Tunnel(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    kind: TunnelKind
    vni: int
    remote: str
    port: int
    address: str  # with its prefix: 192.168.126.1/30


class Route(BaseModel):
    model_config = ConfigDict(frozen=True)

    table: int
    dst: str  # an address (a host route, as Istio wrote them), a CIDR, or 0.0.0.0/0
    device: str
    via: str | None = None
    src: str | None = None
    scope: Literal["universe", "link", "host"] = "universe"
    kind: Literal["unicast", "local"] = "unicast"
    onlink: bool = False


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True)

    priority: int
    table: int | None = None  # lookup TABLE
    goto: int | None = None  # goto PRIORITY
    fwmark: int | None = None
    fwmask: int | None = None


def host_tunnels(host: NodeHost, kind: TunnelKind) -> list[Tunnel]:
    return [
        Tunnel(
            name=INBOUND_TUNNEL,
            kind=kind,
            vni=INBOUND_VNI,
            remote=host.ztunnel_ip,
            port=host.tunnel_port,
            address=f"{INBOUND_NET[0]}/{TUNNEL_PREFIX}",
        ),
        Tunnel(
            name=OUTBOUND_TUNNEL,
            kind=kind,
            vni=OUTBOUND_VNI,
            remote=host.ztunnel_ip,
            port=host.tunnel_port,
            address=f"{OUTBOUND_NET[0]}/{TUNNEL_PREFIX}",
        ),
    ]


def host_routes(host: NodeHost) -> list[Route]:
    """Tables 101 (out through ztunnel), 102 (back to ztunnel) and 100 (in, per pod)."""
    veth, ztunnel = host.ztunnel_veth, host.ztunnel_ip
    return [
        Route(table=OUTBOUND_TABLE, dst=ztunnel, device=veth, scope="link"),
        Route(table=OUTBOUND_TABLE, dst="0.0.0.0/0", device=OUTBOUND_TUNNEL, via=OUTBOUND_NET[1]),
        Route(table=PROXY_TABLE, dst=ztunnel, device=veth, scope="link"),
        Route(table=PROXY_TABLE, dst="0.0.0.0/0", device=veth, via=ztunnel, onlink=True),
        Route(table=INBOUND_TABLE, dst=ztunnel, device=veth, scope="link"),
    ]


def host_rules() -> list[Rule]:
    return [
        Rule(priority=100, fwmark=0x200, fwmask=0x200, goto=32766),
        Rule(priority=101, fwmark=0x100, fwmask=0x100, table=OUTBOUND_TABLE),
        Rule(priority=102, fwmark=0x040, fwmask=0x040, table=PROXY_TABLE),
        Rule(priority=103, table=INBOUND_TABLE),
    ]


def pod_route(pod_ip: str, host: NodeHost) -> Route:
    """An enrolled pod's way in: through the inbound tunnel, from the node's address."""
    return Route(
        table=INBOUND_TABLE,
        dst=f"{pod_ip}/32",
        device=INBOUND_TUNNEL,
        via=INBOUND_NET[1],
        src=host.host_ip,
    )


def host_sysctls(host: NodeHost) -> list[tuple[str, str]]:
    """(`/proc/sys/net/ipv4/conf/...` path under conf/, value), as Istio wrote them."""
    return [
        ("default/rp_filter", "0"),
        ("all/rp_filter", "0"),
        (f"{host.ztunnel_veth}/rp_filter", "0"),
        (f"{host.ztunnel_veth}/accept_local", "1"),
        (f"{INBOUND_TUNNEL}/rp_filter", "0"),
        (f"{INBOUND_TUNNEL}/accept_local", "1"),
        (f"{OUTBOUND_TUNNEL}/rp_filter", "0"),
        (f"{OUTBOUND_TUNNEL}/accept_local", "1"),
    ]


def ztunnel_tunnels(host_ip: str, kind: TunnelKind, port: int) -> list[Tunnel]:
    return [
        Tunnel(
            name=ZTUNNEL_INBOUND_TUNNEL,
            kind=kind,
            vni=INBOUND_VNI,
            remote=host_ip,
            port=port,
            address=f"{INBOUND_NET[1]}/{TUNNEL_PREFIX}",
        ),
        Tunnel(
            name=ZTUNNEL_OUTBOUND_TUNNEL,
            kind=kind,
            vni=OUTBOUND_VNI,
            remote=host_ip,
            port=port,
            address=f"{OUTBOUND_NET[1]}/{TUNNEL_PREFIX}",
        ),
    ]


def ztunnel_routes(host_ip: str, ztunnel_if: str = "eth0") -> list[Route]:
    return [
        Route(table=INBOUND_TABLE, dst="0.0.0.0/0", device="lo", scope="host", kind="local"),
        Route(
            table=OUTBOUND_TABLE,
            dst="0.0.0.0/0",
            device=ZTUNNEL_OUTBOUND_TUNNEL,
            via=OUTBOUND_NET[0],
        ),
        Route(
            table=PROXY_TABLE, dst="0.0.0.0/0", device=ZTUNNEL_INBOUND_TUNNEL, via=INBOUND_NET[0]
        ),
        Route(table=OUTBOUND_TABLE, dst=f"{host_ip}/32", device=ztunnel_if, scope="link"),
        Route(table=PROXY_TABLE, dst=f"{host_ip}/32", device=ztunnel_if, scope="link"),
    ]


def ztunnel_rules() -> list[Rule]:
    return [
        Rule(priority=20000, fwmark=0x400, fwmask=0xFFF, table=INBOUND_TABLE),
        Rule(priority=20003, fwmark=0x4D3, fwmask=0xFFF, table=INBOUND_TABLE),
    ]


def ztunnel_sysctls(ztunnel_if: str = "eth0") -> list[tuple[str, str]]:
    return [
        (f"{ZTUNNEL_OUTBOUND_TUNNEL}/rp_filter", "0"),
        (f"{ZTUNNEL_INBOUND_TUNNEL}/rp_filter", "0"),
        ("default/rp_filter", "0"),
        ("all/rp_filter", "0"),
        (f"{ztunnel_if}/rp_filter", "0"),
    ]


def as_ip_command(route: Route) -> str:
    """The `ip route add` words for a route, as the documents print them (for status and
    for a person comparing with `ip route show table N`)."""
    words = ["ip route add table", str(route.table)]
    words.append(route.kind + " " + route.dst if route.kind == "local" else route.dst)
    if route.via:
        words.append(f"via {route.via}")
    words.append(f"dev {route.device}")
    if route.src:
        words.append(f"src {route.src}")
    if route.scope == "link":
        words.append("scope link")
    if route.onlink:
        words.append("onlink")
    return " ".join(words)


def as_rule_command(rule: Rule) -> str:
    words = [f"ip rule add priority {rule.priority}"]
    if rule.fwmark is not None:
        words.append(f"fwmark 0x{rule.fwmark:03x}/0x{rule.fwmask or 0xFFFFFFFF:03x}")
    if rule.goto is not None:
        words.append(f"goto {rule.goto}")
    if rule.table is not None:
        words.append(f"lookup {rule.table}" if rule.fwmark is not None else f"table {rule.table}")
    return " ".join(words)
