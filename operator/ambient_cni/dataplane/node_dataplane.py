"""The legacy node mode in the kernel: the node's side and the ztunnel pod's side.

Applies what node_rules.py and node_plan.py render, level-based: each ensure reads
what is there, makes it exactly the plan, and says what it had to change (a person
sees the repair in status). Links, addresses, routes and rules go over netlink
(pyroute2), iptables through the shared save-compare-replace (iptables_chains.py),
the address set through ipset.py; nothing here decides what should be redirected.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.ipset import IPSet
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_NEWROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .errors import DataplaneError
from .interfaces import Change, Changes, Exec, Runner
from .ipset import IpsetAddressSets
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_state import Ownership
from .node_plan import (
    INBOUND_TABLE,
    OUTBOUND_TABLE,
    PROXY_TABLE,
    Route,
    Rule,
    Tunnel,
    TunnelKind,
    ZtunnelPath,
    host_routes,
    host_rules,
    host_sysctls,
    host_tunnels,
    pod_route,
    ztunnel_routes,
    ztunnel_rules,
    ztunnel_sysctls,
    ztunnel_tunnels,
)
from .node_rules import (
    INBOUND_TUNNEL,
    IPSET,
    NODE_CHAINS,
    OUTBOUND_TUNNEL,
    NodeHost,
    host_ruleset,
    ztunnel_ruleset,
)
from .rtnetlink import created, deleted, encoded, rtnetlink
from .runner import in_netns

NODE_OWNED = Ownership(NODE_CHAINS)
# Inside the ztunnel pod Istio flushed mangle PREROUTING and wrote its rules straight there.
ZTUNNEL_OWNED = Ownership(frozenset(), frozenset({"PREROUTING"}), frozenset({"mangle"}))
TABLES = (INBOUND_TABLE, OUTBOUND_TABLE, PROXY_TABLE)
TUNNEL_KINDS: tuple[TunnelKind, ...] = ("geneve", "vxlan")  # Istio's first; VXLAN where no geneve
RTPROT_BOOT = 3  # what `ip route add` makes; Istio's routes show `proto boot`
RTNH_F_ONLINK = 4
SCOPES = {"universe": 0, "link": 253, "host": 254}
TYPES = {"unicast": 1, "local": 2}
FR_ACT_TO_TBL, FR_ACT_GOTO = 1, 2
IPSET_ERR_EXIST = 4103  # ipset's "already added" and "not added" alike


P = ParamSpec("P")
R = TypeVar("R")


def _said_as_dataplane_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Whatever netlink or a file refuses leaves as a DataplaneError, in its own words: the
    agent reports those, and a worker never dies of one."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except NetlinkError as exc:
            raise DataplaneError("NetlinkFailed", str(exc.args[-1]), retryable=True) from exc
        except OSError as exc:
            raise DataplaneError("KernelCallFailed", str(exc), retryable=True) from exc

    return call


class NodeModeDataplane:
    def __init__(self, flavour: Flavour, runner: Runner, host_netns: Path | None = None):
        self.runner = runner
        self.host_netns = host_netns
        self.chains = IptablesChains(flavour, runner, NODE_OWNED)
        self.ztunnel_chains = IptablesChains(flavour, runner, ZTUNNEL_OWNED)
        self.ipset = IpsetAddressSets({4: IPSET}, host_netns)
        self._kinds = list(TUNNEL_KINDS)  # geneve is dropped after the kernel refuses it once
        self._lock = threading.Lock()

    @property
    def tunnel_kind(self) -> TunnelKind:
        with self._lock:
            return self._kinds[0]

    # -- finding the ztunnel pod -------------------------------------------------------------

    @_said_as_dataplane_errors
    def ztunnel_path(self, ztunnel_ip: str) -> ZtunnelPath:
        """The veth the main table routes the ztunnel pod's address through, as Istio's
        agent required ("not veth implemented CNI" otherwise)."""

        def find() -> ZtunnelPath:
            with IPRoute() as ipr:
                try:
                    found = ipr.route("get", dst=ztunnel_ip)
                except NetlinkError as exc:
                    raise DataplaneError(
                        "ZtunnelUnreachable", f"no route to ztunnel {ztunnel_ip}: {exc}"
                    ) from exc
                route = found[0]
                oif, src = route.get_attr("RTA_OIF"), route.get_attr("RTA_PREFSRC")
                link = ipr.get_links(oif)[0]
                name = str(link.get_attr("IFLA_IFNAME"))
                kind = _link_kind(link)
            if kind != "veth":
                raise DataplaneError(
                    "ZtunnelNotOnVeth",
                    f"the route to ztunnel {ztunnel_ip} goes through {name} ({kind or 'no kind'}),"
                    " not a veth of its own: node mode needs a point-to-point pod network "
                    "(ptp, kindnet), as Istio's did",
                )
            if not src:
                raise DataplaneError(
                    "NoHostAddress", f"the node has no source address toward {ztunnel_ip}"
                )
            return ZtunnelPath(veth=name, host_ip=str(src))

        return in_netns(self.host_netns, find)

    # -- the node's side -----------------------------------------------------------------------

    @_said_as_dataplane_errors
    def ensure_rules(self, host: NodeHost) -> Changes:
        """The address set, the ztunnel-* chains and their jumps."""
        self.ipset.create()
        ruleset = host_ruleset(host)
        self.chains.learn(4, ruleset, prepare=self._prepare, rejected="HostRuleRejected")

        def apply(run: Exec) -> Changes:
            return self.chains.ensure(
                run,
                4,
                ruleset,
                prepare=self._prepare,
                rejected="HostRuleRejected",
                kind="host-rules",
            )

        return self.runner.within(self.host_netns, apply)

    def _prepare(self, scratch: Path) -> None:
        self.ipset.at(scratch).create()

    @_said_as_dataplane_errors
    def ensure_tunnels(self, host: NodeHost, pods: Mapping[str, str]) -> Changes:
        """Both tunnels, tables 100-102 with exactly the node's routes and one per enrolled
        pod (`pods`: IPv4 address -> pod UID), rules 100-103, and the sysctls."""

        def ensure() -> Changes:
            with IPRoute() as ipr:
                done = self._tunnels(ipr, host_tunnels(host, self.tunnel_kind))
                routes = host_routes(host) + [pod_route(ip, host) for ip in sorted(pods)]
                done += _sync_routes(ipr, routes, TABLES, _host_owned)
                done += _sync_rules(ipr, host_rules())
            return done + _sysctls(host_sysctls(host))

        return in_netns(self.host_netns, ensure)

    @_said_as_dataplane_errors
    def sync_set(self, pods: Mapping[str, str]) -> Changes:
        """The address set holds exactly the enrolled pods' addresses."""
        held = self.ipset.entries()
        missing = sorted(set(pods) - set(held))
        extra = sorted(set(held) - set(pods))
        for ip in missing:
            self.ipset.add([ip], pods[ip])
        self.ipset.delete(extra)
        return Changes(
            tuple(Change("routing", f"{ip} added to ipset {IPSET}") for ip in missing)
            + tuple(Change("routing", f"{ip} removed from ipset {IPSET}") for ip in extra)
        )

    # A pod's part runs for every pod of a burst, one at a time: no listing, no pyroute2
    # IPRoute session (2 ms to set up); an exclusive add says whether it was there.
    @_said_as_dataplane_errors
    def add_pod(self, ip: str, uid: str, host: NodeHost) -> Changes:
        """The pod's address in the set and its route through the inbound tunnel."""
        route = pod_route(ip, host)

        def add() -> Changes:
            done: list[Change] = []
            with IPSet() as sets:
                try:
                    sets.add(IPSET, ip, etype="ip", comment=uid, exclusive=True)
                    done.append(Change("routing", f"{ip} added to ipset {IPSET}"))
                except NetlinkError as exc:
                    if exc.code != IPSET_ERR_EXIST:
                        raise
            try:
                oif = socket.if_nametoindex(INBOUND_TUNNEL)
            except OSError as exc:
                raise DataplaneError(
                    "LinkMissing", f"{INBOUND_TUNNEL} does not exist", retryable=True
                ) from exc
            with rtnetlink() as sock:
                if created(sock, _pod_route_message(route, oif)):
                    done.append(Change("routing", f"{_say(route)}: added"))
            return Changes(tuple(done))

        return in_netns(self.host_netns, add)

    @_said_as_dataplane_errors
    def remove_pod(self, ip: str) -> bool:
        """Out of the set and table 100; True if either held it."""

        def remove() -> bool:
            present = True
            with IPSet() as sets:
                try:
                    sets.delete(IPSET, ip, etype="ip")
                except NetlinkError as exc:
                    if exc.code != IPSET_ERR_EXIST:  # the set's "not there" too
                        raise
                    present = False
            with rtnetlink() as sock:
                return deleted(sock, _pod_route_removal(ip)) or present

        return in_netns(self.host_netns, remove)

    @_said_as_dataplane_errors
    def uninstall(self) -> bool:
        """Istio's order (cleanupNode): the chains, tables 100-102, rules 100-103, the
        tunnels, the address set (a set a rule still uses cannot be destroyed)."""

        def rules(run: Exec) -> bool:
            return self.chains.remove(run, 4, failed="HostRuleRemovalFailed")

        removed = self.runner.within(self.host_netns, rules)

        def kernel() -> bool:
            with IPRoute() as ipr:
                found = _sync_routes(ipr, [], TABLES, _host_owned)
                found += _sync_rules(ipr, [], ours=host_rules())
                for name in (INBOUND_TUNNEL, OUTBOUND_TUNNEL):
                    index = ipr.link_lookup(ifname=name)
                    if index:
                        ipr.link("set", index=index[0], state="down")
                        ipr.link("del", index=index[0])
                        found += Changes((Change("routing", f"{name} removed"),))
            return bool(found)

        removed = in_netns(self.host_netns, kernel) or removed
        return self.ipset.destroy() or removed

    # -- the ztunnel pod's side ----------------------------------------------------------------

    @_said_as_dataplane_errors
    def ensure_ztunnel(self, netns: Path, ztunnel_ip: str, host_ip: str, port: int) -> Changes:
        """The tunnels' other ends, rules 20000/20003, tables 100-102 and TPROXY, in the
        ztunnel pod's netns; its interface is the one holding its address."""

        def kernel() -> tuple[Changes, str]:
            with IPRoute() as ipr:
                interface = _interface_with(ipr, ztunnel_ip)
                done = self._tunnels(ipr, ztunnel_tunnels(host_ip, self.tunnel_kind, port))
                # ztunnel's pod is all Istio's: its tables hold nothing but these.
                done += _sync_routes(ipr, ztunnel_routes(host_ip, interface), TABLES)
                done += _sync_rules(ipr, ztunnel_rules())
            return done + _sysctls(ztunnel_sysctls(interface)), interface

        done, interface = in_netns(netns, kernel)
        ruleset = ztunnel_ruleset(ztunnel_ip, interface)

        def apply(run: Exec) -> Changes:
            return self.ztunnel_chains.ensure(
                run, 4, ruleset, rejected="ZtunnelRuleRejected", kind="ztunnel-rules"
            )

        return done + self.runner.within(netns, apply)

    # -- tunnels -------------------------------------------------------------------------------

    def _tunnels(self, ipr: IPRoute, tunnels: list[Tunnel]) -> Changes:
        done: list[Change] = []
        for tunnel in tunnels:
            done += self._tunnel(ipr, tunnel)
        return Changes(tuple(done))

    def _tunnel(self, ipr: IPRoute, tunnel: Tunnel) -> list[Change]:
        done: list[Change] = []
        index = ipr.link_lookup(ifname=tunnel.name)
        if index and _tunnel_of(ipr.get_links(index[0])[0]) != _tunnel_key(tunnel):
            ipr.link("del", index=index[0])
            done.append(Change("tunnels", f"{tunnel.name} was not as planned: recreated"))
            index = []
        if not index:
            kind = self._create(ipr, tunnel)
            index = ipr.link_lookup(ifname=tunnel.name)
            if not done:
                done.append(Change("tunnels", f"{tunnel.name} ({kind}) created"))
        address, prefix = tunnel.address.split("/")
        held = [
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=index[0], family=2)
        ]
        if held != [(address, int(prefix))]:
            for old, length in held:
                ipr.addr("del", index=index[0], address=old, prefixlen=length)
            ipr.addr("add", index=index[0], address=address, prefixlen=int(prefix))
            done.append(Change("tunnels", f"{tunnel.name} address {tunnel.address} set"))
        link = ipr.get_links(index[0])[0]
        if not link["flags"] & 1:  # IFF_UP
            ipr.link("set", index=index[0], state="up")
            done.append(Change("tunnels", f"{tunnel.name} set up"))
        return done

    def _create(self, ipr: IPRoute, tunnel: Tunnel) -> TunnelKind:
        """Create the tunnel as the first kind the kernel has (remembered)."""
        while True:
            kind = self.tunnel_kind
            try:
                ipr.link("add", ifname=tunnel.name, **_tunnel_args(tunnel, kind))
                return kind
            except NetlinkError as exc:
                with self._lock:
                    if exc.code == errno.EOPNOTSUPP and len(self._kinds) > 1:
                        self._kinds = self._kinds[1:]
                        continue
                raise DataplaneError(
                    "TunnelFailed", f"{tunnel.name} ({kind}): {exc.args[-1]}", retryable=True
                ) from exc


# -- links ---------------------------------------------------------------------------------------


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _tunnel_args(tunnel: Tunnel, kind: TunnelKind) -> dict[str, Any]:
    if kind == "geneve":
        return {
            "kind": "geneve",
            "geneve_id": tunnel.vni,
            "geneve_remote": tunnel.remote,
            "geneve_port": tunnel.port,
        }
    return {
        "kind": "vxlan",
        "vxlan_id": tunnel.vni,
        "vxlan_group": tunnel.remote,
        "vxlan_port": tunnel.port,
    }


def _tunnel_key(tunnel: Tunnel) -> tuple[int, str, int]:
    return (tunnel.vni, tunnel.remote, tunnel.port)


def _tunnel_of(link: Any) -> tuple[int, str, int] | None:
    info = link.get_attr("IFLA_LINKINFO")
    kind = _link_kind(link)
    if info is None or kind not in TUNNEL_KINDS:
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    prefix = "IFLA_GENEVE_" if kind == "geneve" else "IFLA_VXLAN_"
    remote = data.get_attr(prefix + ("REMOTE" if kind == "geneve" else "GROUP"))
    return (data.get_attr(prefix + "ID"), str(remote), data.get_attr(prefix + "PORT"))


def _indexes(ipr: IPRoute) -> dict[str, int]:
    return {str(link.get_attr("IFLA_IFNAME")): link["index"] for link in ipr.get_links()}


def _interface_with(ipr: IPRoute, ip: str) -> str:
    for address in ipr.get_addr(family=2):
        if address.get_attr("IFA_ADDRESS") == ip:
            return str(ipr.get_links(address["index"])[0].get_attr("IFLA_IFNAME"))
    raise DataplaneError("ZtunnelAddressNotFound", f"no interface holds ztunnel's address {ip}")


# -- routes ---------------------------------------------------------------------------------------

RouteKey = tuple[int, str, str | None, int | None, str | None, int, int, bool]


def _routes(ipr: IPRoute, table: int) -> list[Any]:
    return [r for r in ipr.get_routes(family=2, table=table) if _table(r) == table]


def _table(route: Any) -> int:
    return int(route.get_attr("RTA_TABLE") or route["table"])


def _dst(route: Any) -> str:
    return f"{route.get_attr('RTA_DST') or '0.0.0.0'}/{route['dst_len']}"  # noqa: S104


def _key_of(route: Any) -> RouteKey:
    return (
        _table(route),
        _dst(route),
        route.get_attr("RTA_GATEWAY"),
        route.get_attr("RTA_OIF"),
        route.get_attr("RTA_PREFSRC"),
        route["scope"],
        route["type"],
        bool(route["flags"] & RTNH_F_ONLINK),
    )


def _key(route: Route, indexes: Mapping[str, int]) -> RouteKey:
    network = ipaddress.ip_network(route.dst)
    return (
        route.table,
        str(network),
        route.via,
        indexes.get(route.device),
        route.src,
        SCOPES[route.scope],
        TYPES[route.kind],
        route.onlink,
    )


def _removal(route: Any) -> dict[str, Any]:
    """Arguments that delete exactly this dumped route."""
    args: dict[str, Any] = {
        "family": 2,
        "table": _table(route),
        "dst_len": route["dst_len"],
        "type": route["type"],
        "scope": route["scope"],
    }
    if route.get_attr("RTA_DST"):
        args["dst"] = route.get_attr("RTA_DST")
    if route.get_attr("RTA_OIF"):
        args["oif"] = route.get_attr("RTA_OIF")
    if route.get_attr("RTA_GATEWAY"):
        args["gateway"] = route.get_attr("RTA_GATEWAY")
    return args


def _add_route(ipr: IPRoute, route: Route, indexes: Mapping[str, int]) -> bool:
    """Add the route; False if the kernel already has it (EEXIST)."""
    oif = indexes.get(route.device)
    if oif is None:
        raise DataplaneError("LinkMissing", f"{route.device} does not exist", retryable=True)
    network = ipaddress.ip_network(route.dst)
    args: dict[str, Any] = {
        "family": 2,  # AF_INET: a default route says no family of its own
        "table": route.table,
        "dst_len": network.prefixlen,
        "oif": oif,
        "proto": RTPROT_BOOT,
        "scope": SCOPES[route.scope],
        "type": TYPES[route.kind],
    }
    if network.prefixlen:
        args["dst"] = str(network.network_address)
    if route.via:
        args["gateway"] = route.via
    if route.src:
        args["prefsrc"] = route.src
    if route.onlink:
        args["flags"] = RTNH_F_ONLINK
    try:
        ipr.route("add", **args)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise DataplaneError(
            "RouteRejected", f"{_say(route)}: {exc.args[-1]}", retryable=True
        ) from exc
    return True


def _host_owned(route: Any, kinds: Mapping[int, str | None], names: Mapping[int, str]) -> bool:
    """On the node, a route in tables 100-102 is ours when it goes through our tunnels or
    a veth (ztunnel's): Istio flushed the tables whole; another agent's routes there stay."""
    oif = route.get_attr("RTA_OIF")
    return names.get(oif) in (INBOUND_TUNNEL, OUTBOUND_TUNNEL) or kinds.get(oif) == "veth"


RouteOwned = Callable[[Any, Mapping[int, "str | None"], Mapping[int, str]], bool]


def _pod_route_message(route: Route, oif: int) -> bytes:
    message = rtmsg()
    message["header"]["type"] = RTM_NEWROUTE
    message["family"] = socket.AF_INET
    message["dst_len"] = 32
    message["table"] = route.table
    message["proto"] = RTPROT_BOOT
    message["scope"] = SCOPES["universe"]
    message["type"] = TYPES["unicast"]
    message["attrs"] = [
        ("RTA_TABLE", route.table),
        ("RTA_DST", route.dst.split("/")[0]),
        ("RTA_GATEWAY", route.via),
        ("RTA_OIF", oif),
        ("RTA_PREFSRC", route.src),
    ]
    return encoded(message)


def _pod_route_removal(ip: str) -> bytes:
    """Whatever route table 100 holds to exactly this address (ours: the table is)."""
    message = rtmsg()
    message["header"]["type"] = RTM_DELROUTE
    message["family"] = socket.AF_INET
    message["dst_len"] = 32
    message["table"] = INBOUND_TABLE
    message["attrs"] = [("RTA_TABLE", INBOUND_TABLE), ("RTA_DST", ip)]
    return encoded(message)


def _sync_routes(
    ipr: IPRoute, routes: Iterable[Route], tables: Iterable[int], owned: RouteOwned | None = None
) -> Changes:
    """Make `tables` hold exactly `routes`, of the routes `owned` says are ours (all, when
    None)."""
    indexes = _indexes(ipr)
    links = ipr.get_links()
    kinds = {link["index"]: _link_kind(link) for link in links}
    names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in links}
    wanted = {_key(route, indexes): route for route in routes}
    done: list[Change] = []
    for table in tables:
        for route in _routes(ipr, table):
            if owned is not None and not owned(route, kinds, names):
                continue
            if _key_of(route) not in wanted:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", **_removal(route))
                done.append(
                    Change("routing", f"stray route to {_dst(route)} in table {table} removed")
                )
    for route in wanted.values():
        if _add_route(ipr, route, indexes):
            done.append(Change("routing", f"{_say(route)}: added"))
    return Changes(tuple(done))


def _say(route: Route) -> str:
    via = f" via {route.via}" if route.via else ""
    return f"table {route.table} {route.dst}{via} dev {route.device}"


# -- rules ----------------------------------------------------------------------------------------

RuleKey = tuple[int, int | None, int | None, int | None, int | None]


def _rule_key_of(rule: Any) -> RuleKey:
    table = rule.get_attr("FRA_TABLE") or rule["table"]
    goto = rule.get_attr("FRA_GOTO") if rule["action"] == FR_ACT_GOTO else None
    return (
        rule.get_attr("FRA_PRIORITY") or 0,
        None if goto is not None else table,
        goto,
        rule.get_attr("FRA_FWMARK"),
        rule.get_attr("FRA_FWMASK") if rule.get_attr("FRA_FWMARK") is not None else None,
    )


def _rule_key(rule: Rule) -> RuleKey:
    return (rule.priority, rule.table, rule.goto, rule.fwmark, rule.fwmask)


def _sync_rules(ipr: IPRoute, rules: Iterable[Rule], ours: Iterable[Rule] | None = None) -> Changes:
    """Make the rules `ours` (by default `rules`) exactly `rules`: each once, a copy
    removed; a rule that is not exactly one of ours is never touched."""
    wanted = {_rule_key(rule): rule for rule in rules}
    mine = {_rule_key(rule) for rule in (rules if ours is None else ours)}
    done: list[Change] = []
    present = set()
    for rule in ipr.get_rules(family=2):
        key = _rule_key_of(rule)
        if key not in mine:
            continue
        if key in wanted and key not in present:
            present.add(key)
            continue
        with contextlib.suppress(NetlinkError):
            ipr.rule("del", priority=key[0], **_rule_args(key))
        done.append(Change("routing", f"stray ip rule at priority {key[0]} removed"))
    for key, rule in wanted.items():
        if key not in present:
            ipr.rule("add", priority=rule.priority, **_rule_args(key))
            done.append(Change("routing", f"ip rule priority {rule.priority} added"))
    return Changes(tuple(done))


def _rule_args(key: RuleKey) -> dict[str, Any]:
    _, table, goto, fwmark, fwmask = key
    args: dict[str, Any] = {}
    if goto is not None:
        args.update(action="FR_ACT_GOTO", goto=goto)
    elif table is not None:
        args["table"] = table
    if fwmark is not None:
        args.update(fwmark=fwmark, fwmask=fwmask if fwmask is not None else 0xFFFFFFFF)
    return args


# -- sysctls --------------------------------------------------------------------------------------

CONF = Path("/proc/sys/net/ipv4/conf")


def _sysctls(settings: Iterable[tuple[str, str]], conf: Path = CONF) -> Changes:
    """Write each setting that differs (read in this thread's netns: /proc/sys/net is the
    reading task's namespace's)."""
    done: list[Change] = []
    for name, value in settings:
        path = conf / name
        try:
            if path.read_text().strip() == value:
                continue
            path.write_text(value)
        except OSError as exc:
            raise DataplaneError("SysctlFailed", f"{path}: {exc.strerror}", retryable=True) from exc
        done.append(Change("tunnels", f"net.ipv4.conf.{name.replace('/', '.')}={value}"))
    return Changes(tuple(done))
