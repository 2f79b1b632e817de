"""In-pod redirection with iptables: the ruleset per family, then policy routing.

Each operation on a pod enters its namespace once: the iptables commands and
the netlink calls for its routing run on that one thread.

With iptables-nft (nftables underneath) a namespace whose nftables generation
has not moved since its rules were last read and found right is not read
again: the read would find the same (`generation`, one netlink request
in-process, instead of an iptables-save process per family)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ambient_cni.api.models import Backend
from ambient_cni.netns import netns_inode_or_none, netns_path

from .constants import Family
from .errors import DataplaneError, UnsafeInput
from .interfaces import NO_CHANGES, Changes, Exec, Routing, Runner
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_rules import pod_ruleset
from .nft_pod import remove_nft_tables_here
from .redirection import PodRedirect

# This thread's namespace and its nftables generation (nft_changes.generation), or None.
Generation = Callable[[], tuple[int, int] | None]

# Namespaces remembered as already applied to; past this, forget them all (the cost of
# forgetting is one fast-path attempt that fails, per pod, the next time it is ensured).
TOUCHED_LIMIT = 65536


def _render(redirect: PodRedirect) -> str:
    try:
        return pod_ruleset(redirect)
    except UnsafeInput as exc:
        raise DataplaneError("UnsafeInput", str(exc)) from exc


class IptablesPodDataplane:
    def __init__(
        self,
        flavour: Flavour,
        runner: Runner,
        routing: Routing,
        other_backends_leftovers: Callable[[], Changes] = remove_nft_tables_here,
        generation: Generation | None = None,
    ):
        """`other_backends_leftovers` runs inside a namespace the first time it is ensured, to
        take out what another backend left there. `generation` (iptables-nft only): a read
        is skipped where nothing changed since the last one found the rules right."""
        self.flavour = flavour
        self.leftovers = other_backends_leftovers
        self.runner = runner
        self.chains = IptablesChains(flavour, runner)
        self.routing = routing
        # (netns inode, family) this process has applied to: not worth a fast-path try again.
        self._touched: set[tuple[int, Family]] = set()
        self.generation = generation
        # namespace cookie -> (its nftables generation, a digest of the rulesets) when last
        # found right: a digest, not the rulesets, since cookies are never reused and
        # entries stay until the limit clears them
        self._right: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        return self.flavour.backend

    def ensure(self, netns: str | Path, redirects: Sequence[PodRedirect]) -> Changes:
        path = netns_path(netns)
        rulesets = [(r.family, _render(r)) for r in redirects]
        for family, ruleset in rulesets:
            # In a scratch namespace: a ruleset the kernel refuses fails before the pod's.
            self.chains.learn(family, ruleset)
        inode = netns_inode_or_none(path)
        with self._lock:
            fresh = {family for family, _ in rulesets if (inode, family) not in self._touched}

        wanted = tuple(ruleset for _, ruleset in rulesets)

        def apply(run: Exec) -> Changes:
            # Read before the rules are: a change after it moves the generation on, and the
            # next check reads again.
            seen = self.generation() if self.generation is not None else None
            with self._lock:
                known = seen is not None and self._right.get(seen[0]) == (seen[1], hash(wanted))
            changes = NO_CHANGES
            if not known or fresh:
                for family, ruleset in rulesets:
                    changes += self.chains.ensure(run, family, ruleset, try_fresh=family in fresh)
            if seen is not None:
                with self._lock:
                    if len(self._right) >= TOUCHED_LIMIT:
                        self._right.clear()
                    # Right as of `seen`; a replacement just made moved the generation on
                    # (so the next check reads once more, to be sure).
                    self._right[seen[0]] = (seen[1], hash(wanted))
            changes += self.routing.ensure(None, [f for f, _ in rulesets])
            if fresh:  # first time here: what the nftables backend left (a node switched)
                changes += self.leftovers()
            return changes

        changes = self.runner.within(path, apply)
        with self._lock:
            if len(self._touched) >= TOUCHED_LIMIT:  # only a hint: pods come and go
                self._touched.clear()
            self._touched.update((inode, family) for family, _ in rulesets)
        return changes

    def verify(self, netns: str | Path, redirects: Sequence[PodRedirect]) -> bool:
        wanted = {r.family: self.chains.learn(r.family, _render(r)) for r in redirects}

        def check(run: Exec) -> bool:
            rules_right = all(self.chains.read(run, f) == want for f, want in wanted.items())
            return rules_right and self.routing.present(None, list(wanted))

        return self.runner.within(netns_path(netns), check)

    def remove(self, netns: str | Path, families: Sequence[Family] = (4, 6)) -> bool:
        def remove(run: Exec) -> bool:
            removed = False
            for family in families:
                removed |= self.chains.remove(run, family)
            return self.routing.remove(None, families) or removed

        return self.runner.within(netns_path(netns), remove)
