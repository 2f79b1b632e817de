"""A sidecar pod's capture with native nftables, in-process, as Istio writes it with
`native_nftables`: one libnftables transaction per pod on one of the backend's threads
in the pod's namespace (the tables added, flushed and filled), then its routing on the
same thread. Level-based: compared with what the kernel made of the same ruleset in a
scratch namespace, replaced whole when it differs. The first time it touches a namespace
it also takes out what the iptables backend's capture left there (a node switched), after
its own tables are in.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from ambient_cni.api.models import Backend, SidecarCapture
from ambient_cni.netns import NetnsWorkers, netns_inode_or_none, netns_path

from .constants import Family
from .errors import DataplaneError, UnsafeInput
from .interfaces import NO_CHANGES, Change, Changes, Runner
from .iptables_sidecar import SIDECAR_OWNED
from .iptables_state import differences
from .libnftables import Nft
from .nft_learn import NftLearner
from .nft_pod import TOUCHED_LIMIT, remove_iptables_leftovers
from .nft_rules import delete_tables
from .sidecar_nft_rules import SIDECAR_NFT_TABLES, sidecar_nft_ruleset
from .sidecar_routing import ensure_sidecar_routing


def _render(capture: SidecarCapture, families: Sequence[Family]) -> str:
    try:
        return sidecar_nft_ruleset(capture, families)
    except UnsafeInput as exc:
        raise DataplaneError("UnsafeInput", str(exc)) from exc


class NftablesSidecarDataplane:
    def __init__(self, workers: NetnsWorkers, runner: Runner):
        self.workers = workers
        self.runner = runner
        self._learner = NftLearner(workers, runner, SIDECAR_NFT_TABLES)
        self._migrated: set[int] = set()  # netns inodes checked for iptables leftovers
        self._lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        return "nftables"

    def ensure(self, netns: Path, capture: SidecarCapture, families: Sequence[Family]) -> Changes:
        ruleset = _render(capture, families)
        want = self._learner.learn(ruleset)  # a ruleset the kernel refuses fails here
        tproxy = capture.interception_mode == "TPROXY"
        path = netns_path(netns)
        inode = netns_inode_or_none(path)
        with self._lock:
            migrate = inode not in self._migrated

        def apply() -> Changes:
            nft = Nft()
            listing = nft.ruleset()
            have = listing.tables(SIDECAR_NFT_TABLES)
            changes = NO_CHANGES
            if have != want:
                # Ours out and in again, in one transaction: a flush alone would keep chains
                # the capture no longer has (and their order), and tables it no longer uses.
                nft.run(delete_tables(list(have)) + ruleset)
                if nft.read(SIDECAR_NFT_TABLES) != want:
                    raise DataplaneError(
                        "RulesNotApplied",
                        "the tables read back differ from those applied",
                        retryable=True,
                    )
                what = "; ".join(differences(have, want)) if have else "tables added"
                changes = Changes(
                    (Change("rules", f"nftables {what}: replaced in one transaction"),)
                )
            if migrate:
                changes += remove_iptables_leftovers(self.runner, listing, SIDECAR_OWNED)
            return changes + ensure_sidecar_routing(families, tproxy)

        changes = self.workers.run(path, apply)
        with self._lock:
            if len(self._migrated) >= TOUCHED_LIMIT:
                self._migrated.clear()
            self._migrated.add(inode)
        return changes
