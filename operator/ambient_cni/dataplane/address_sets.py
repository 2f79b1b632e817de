"""What to do with address sets, over any implementation of the AddressSets interface."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from .interfaces import AddressSets


def canonical_ip(ip: str) -> str:
    """The kernel's spelling of an address (sets report `fd00::5`, never `fd00:0::5`)."""
    return str(ipaddress.ip_address(ip))


def remove_owned(sets: AddressSets, ips: Sequence[str], uid: str) -> None:
    """Delete the pod's entries, but never an entry another pod's UID now owns."""
    current = sets.entries()
    sets.delete([ip for ip in ips if current.get(canonical_ip(ip)) == uid])


def prune(sets: AddressSets, wanted: Mapping[str, str]) -> None:
    """Remove every entry that is not `wanted` (IP -> UID); add nothing."""
    sets.delete([ip for ip, uid in sets.entries().items() if wanted.get(ip) != uid])


def sync(sets: AddressSets, wanted: Mapping[str, str]) -> None:
    """Make the entries exactly `wanted` (IP -> UID): re-add, fix comments, prune the rest."""
    current = sets.entries()
    sets.delete([ip for ip in current if ip not in wanted])
    for ip, uid in wanted.items():
        if current.get(ip) != uid:
            sets.add([ip], uid)
