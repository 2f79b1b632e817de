"""The host side of in-pod mode: probe ipsets (netlink) and the probe SNAT rule (iptables).

Everything runs in the configured host network namespace (the agent's own
by default; a simulated node's in the sandbox) on a dedicated thread.
Entries are enrolled pod IPs with the pod UID as comment: adding replaces,
removing deletes only an entry whose comment is that UID.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from pyroute2.ipset import IPSet
from pyroute2.netlink.exceptions import NetlinkError

from ambient_cni.netns import run_in_netns, run_in_new_netns

from .constants import PROBE_IPSET, Family
from .iptables_apply import ApplyError, Flavour, first_error, run_iptables
from .iptables_rules import host_ruleset
from .iptables_state import Tables, our_rules, removal_input, replace_input

T = TypeVar("T")
FAMILIES: tuple[Family, ...] = (4, 6)


def family_of(ip: str) -> Family:
    return 4 if ipaddress.ip_address(ip).version == 4 else 6


def _af(family: Family) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _create_sets(ips: IPSet) -> None:
    for family in FAMILIES:
        ips.create(
            PROBE_IPSET[family], stype="hash:ip", family=_af(family), comment=True, exclusive=False
        )


class HostDataplane:
    def __init__(self, flavour: Flavour, host_netns: Path | None = None):
        self.flavour = flavour
        self.host_netns = host_netns
        self._lock_file = (
            "/run/ambient-cni-host.xtables.lock" if host_netns is None else str(host_netns)
        )
        self._canonical: dict[Family, Tables] = {}

    def _inside(self, fn: Callable[[], T]) -> T:
        return fn() if self.host_netns is None else run_in_netns(self.host_netns, fn)

    # -- rules and sets ---------------------------------------------------------------------

    def _canonical_for(self, family: Family) -> Tables:
        if family not in self._canonical:

            def learn() -> Tables:
                with IPSet() as ips:
                    _create_sets(ips)
                restored = run_iptables(
                    [self.flavour.tool(family, "restore"), "--noflush"],
                    host_ruleset(family),
                    self._lock_file + ".scratch",
                )
                if restored.returncode != 0:
                    raise ApplyError("RuleRejected", first_error(restored.stderr))
                saved = run_iptables(
                    [self.flavour.tool(family, "save")], None, self._lock_file + ".scratch"
                )
                return our_rules(saved.stdout)

            self._canonical[family] = run_in_new_netns(learn)
        return self._canonical[family]

    def ensure(self) -> bool:
        """Create the ipsets and the probe SNAT rules if missing or changed; True if changed."""
        wanted = {family: self._canonical_for(family) for family in FAMILIES}

        def apply() -> bool:
            changed = False
            with IPSet() as ips:
                _create_sets(ips)
            for family in FAMILIES:
                saved = run_iptables(
                    [self.flavour.tool(family, "save")], None, self._lock_file
                ).stdout
                if our_rules(saved) == wanted[family]:
                    continue
                result = run_iptables(
                    [self.flavour.tool(family, "restore"), "--noflush"],
                    replace_input(saved, host_ruleset(family)),
                    self._lock_file,
                )
                if result.returncode != 0:
                    raise ApplyError("HostRuleRejected", first_error(result.stderr))
                changed = True
            return changed

        return self._inside(apply)

    def in_sync(self) -> bool:
        def check() -> bool:
            return all(
                our_rules(
                    run_iptables([self.flavour.tool(f, "save")], None, self._lock_file).stdout
                )
                == self._canonical_for(f)
                for f in FAMILIES
            )

        return self._inside(check)

    def uninstall(self) -> bool:
        """Remove the probe rules, then the ipsets (a set in use cannot be destroyed)."""

        def remove() -> bool:
            removed = False
            for family in FAMILIES:
                saved = run_iptables(
                    [self.flavour.tool(family, "save")], None, self._lock_file
                ).stdout
                script = removal_input(saved)
                if script:
                    result = run_iptables(
                        [self.flavour.tool(family, "restore"), "--noflush"], script, self._lock_file
                    )
                    if result.returncode != 0:
                        raise ApplyError(
                            "HostRuleRemovalFailed", first_error(result.stderr), retryable=True
                        )
                    removed = True
            with IPSet() as ips:
                for family in FAMILIES:
                    with contextlib.suppress(NetlinkError):
                        ips.destroy(PROBE_IPSET[family])
                        removed = True
            return removed

        return self._inside(remove)

    # -- entries ------------------------------------------------------------------------------

    def entries(self) -> dict[str, str]:
        """Every probe-set entry: IP -> pod UID (its comment)."""

        def read() -> dict[str, str]:
            found: dict[str, str] = {}
            with IPSet() as ips:
                for family in FAMILIES:
                    try:
                        messages = ips.list(PROBE_IPSET[family])
                    except NetlinkError:
                        continue
                    for message in messages:
                        adt = message.get_attr("IPSET_ATTR_ADT")
                        for data in adt.get_attrs("IPSET_ATTR_DATA") if adt else []:
                            ip_from = data.get_attr("IPSET_ATTR_IP_FROM")
                            ip = ip_from.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip_from.get_attr(
                                "IPSET_ATTR_IPADDR_IPV6"
                            )
                            found[str(ip)] = str(data.get_attr("IPSET_ATTR_COMMENT") or "")
            return found

        return self._inside(read)

    def add(self, ips_of_pod: list[str], uid: str) -> None:
        def add() -> None:
            with IPSet() as ips:
                for ip in ips_of_pod:
                    family = family_of(ip)
                    ips.add(
                        PROBE_IPSET[family],
                        ip,
                        etype="ip",
                        comment=uid,
                        exclusive=False,
                        family=_af(family),
                    )

        self._inside(add)

    def remove(self, ips_of_pod: list[str], uid: str) -> None:
        """Delete the pod's entries, but never an entry another pod's UID now owns."""
        current = self.entries()
        self.delete([ip for ip in ips_of_pod if current.get(str(ipaddress.ip_address(ip))) == uid])

    def delete(self, ips_to_drop: list[str]) -> None:
        """Delete these entries whoever owns them (the caller knows); absent ones are fine."""

        def delete() -> None:
            with IPSet() as ips:
                for ip in ips_to_drop:
                    family = family_of(ip)
                    with contextlib.suppress(NetlinkError):
                        ips.delete(PROBE_IPSET[family], ip, etype="ip", family=_af(family))

        if ips_to_drop:
            self._inside(delete)

    def prune(self, wanted: Mapping[str, str]) -> None:
        """Remove every entry that is not `wanted` (IP -> UID); add nothing."""
        self.delete([ip for ip, uid in self.entries().items() if wanted.get(ip) != uid])

    def sync(self, wanted: Mapping[str, str]) -> None:
        """Make the entries exactly `wanted` (IP -> UID): re-add, fix comments, prune the rest."""
        current = self.entries()
        self.delete([ip for ip in current if ip not in wanted])
        for ip, uid in wanted.items():
            if current.get(ip) != uid:
                self.add([ip], uid)
