"""A sidecar pod's capture with iptables, in its namespace: the ruleset per family (Istio's
own text, sidecar_rules.py) and, for TPROXY, `fwmark 1337 lookup 133` with its local
route. Level-based like the in-pod rules: compared with what the kernel made of the same
ruleset in a scratch namespace, replaced in one transaction per table when it differs.

Ours in a sidecar pod's namespace: the ISTIO_* chains and every rule of the built-in
PREROUTING and OUTPUT chains of nat, mangle and raw (the capture puts rules there that
name no chain of ours; in a pod's namespace Istio's plugin is their one writer). The
filter and security tables are never touched; the other IP family only when a capture
of ours is there (say, the pod's capture was dual stack before).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from ambient_cni.api.models import Backend, SidecarCapture
from ambient_cni.netns import netns_path

from .constants import Family
from .errors import DataplaneError, UnsafeInput
from .interfaces import NO_CHANGES, Change, Changes, Exec, Runner
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_state import Ownership
from .routing import MarkRoute, PolicyRouting, ipv6_on_loopback
from .rtnetlink import address_message, created, rtnetlink
from .sidecar_rules import TPROXY_MARK, TPROXY_RULE_PRIORITY, TPROXY_TABLE, sidecar_ruleset

SIDECAR_CHAINS = frozenset(
    {
        "ISTIO_INBOUND",
        "ISTIO_REDIRECT",
        "ISTIO_IN_REDIRECT",
        "ISTIO_OUTPUT",
        "ISTIO_OUTPUT_DNS",
        "ISTIO_DIVERT",
        "ISTIO_TPROXY",
        "ISTIO_DROP",
    }
)
SIDECAR_OWNED = Ownership(
    SIDECAR_CHAINS,
    builtin_rules=frozenset({"PREROUTING", "OUTPUT"}),
    builtin_tables=frozenset({"nat", "mangle", "raw"}),
)
PASSTHROUGH_SOURCE_V6 = "::6"
# `ip rule add fwmark 1337 lookup 133`: the kernel keeps the mark's mask as all ones.
TPROXY_ROUTE = MarkRoute(TPROXY_MARK, 0xFFFFFFFF, TPROXY_RULE_PRIORITY, TPROXY_TABLE)


def _render(capture: SidecarCapture, family: Family) -> str:
    try:
        return sidecar_ruleset(capture, family)
    except UnsafeInput as exc:
        raise DataplaneError("UnsafeInput", str(exc)) from exc


class IptablesSidecarDataplane:
    def __init__(self, flavour: Flavour, runner: Runner):
        self.flavour = flavour
        self.runner = runner
        self.chains = IptablesChains(flavour, runner, SIDECAR_OWNED)
        self.routing = PolicyRouting(TPROXY_ROUTE)

    @property
    def backend(self) -> Backend:
        return self.flavour.backend

    def ensure(self, netns: Path, capture: SidecarCapture, families: Sequence[Family]) -> Changes:
        rulesets = [(family, _render(capture, family)) for family in families]
        for family, ruleset in rulesets:
            # In a scratch namespace: a ruleset the kernel refuses fails before the pod's.
            self.chains.learn(family, ruleset)
        both: tuple[Family, ...] = (4, 6)
        others = [f for f in both if f not in families]
        tproxy = capture.interception_mode == "TPROXY"

        def apply(run: Exec) -> Changes:
            changes = NO_CHANGES
            for family, ruleset in rulesets:
                changes += self.chains.ensure(run, family, ruleset)
            for family in others:  # say, IPv6 rules of an earlier capture
                held = self.chains.read(run, family)
                ours = any(line.startswith(":ISTIO_") for lines in held.values() for line in lines)
                if ours and self.chains.remove(run, family):
                    changes += Changes((Change("rules", f"IPv{family}: rules removed"),))
            if 6 in families and ipv6_on_loopback():
                # Istio's plugin adds the IPv6 passthrough source to lo ("exists" is fine).
                with rtnetlink() as sock:
                    lo = socket.if_nametoindex("lo")
                    if created(sock, address_message(lo, PASSTHROUGH_SOURCE_V6, 128)):
                        changes += Changes((Change("routing", "::6/128 added to lo"),))
            if tproxy:
                changes += self.routing.ensure(None, families)
            elif self.routing.remove(None, (4, 6)):
                changes += Changes((Change("routing", "TPROXY routing removed"),))
            return changes

        return self.runner.within(netns_path(netns), apply)
