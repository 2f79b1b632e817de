"""Assembles a dataplane backend: the pod and host dataplanes a redirect mode works through.

A new backend is a module implementing PodDataplane and HostDataplane
(interfaces.py), one entry in BACKENDS below, and its name in
`api.models.Backend`; the CLI's `--backend` choices follow from that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ambient_cni.api.models import Backend
from ambient_cni.netns import NetnsWorkers

from .constants import BACKEND_CHOICES, PROBE_IPSET
from .errors import DataplaneError
from .interfaces import HostDataplane, PodDataplane, Runner, SidecarDataplane
from .ipset import IpsetAddressSets
from .iptables_flavour import Flavour, FlavourName, count_rules
from .iptables_host import IptablesHostDataplane
from .iptables_pod import IptablesPodDataplane
from .iptables_sidecar import IptablesSidecarDataplane
from .kubelet_uid import kubelet_uid
from .libnftables import Nft
from .nft_changes import NftablesChanges, OwnWriter, generation
from .nft_host import NftablesHostDataplane, NftAddressSets
from .nft_pod import NftablesPodDataplane
from .nft_sidecar import NftablesSidecarDataplane
from .node_dataplane import NodeModeDataplane
from .routing import PolicyRouting
from .runner import SubprocessRunner, in_netns

# Tables iptables-nft makes (family ip/ip6): their rules are iptables rules, not native ones.
IPTABLES_NFT_TABLES = {"filter", "nat", "mangle", "raw", "security"}


@dataclass(frozen=True)
class Dataplane:
    backend: Backend
    pods: PodDataplane
    host: HostDataplane
    sidecars: SidecarDataplane  # Istio's iptables or native nftables form, as the pods'
    node: NodeModeDataplane  # the legacy node mode: iptables, as Istio 1.20 had it
    # Where the kernel announces changes to the backend's rules (None: legacy iptables
    # announces nothing).
    changes: NftablesChanges | None


@dataclass
class BackendOptions:
    host_netns: Path | None = None
    runner: Runner = field(default_factory=SubprocessRunner)
    proc: Path = Path("/proc")  # the host's, to find kubelet
    kubelet_uid: int | None = None  # found in `proc` when not given
    workers: int = 4  # threads that enter pod namespaces (in-process backends)


BackendBuilder = Callable[[BackendOptions], Dataplane]


def _iptables(name: FlavourName) -> BackendBuilder:
    def build(options: BackendOptions) -> Dataplane:
        flavour, runner, host_netns = Flavour(name), options.runner, options.host_netns
        return Dataplane(
            backend=flavour.backend,
            pods=IptablesPodDataplane(
                flavour, runner, PolicyRouting(), generation=generation if name == "nft" else None
            ),
            host=IptablesHostDataplane(
                flavour, runner, IpsetAddressSets(PROBE_IPSET, host_netns), host_netns
            ),
            sidecars=IptablesSidecarDataplane(flavour, runner),
            node=NodeModeDataplane(flavour, runner, host_netns),
            # iptables-nft is nftables underneath: the kernel announces its changes too.
            changes=NftablesChanges(own=OwnWriter(options.proc)) if name == "nft" else None,
        )

    return build


def _nftables(options: BackendOptions) -> Dataplane:
    workers = NetnsWorkers(options.workers, name="nftables")
    # The node's own namespace gets a thread of its own: set changes never queue behind pods.
    host_workers = NetnsWorkers(1, name="nftables-host")
    given = options.kubelet_uid

    def uid() -> int:
        return given if given is not None else kubelet_uid(options.proc)

    return Dataplane(
        backend="nftables",
        pods=NftablesPodDataplane(workers, options.runner, PolicyRouting()),
        host=NftablesHostDataplane(
            host_workers,
            options.runner,
            NftAddressSets(host_workers, options.host_netns),
            uid,
            options.host_netns,
        ),
        sidecars=NftablesSidecarDataplane(workers, options.runner),
        # Istio never had node mode in native nftables: its rules go through iptables-nft.
        node=NodeModeDataplane(Flavour("nft"), options.runner, options.host_netns),
        changes=NftablesChanges(own=OwnWriter(options.proc)),
    )


BACKENDS: dict[Backend, BackendBuilder] = {
    "iptables-nft": _iptables("nft"),
    "iptables-legacy": _iptables("legacy"),
    "nftables": _nftables,
}


def _native_rules(host_netns: Path | None) -> int:
    """Rules in nftables tables that are not iptables-nft's own (-1: nft not usable here)."""

    def count() -> int:
        try:
            ruleset = Nft().json("list ruleset")
        except (OSError, DataplaneError):
            return -1
        return sum(
            1
            for item in ruleset
            if "rule" in item
            and not (
                item["rule"]["family"] in ("ip", "ip6")
                and item["rule"]["table"] in IPTABLES_NFT_TABLES
            )
        )

    return in_netns(host_netns, count)


def detect(runner: Runner, host_netns: Path | None = None) -> Backend:
    """The backend whose rules the node already holds: the most rules wins, and with none
    (or a tie), iptables-nft, the default."""
    counts: dict[Backend, int] = {
        "iptables-nft": count_rules(runner, Flavour("nft"), host_netns),
        "iptables-legacy": count_rules(runner, Flavour("legacy"), host_netns),
        "nftables": _native_rules(host_netns),
    }
    best = max(counts.values())
    if best <= 0 or counts["iptables-nft"] == best:
        return "iptables-nft"
    return "iptables-legacy" if counts["iptables-legacy"] == best else "nftables"


def build(choice: str, options: BackendOptions | None = None) -> Dataplane:
    """The backend `--backend` names; `auto` follows what the node already uses."""
    options = options or BackendOptions()
    wanted = detect(options.runner, options.host_netns) if choice == "auto" else choice
    for backend, builder in BACKENDS.items():
        if backend == wanted:
            return builder(options)
    raise ValueError(f"unknown backend {choice!r}: choose one of {', '.join(BACKEND_CHOICES)}")
