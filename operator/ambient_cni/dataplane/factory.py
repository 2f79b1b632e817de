"""Assembles a dataplane backend: the pod and host dataplanes a redirect mode works through.

A new backend is a module implementing PodDataplane and HostDataplane
(interfaces.py), one entry in BACKENDS below, and its name in
`api.models.Backend`; the CLI's `--backend` choices follow from that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ambient_cni.api.models import Backend

from .constants import BACKEND_CHOICES, PROBE_IPSET
from .interfaces import HostDataplane, PodDataplane, Runner
from .ipset import IpsetAddressSets
from .iptables_flavour import Flavour, FlavourName, detect_flavour
from .iptables_host import IptablesHostDataplane
from .iptables_pod import IptablesPodDataplane
from .routing import PolicyRouting
from .runner import SubprocessRunner


@dataclass(frozen=True)
class Dataplane:
    backend: Backend
    pods: PodDataplane
    host: HostDataplane


BackendBuilder = Callable[[Runner, Path | None], Dataplane]


def _iptables(name: FlavourName) -> BackendBuilder:
    def build(runner: Runner, host_netns: Path | None) -> Dataplane:
        flavour = Flavour(name)
        return Dataplane(
            backend=flavour.backend,
            pods=IptablesPodDataplane(flavour, runner, PolicyRouting()),
            host=IptablesHostDataplane(
                flavour, runner, IpsetAddressSets(PROBE_IPSET, host_netns), host_netns
            ),
        )

    return build


BACKENDS: dict[Backend, BackendBuilder] = {
    "iptables-nft": _iptables("nft"),
    "iptables-legacy": _iptables("legacy"),
}


def detect(runner: Runner, host_netns: Path | None = None) -> Backend:
    """The backend whose rules the node already holds (iptables-nft when it holds none)."""
    return detect_flavour(runner, host_netns).backend


def build(choice: str, host_netns: Path | None = None, runner: Runner | None = None) -> Dataplane:
    """The backend `--backend` names; `auto` follows what the node already uses."""
    runner = runner or SubprocessRunner()
    wanted = detect(runner, host_netns) if choice == "auto" else choice
    for backend, builder in BACKENDS.items():
        if backend == wanted:
            return builder(runner, host_netns)
    raise ValueError(f"unknown backend {choice!r}: choose one of {', '.join(BACKEND_CHOICES)}")
