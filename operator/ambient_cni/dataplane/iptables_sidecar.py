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

import threading
from collections.abc import Sequence
from pathlib import Path

from ambient_cni.api.models import Backend, SidecarCapture
from ambient_cni.netns import netns_inode_or_none, netns_path

from .constants import Family
from .errors import DataplaneError, UnsafeInput
from .interfaces import NO_CHANGES, Change, Changes, Exec, Runner
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_pod import TOUCHED_LIMIT
from .iptables_state import Ownership
from .nft_pod import remove_nft_tables_here
from .sidecar_nft_rules import SIDECAR_NFT_TABLES
from .sidecar_routing import ensure_sidecar_routing
from .sidecar_rules import sidecar_ruleset

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
        # netns inode -> the families last applied there (absent: not yet checked for the
        # nftables backend's leftovers, nor the other family's capture)
        self._applied: dict[int, tuple[Family, ...]] = {}
        self._lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        return self.flavour.backend

    def ensure(self, netns: Path, capture: SidecarCapture, families: Sequence[Family]) -> Changes:
        rulesets = [(family, _render(capture, family)) for family in families]
        for family, ruleset in rulesets:
            # In a scratch namespace: a ruleset the kernel refuses fails before the pod's.
            self.chains.learn(family, ruleset)
        tproxy = capture.interception_mode == "TPROXY"
        path = netns_path(netns)
        inode = netns_inode_or_none(path)
        with self._lock:
            before = self._applied.get(inode)
        fresh = before is None
        # The other family is read only when the families changed: no ip6tables-save on
        # every drift pass of an IPv4 pod.
        both: tuple[Family, ...] = (4, 6)
        others = [] if before == tuple(families) else [f for f in both if f not in families]

        def apply(run: Exec) -> Changes:
            changes = NO_CHANGES
            for family, ruleset in rulesets:
                changes += self.chains.ensure(run, family, ruleset)
            for family in others:  # say, IPv6 rules of an earlier capture
                held = self.chains.read(run, family)
                ours = any(line.startswith(":ISTIO_") for lines in held.values() for line in lines)
                if ours and self.chains.remove(run, family):
                    changes += Changes((Change("rules", f"IPv{family}: rules removed"),))
            if fresh:  # what the nftables backend's capture left (a node switched)
                changes += remove_nft_tables_here(SIDECAR_NFT_TABLES)
            return changes + ensure_sidecar_routing(families, tproxy)

        changes = self.runner.within(path, apply)
        with self._lock:
            if len(self._applied) >= TOUCHED_LIMIT:  # only a hint: pods come and go
                self._applied.clear()
            self._applied[inode] = tuple(families)
        return changes
