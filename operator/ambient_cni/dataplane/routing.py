"""A pod's policy routing over netlink: a fwmark rule and a local default route.

In-pod ambient (reference section 2.1): `ip rule fwmark 0x111/0xfff pref 32764
lookup 100` and a local default route in table 100 send replies to connections
ztunnel accepted back into the pod's own stack. A TPROXY sidecar (sidecar
sheet section 6b): `fwmark 1337 lookup 133` and a local route in table 133
deliver what TPROXY marked to the proxy. Every call runs on a thread inside
the pod's namespace (`netns` None: the caller's own); no process is started.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_DELRULE, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .constants import CONN_MARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY, Family
from .interfaces import Change, Changes
from .rtnetlink import created, deleted, encoded, rtnetlink
from .runner import in_netns

RT_SCOPE_HOST = 254  # local routes are host-scoped
RTN_LOCAL = 2
RTPROT_BOOT = 3
FR_ACT_TO_TBL = 1


@dataclass(frozen=True)
class MarkRoute:
    """`ip rule fwmark MARK/MASK pref PRIORITY lookup TABLE` and a local default route there."""

    mark: int
    mask: int
    priority: int
    table: int

    def __str__(self) -> str:
        return f"fwmark 0x{self.mark:x}/0x{self.mask:x} pref {self.priority} lookup {self.table}"


AMBIENT_RETURN = MarkRoute(CONN_MARK, MARK_MASK, RULE_PRIORITY, ROUTE_TABLE)


# The messages never change but for their sequence: encoded once (pyroute2's encoding of a
# message costs more than the kernel's work on it).
@functools.cache
def _rule_message(route: MarkRoute, family: Family, kind: int) -> bytes:
    message = fibmsg()
    message["header"]["type"] = kind
    message["family"] = _af(family)
    message["action"] = FR_ACT_TO_TBL
    message["table"] = route.table
    message["attrs"] = [
        ("FRA_PRIORITY", route.priority),
        ("FRA_FWMARK", route.mark),
        ("FRA_FWMASK", route.mask),
        ("FRA_TABLE", route.table),
    ]
    return encoded(message)


@functools.cache
def _route_message(route: MarkRoute, family: Family, lo: int, kind: int) -> bytes:
    message = rtmsg()
    message["header"]["type"] = kind
    message["family"] = _af(family)
    message["dst_len"] = 0  # the default route: 0.0.0.0/0 or ::/0
    message["table"] = route.table
    # Made as boot routes; deleted whatever made them (0 matches any protocol).
    message["proto"] = RTPROT_BOOT if kind == RTM_NEWROUTE else 0
    message["scope"] = RT_SCOPE_HOST
    message["type"] = RTN_LOCAL
    message["attrs"] = [("RTA_TABLE", route.table), ("RTA_OIF", lo)]
    return encoded(message)


def _af(family: Family) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def ipv6_on_loopback() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def _our_rules(ipr: IPRoute, route: MarkRoute, family: Family) -> list[Any]:
    return [
        rule
        for rule in ipr.get_rules(family=_af(family))
        if rule.get("priority") == route.priority and rule.get("table") == route.table
    ]


def _applicable(families: Sequence[Family]) -> list[Family]:
    """IPv6 routing only where the namespace has IPv6 (its loopback is up for it)."""
    return [f for f in families if f == 4 or ipv6_on_loopback()]


class PolicyRouting:
    def __init__(self, route: MarkRoute = AMBIENT_RETURN):
        self.route = route

    def ensure(self, netns: Path | None, families: Sequence[Family]) -> Changes:
        """Create the rule and the route "exclusively": the kernel refuses a copy (EEXIST), so
        a request both checks and adds, and nothing is ever added twice.

        Sent on one plain rtnetlink socket (rtnetlink.py says why)."""

        route = self.route

        def ensure() -> Changes:
            done: list[Change] = []
            with rtnetlink() as sock:
                lo = socket.if_nametoindex("lo")
                for family in _applicable(families):
                    if created(sock, _rule_message(route, family, RTM_NEWRULE)):
                        done.append(Change("routing", f"IPv{family}: ip rule {route} added"))
                    if created(sock, _route_message(route, family, lo, RTM_NEWROUTE)):
                        done.append(
                            Change("routing", f"IPv{family}: table {route.table} route added")
                        )
            return Changes(tuple(done))

        return in_netns(netns, ensure)

    def present(self, netns: Path | None, families: Sequence[Family]) -> bool:
        route = self.route

        def present() -> bool:
            with IPRoute() as ipr:
                return all(
                    len(_our_rules(ipr, route, family)) == 1
                    and bool(ipr.route("dump", family=_af(family), table=route.table))
                    for family in _applicable(families)
                )

        return in_netns(netns, present)

    def remove(self, netns: Path | None, families: Sequence[Family]) -> bool:
        route = self.route

        def remove() -> bool:
            removed = False
            with rtnetlink() as sock:
                lo = socket.if_nametoindex("lo")
                for family in families:
                    # Every copy of the rule (an older agent may have left two).
                    while deleted(sock, _rule_message(route, family, RTM_DELRULE)):
                        removed = True
                    removed |= deleted(sock, _route_message(route, family, lo, RTM_DELROUTE))
            return removed

        return in_netns(netns, remove)
