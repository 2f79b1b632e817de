"""What "right" looks like for an nftables ruleset: the kernel's own listing of it.

Each ruleset is applied once to a private scratch namespace and read back; the pod's (or
node's) tables are then compared with that listing exactly, whatever the nft version
prints. A ruleset the kernel refuses fails here, before any real namespace is touched.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ambient_cni.netns import NetnsWorkers

from .interfaces import Runner
from .iptables_state import Tables
from .libnftables import Nft


class NftLearner:
    def __init__(
        self,
        workers: NetnsWorkers,
        runner: Runner,
        tables: Sequence[str],
        *,
        prefix: str = "",
        rejected: str = "RuleRejected",
    ):
        """`prefix`: applied before each ruleset (say, the sets its rules match on)."""
        self.workers = workers
        self.runner = runner
        self.tables = tuple(tables)
        self.prefix = prefix
        self.rejected = rejected
        self._learnt: dict[str, Tables] = {}
        self._lock = threading.Lock()

    def learn(self, ruleset: str) -> Tables:
        with self._lock:
            known = self._learnt.get(ruleset)
        if known is not None:
            return known

        def apply_and_read() -> Tables:
            nft = Nft()
            nft.run(self.prefix + ruleset, rejected=self.rejected)
            return nft.read(self.tables)

        with self.runner.scratch() as scratch:
            tables = self.workers.run(scratch, apply_and_read)
        with self._lock:
            self._learnt[ruleset] = tables
        return tables
