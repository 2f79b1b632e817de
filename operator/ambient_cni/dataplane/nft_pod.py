"""In-pod redirection with native nftables, applied in-process: no process per pod.

Each operation runs on one of the backend's own threads, which enters the
pod's namespace, makes a libnftables context there, applies the pod's tables
in one transaction, reads them back, sets up the policy routing over netlink
on the same thread, and comes back (netns.NetnsWorkers). What "right" looks
like is learned once per ruleset in a scratch namespace, as for iptables, so
the comparison is with what the kernel reports, exactly.

The first time it touches a namespace it also takes out what the iptables
backend left there (a node switched from iptables to nftables), after the new
tables are in, so the pod is never without redirection.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from ambient_cni.api.models import Backend
from ambient_cni.netns import NetnsWorkers, netns_inode_or_none, netns_path

from .constants import Family
from .errors import DataplaneError, UnsafeInput
from .interfaces import NO_CHANGES, Change, Changes, Exec, Routing, Runner
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_state import INPOD, Ownership, Tables, differences
from .libnftables import Listing, Nft
from .nft_learn import NftLearner
from .nft_rules import POD_TABLES, delete_tables, pod_nft_ruleset, pod_nft_tables
from .redirection import PodRedirect

TOUCHED_LIMIT = 65536
FAMILIES: tuple[Family, ...] = (4, 6)


def _render(redirects: Sequence[PodRedirect]) -> str:
    try:
        return pod_nft_ruleset(redirects)
    except UnsafeInput as exc:
        raise DataplaneError("UnsafeInput", str(exc)) from exc


class NftablesPodDataplane:
    def __init__(self, workers: NetnsWorkers, runner: Runner, routing: Routing):
        self.workers = workers
        self.runner = runner
        self.routing = routing
        self._learner = NftLearner(workers, runner, POD_TABLES)
        self._migrated: set[int] = set()  # netns inodes checked for iptables leftovers
        self._lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        return "nftables"

    def learn(self, ruleset: str) -> Tables:
        """The kernel's listing of `ruleset` in an empty namespace (cached)."""
        return self._learner.learn(ruleset)

    # -- per pod ---------------------------------------------------------------------------------

    def ensure(self, netns: str | Path, redirects: Sequence[PodRedirect]) -> Changes:
        path = netns_path(netns)
        ruleset = _render(redirects)
        want = self.learn(ruleset)  # a ruleset the kernel refuses fails here, in scratch
        stale = [t for t in POD_TABLES if t not in pod_nft_tables(redirects)]
        families = [r.family for r in redirects]
        inode = netns_inode_or_none(path)
        with self._lock:
            migrate = inode not in self._migrated

        def apply() -> Changes:
            nft = Nft()
            # A namespace never seen: no reading first (the transaction replaces whatever
            # is there anyway), only the read-back after.
            listing = None if migrate else nft.ruleset()
            have = listing.tables(POD_TABLES) if listing else {}
            changes = NO_CHANGES
            if listing is None or have != want:
                nft.run(
                    delete_tables(stale if migrate else [t for t in stale if t in have]) + ruleset
                )
                listing = nft.ruleset()
                if listing.tables(POD_TABLES) != want:
                    raise DataplaneError(
                        "RulesNotApplied",
                        "the tables read back differ from those applied",
                        retryable=True,
                    )
                what = "; ".join(differences(have, want)) if have else "tables added"
                changes = Changes(
                    (Change("rules", f"nftables {what}: replaced in one transaction"),)
                )
            changes += self.routing.ensure(None, families)
            if migrate:  # from the listing just read: no second dump
                changes += remove_iptables_leftovers(self.runner, listing)
            return changes

        changes = self.workers.run(path, apply)
        with self._lock:
            if len(self._migrated) >= TOUCHED_LIMIT:
                self._migrated.clear()
            self._migrated.add(inode)
        return changes

    def verify(self, netns: str | Path, redirects: Sequence[PodRedirect]) -> bool:
        want = self.learn(_render(redirects))
        families = [r.family for r in redirects]

        def check() -> bool:
            right = Nft().read(POD_TABLES) == want
            return right and self.routing.present(None, families)

        return self.workers.run(netns_path(netns), check)

    def remove(self, netns: str | Path, families: Sequence[Family] = (4, 6)) -> bool:
        def remove() -> bool:
            nft = Nft()
            listing = nft.ruleset()
            present = list(listing.tables(POD_TABLES))
            if present:
                nft.run(delete_tables(present), rejected="RuleRemovalFailed")
            leftovers = bool(remove_iptables_leftovers(self.runner, listing))
            return self.routing.remove(None, families) or bool(present) or leftovers

        return self.workers.run(netns_path(netns), remove)


def remove_iptables_leftovers(
    runner: Runner, listing: Listing, owned: Ownership = INPOD
) -> Changes:
    """Take out the iptables backend's chains, if this namespace has any (called on a thread
    inside it). Cheap when there are none: iptables-nft's chains are in the listing already
    read, iptables-legacy's tables' names in /proc; the iptables tools run only when needed."""
    done: list[Change] = []
    for flavour in _flavours_with_our_chains(listing, owned):
        chains = IptablesChains(flavour, runner, owned)

        def remove(run: Exec, chains: IptablesChains = chains) -> bool:
            removed = [chains.remove(run, family) for family in FAMILIES]  # both, always
            return any(removed)

        if runner.within(None, remove):
            done.append(Change("rules", f"{flavour.backend} chains removed (now nftables)"))
    return Changes(tuple(done))


def _flavours_with_our_chains(listing: Listing, owned: Ownership) -> list[Flavour]:
    found: list[Flavour] = []
    if listing.chains(("ip", "ip6")) & owned.chains:
        found.append(Flavour("nft"))
    if _legacy_tables_loaded():
        found.append(Flavour("legacy"))
    return found


def _legacy_tables_loaded() -> bool:
    """Whether iptables-legacy holds any table in this thread's namespace (its names file)."""
    for name in ("ip_tables_names", "ip6_tables_names"):
        try:
            if Path(f"/proc/thread-self/net/{name}").read_text().strip():
                return True
        except OSError:
            continue
    return False


# Exposed for the iptables backend: the reverse migration.
def remove_nft_tables_here(tables: Sequence[str] = POD_TABLES) -> Changes:
    """Delete our native nftables tables in this thread's namespace, if there are any."""
    nft = Nft()
    present = [name for family, name in nft.tables() if family == "inet" and name in tables]
    if not present:
        return NO_CHANGES
    nft.run(delete_tables(present), rejected="RuleRemovalFailed")
    return Changes((Change("rules", "nftables tables removed (now iptables)"),))
