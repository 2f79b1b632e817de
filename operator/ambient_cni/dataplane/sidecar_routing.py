"""A sidecar pod's routing, whatever applies its rules: for TPROXY, `fwmark 1337 lookup 133`
and a local default route in table 133; for IPv6, Istio's passthrough source `::6/128` on
lo. Runs in the calling thread's namespace (the appliers call it on their netns thread).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from .constants import Family
from .interfaces import NO_CHANGES, Change, Changes
from .routing import MarkRoute, PolicyRouting, ipv6_on_loopback
from .rtnetlink import address_message, created, rtnetlink
from .sidecar_rules import TPROXY_MARK, TPROXY_RULE_PRIORITY, TPROXY_TABLE

PASSTHROUGH_SOURCE_V6 = "::6"
# `ip rule add fwmark 1337 lookup 133`: the kernel keeps the mark's mask as all ones.
TPROXY_ROUTE = MarkRoute(TPROXY_MARK, 0xFFFFFFFF, TPROXY_RULE_PRIORITY, TPROXY_TABLE)
TPROXY_ROUTING = PolicyRouting(TPROXY_ROUTE)


def ensure_sidecar_routing(families: Sequence[Family], tproxy: bool) -> Changes:
    changes = NO_CHANGES
    if 6 in families and ipv6_on_loopback():
        # Istio's plugin adds the IPv6 passthrough source to lo ("exists" is fine).
        with rtnetlink() as sock:
            lo = socket.if_nametoindex("lo")
            if created(sock, address_message(lo, PASSTHROUGH_SOURCE_V6, 128)):
                changes += Changes((Change("routing", "::6/128 added to lo"),))
    if tproxy:
        changes += TPROXY_ROUTING.ensure(None, families)
    elif TPROXY_ROUTING.remove(None, (4, 6)):
        changes += Changes((Change("routing", "TPROXY routing removed"),))
    return changes
