"""A pod's policy routing over netlink: the connmark return path of reference section 2.1.

`ip rule fwmark 0x111/0xfff pref 32764 lookup 100` and a local default route
in table 100 send replies to connections ztunnel accepted back into the pod's
own stack. Every call runs on a thread inside the pod's namespace (`netns`
None: the caller's own); no process is started.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .constants import CONN_MARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY, Family
from .interfaces import Change, Changes
from .runner import in_netns

RT_SCOPE_HOST = 254  # local routes are host-scoped
RULE = f"fwmark 0x{CONN_MARK:x}/0x{MARK_MASK:x} pref {RULE_PRIORITY} lookup {ROUTE_TABLE}"


def _af(family: Family) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _rule_spec(family: Family) -> dict[str, Any]:
    """ip rule fwmark 0x111/0xfff pref 32764 lookup 100, as added and as deleted."""
    return {
        "family": _af(family),
        "fwmark": CONN_MARK,
        "fwmask": MARK_MASK,
        "priority": RULE_PRIORITY,
        "table": ROUTE_TABLE,
    }


def _route_spec(family: Family) -> dict[str, Any]:
    """The local default route in table 100, as added and as deleted."""
    return {
        "family": _af(family),
        "dst": "0.0.0.0/0" if family == 4 else "::/0",
        "type": "local",
        "scope": RT_SCOPE_HOST,
        "table": ROUTE_TABLE,
    }


def _ipv6_on_loopback() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def _our_rules(ipr: IPRoute, family: Family) -> list[Any]:
    return [
        rule
        for rule in ipr.get_rules(family=_af(family))
        if rule.get("priority") == RULE_PRIORITY and rule.get("table") == ROUTE_TABLE
    ]


def _applicable(families: Sequence[Family]) -> list[Family]:
    """IPv6 routing only where the namespace has IPv6 (its loopback is up for it)."""
    return [f for f in families if f == 4 or _ipv6_on_loopback()]


class PolicyRouting:
    def ensure(self, netns: Path | None, families: Sequence[Family]) -> Changes:
        def ensure() -> Changes:
            done: list[Change] = []
            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                for family in _applicable(families):
                    if not _our_rules(ipr, family):
                        ipr.rule("add", **_rule_spec(family))
                        done.append(Change("routing", f"IPv{family}: ip rule {RULE} added"))
                    if not ipr.route("dump", family=_af(family), table=ROUTE_TABLE):
                        ipr.route("replace", oif=lo, **_route_spec(family))
                        done.append(Change("routing", f"IPv{family}: table 100 route added"))
            return Changes(tuple(done))

        return in_netns(netns, ensure)

    def present(self, netns: Path | None, families: Sequence[Family]) -> bool:
        def present() -> bool:
            with IPRoute() as ipr:
                return all(
                    len(_our_rules(ipr, family)) == 1
                    and bool(ipr.route("dump", family=_af(family), table=ROUTE_TABLE))
                    for family in _applicable(families)
                )

        return in_netns(netns, present)

    def remove(self, netns: Path | None, families: Sequence[Family]) -> bool:
        def remove() -> bool:
            removed = False
            with IPRoute() as ipr:
                for family in families:
                    for _rule in _our_rules(ipr, family):
                        with contextlib.suppress(NetlinkError):
                            ipr.rule("del", **_rule_spec(family))
                            removed = True
                    for _route in ipr.route("dump", family=_af(family), table=ROUTE_TABLE):
                        with contextlib.suppress(NetlinkError):
                            ipr.route("del", **_route_spec(family))
                            removed = True
            return removed

        return in_netns(netns, remove)
