"""Address sets as ipsets over netlink (pyroute2): one `hash:ip` set per IP family, with
comments, in a given network namespace. No process is started."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyroute2.ipset import IPSet
from pyroute2.netlink.exceptions import NetlinkError

from .constants import Family
from .redirection import family_of
from .runner import in_netns

FAMILIES: tuple[Family, ...] = (4, 6)


def _af(family: Family) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


class IpsetAddressSets:
    def __init__(self, names: Mapping[Family, str], netns: Path | None = None):
        self.names = dict(names)
        self.netns = netns

    def at(self, netns: Path | None) -> IpsetAddressSets:
        """The same sets in another namespace (a scratch one, to learn rules that use them)."""
        return IpsetAddressSets(self.names, netns)

    def create(self) -> None:
        def create() -> None:
            with IPSet() as ips:
                for family, name in self.names.items():
                    ips.create(
                        name, stype="hash:ip", family=_af(family), comment=True, exclusive=False
                    )

        in_netns(self.netns, create)

    def destroy(self) -> bool:
        def destroy() -> bool:
            destroyed = False
            with IPSet() as ips:
                for name in self.names.values():
                    with contextlib.suppress(NetlinkError):
                        ips.destroy(name)
                        destroyed = True
            return destroyed

        return in_netns(self.netns, destroy)

    def entries(self) -> dict[str, str]:
        def read() -> dict[str, str]:
            found: dict[str, str] = {}
            with IPSet() as ips:
                for name in self.names.values():
                    try:
                        messages = ips.list(name)
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

        return in_netns(self.netns, read)

    def add(self, ips: Sequence[str], uid: str) -> None:
        def add() -> None:
            with IPSet() as sets:
                for ip in ips:
                    family = family_of(ip)
                    sets.add(
                        self.names[family],
                        ip,
                        etype="ip",
                        comment=uid,
                        exclusive=False,
                        family=_af(family),
                    )

        if ips:
            in_netns(self.netns, add)

    def delete(self, ips: Sequence[str]) -> None:
        def delete() -> None:
            with IPSet() as sets:
                for ip in ips:
                    family = family_of(ip)
                    with contextlib.suppress(NetlinkError):
                        sets.delete(self.names[family], ip, etype="ip", family=_af(family))

        if ips:
            in_netns(self.netns, delete)
