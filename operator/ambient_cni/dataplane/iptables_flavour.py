"""Which iptables the node uses: the nft or the legacy flavour of the same commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ambient_cni.api.models import Backend

from .constants import Family
from .errors import DataplaneError
from .interfaces import Runner

FlavourName = Literal["nft", "legacy"]


@dataclass(frozen=True)
class Flavour:
    name: FlavourName

    def tool(self, family: Family, verb: Literal["save", "restore"]) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return f"{base}-{self.name}-{verb}"

    @property
    def backend(self) -> Backend:
        return "iptables-nft" if self.name == "nft" else "iptables-legacy"


def count_rules(runner: Runner, flavour: Flavour, host_netns: Path | None) -> int:
    """Rules of this flavour on the host (-1: its tools are not installed)."""
    total = 0
    for family in (4, 6):
        try:
            saved = runner.run([flavour.tool(family, "save")], netns=host_netns)
        except DataplaneError:
            return -1  # not installed: never chosen by the count
        total += sum(1 for line in saved.stdout.splitlines() if line.startswith("-A "))
    return total


def detect_flavour(runner: Runner, host_netns: Path | None = None) -> Flavour:
    """The flavour the host already uses (more rules wins); nft when neither has rules."""
    legacy = count_rules(runner, Flavour("legacy"), host_netns)
    nft = count_rules(runner, Flavour("nft"), host_netns)
    return Flavour("legacy") if legacy > max(nft, 0) else Flavour("nft")
