"""Our chains in one network namespace and IP family, made exactly a given ruleset.

The one save-compare-replace algorithm, shared by pod and host rules:

- learn: what "right" looks like is the ruleset applied in a private scratch
  namespace and read back, once per ruleset, so comparisons are exact whatever
  the iptables version prints; a ruleset the kernel refuses fails here, before
  anything touches the real namespace (a restore commits table by table);
- compare: save the namespace, keep only what is ours, compare with the learnt form;
- replace: one `iptables-restore --noflush` per family that removes what is
  there of ours and adds the whole ruleset in the same transaction per table;
  then read back and compare again.

The methods that act on a namespace take the Exec the runner hands out inside
it, so a caller does a whole operation on one thread in that namespace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from .constants import Family
from .errors import DataplaneError, first_error
from .interfaces import NO_CHANGES, Change, ChangeKind, Changes, Completed, Exec, Runner
from .iptables_flavour import Flavour
from .iptables_state import (
    INPOD,
    Ownership,
    Tables,
    differences,
    our_rules,
    removal_input,
    replace_input,
)

# Prepares a scratch namespace before a ruleset is learnt there (e.g. creates the
# address sets the ruleset matches on).
Prepare = Callable[[Path], None]


class IptablesChains:
    def __init__(self, flavour: Flavour, runner: Runner, owned: Ownership = INPOD):
        self.flavour = flavour
        self.runner = runner
        self.owned = owned
        self._learnt: dict[tuple[Family, str], Tables] = {}
        self._lock = threading.Lock()

    def learn(
        self,
        family: Family,
        ruleset: str,
        *,
        prepare: Prepare | None = None,
        rejected: str = "RuleRejected",
    ) -> Tables:
        """What the kernel reports for `ruleset` applied to an empty namespace (cached)."""
        with self._lock:
            known = self._learnt.get((family, ruleset))
        if known is not None:
            return known
        with self.runner.scratch() as scratch:
            if prepare is not None:
                prepare(scratch)

            def apply_and_read(run: Exec) -> Tables:
                self._restore(run, family, ruleset, rejected)
                return self.read(run, family)

            tables = self.runner.within(scratch, apply_and_read)
        with self._lock:
            self._learnt[(family, ruleset)] = tables
        return tables

    def read(self, run: Exec, family: Family) -> Tables:
        return our_rules(self._save(run, family), self.owned)

    def ensure(
        self,
        run: Exec,
        family: Family,
        ruleset: str,
        *,
        try_fresh: bool = False,
        prepare: Prepare | None = None,
        rejected: str = "RuleRejected",
        kind: ChangeKind = "rules",
    ) -> Changes:
        """Make our chains exactly `ruleset`; says what had to change.

        `try_fresh`: first try the ruleset as it is, one process. It creates its
        chains with -N, so it fails on a namespace that already has them (a table
        that had none may have been added); the compare-and-replace path then
        reads and replaces, table by table.
        """
        want = self.learn(family, ruleset, prepare=prepare, rejected=rejected)
        if try_fresh and self._restore_status(run, family, ruleset).returncode == 0:
            return Changes((Change(kind, f"IPv{family}: the ruleset applied"),))
        saved = self._save(run, family)
        have = our_rules(saved, self.owned)
        if have == want:
            return NO_CHANGES
        self._restore(run, family, replace_input(saved, ruleset, self.owned), rejected)
        if self.read(run, family) != want:
            raise DataplaneError(
                "RulesNotApplied", "the rules read back differ from those applied", retryable=True
            )
        wrong = "; ".join(differences(have, want))
        return Changes((Change(kind, f"IPv{family} {wrong}: replaced in one transaction"),))

    def remove(self, run: Exec, family: Family, *, failed: str = "RuleRemovalFailed") -> bool:
        """Remove our chains and the jumps to them; True if anything was there."""
        script = removal_input(self._save(run, family), self.owned)
        if not script:
            return False
        result = self._restore_status(run, family, script)
        if result.returncode != 0:
            raise DataplaneError(failed, first_error(result.stderr), retryable=True)
        return True

    # -- the two commands ---------------------------------------------------------------

    def _save(self, run: Exec, family: Family) -> str:
        tool = self.flavour.tool(family, "save")
        saved = run([tool], None)
        if saved.returncode != 0:
            raise DataplaneError("RuleReadFailed", first_error(saved.stderr, tool), retryable=True)
        return saved.stdout

    def _restore_status(self, run: Exec, family: Family, script: str) -> Completed:
        return run([self.flavour.tool(family, "restore"), "--noflush"], script)

    def _restore(self, run: Exec, family: Family, script: str, rejected: str) -> None:
        result = self._restore_status(run, family, script)
        if result.returncode != 0:
            raise DataplaneError(rejected, first_error(result.stderr))
