"""The host side of in-pod mode with native nftables: the probe SNAT rule and the probe
address sets, in one `inet istio-ambient-nat` table in the node's namespace.

Set changes from pods enrolled at the same time share transactions: the
first caller applies every change waiting, then the ones that arrived
meanwhile, until none is left, and wakes their callers (a group commit, with
no waiting added: changes gather while a transaction runs). A batch the kernel
refuses is retried change by change, so one bad change fails alone.

The changes go through one libnftables context kept for the host's namespace.
A context made per transaction would be freed after it, and freeing one makes
the kernel finish releasing what earlier transactions deleted while it holds
the namespace's commit lock (an RCU grace period, about 12 ms here): every
element delete would cost the next transaction that wait.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ambient_cni.netns import NetnsWorkers

from .address_sets import canonical_ip
from .constants import PROBE_IPSET, Family
from .errors import DataplaneError
from .interfaces import NO_CHANGES, AddressSets, Change, Changes, Exec, Runner
from .ipset import IpsetAddressSets
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_state import differences
from .libnftables import Nft
from .nft_learn import NftLearner
from .nft_rules import HOST_TABLE, host_nft_ruleset, host_nft_sets
from .redirection import family_of

T = TypeVar("T")
FAMILIES: tuple[Family, ...] = (4, 6)


def _in(workers: NetnsWorkers, netns: Path | None, fn: Callable[[], T]) -> T:
    """Run `fn` in the host namespace: here (the agent's own), or on a backend thread."""
    return fn() if netns is None else workers.run(netns, fn)


@dataclass
class _Batch:
    script: str
    done: threading.Event = field(default_factory=threading.Event)
    failure: DataplaneError | None = None


class NftAddressSets:
    """The probe address sets as nft sets, each element commented with its pod's UID."""

    def __init__(self, workers: NetnsWorkers, netns: Path | None = None):
        self.workers = workers
        self.netns = netns
        self._pending: list[_Batch] = []
        self._flushing = False
        self._lock = threading.Lock()
        self.transactions = 0  # how many element transactions ran (for benchmarks)
        # IP -> pod UID as last written or read here: an add needs no delete unless the
        # element is another pod's.
        self._known: dict[str, str] = {}
        self._nft: Nft | None = None  # made on the first transaction, in the namespace

    def at(self, netns: Path | None) -> NftAddressSets:
        return NftAddressSets(self.workers, netns)

    def create(self) -> None:
        _in(self.workers, self.netns, lambda: Nft().run(host_nft_sets()))

    def destroy(self) -> bool:
        def destroy() -> bool:
            nft = Nft()
            if ("inet", HOST_TABLE) not in nft.tables():
                return False
            nft.run(f"delete table inet {HOST_TABLE}\n")
            return True

        return _in(self.workers, self.netns, destroy)

    def entries(self) -> dict[str, str]:
        def read() -> dict[str, str]:
            nft = Nft()
            found: dict[str, str] = {}
            for family in FAMILIES:
                for item in nft.json(f"list set inet {HOST_TABLE} {PROBE_IPSET[family]}"):
                    for element in item.get("set", {}).get("elem", []):
                        if isinstance(element, dict):
                            inner = element.get("elem", {})
                            found[str(inner.get("val"))] = str(inner.get("comment", ""))
                        else:
                            found[str(element)] = ""
            return found

        found = _in(self.workers, self.netns, read)
        with self._lock:
            self._known = dict(found)
        return found

    def add(self, ips: Sequence[str], uid: str) -> None:
        """Add or replace: an element whose comment names another pod gets this one's (nft
        keeps the old comment on a plain add, so that element is deleted and added again)."""
        comment = _checked_uid(uid)
        lines = []
        for ip in ips:
            where, element = _element(ip)
            with self._lock:
                owner = self._known.get(element)
            if owner is not None and owner != uid:
                lines += [
                    f"add element {where} {{ {element} }}",
                    f"delete element {where} {{ {element} }}",
                ]
            lines.append(f'add element {where} {{ {element} comment "{comment}" }}')
        if lines:
            self._commit("\n".join(lines) + "\n")
            with self._lock:
                self._known.update({_element(ip)[1]: uid for ip in ips})

    def delete(self, ips: Sequence[str]) -> None:
        lines = []
        for ip in ips:
            where, element = _element(ip)
            lines += [
                f"add element {where} {{ {element} }}",
                f"delete element {where} {{ {element} }}",
            ]
        if lines:
            self._commit("\n".join(lines) + "\n")
            with self._lock:
                for ip in ips:
                    self._known.pop(_element(ip)[1], None)

    # -- the group commit ----------------------------------------------------------------------

    def _commit(self, script: str) -> None:
        batch = _Batch(script)
        with self._lock:
            self._pending.append(batch)
            lead = not self._flushing
            self._flushing = lead or self._flushing
        if lead:
            self._flush()
        batch.done.wait()
        if batch.failure is not None:
            raise batch.failure

    def _flush(self) -> None:
        while True:
            with self._lock:
                batches, self._pending = self._pending, []
                if not batches:
                    self._flushing = False
                    return
            try:
                _in(self.workers, self.netns, functools.partial(self._apply, batches))
            except DataplaneError as exc:
                for batch in batches:
                    batch.failure = batch.failure or exc
            for batch in batches:
                batch.done.set()

    def _apply(self, batches: list[_Batch]) -> None:
        """On the host's worker (or, with no netns given, a thread in the agent's own namespace:
        one flush runs at a time, so the context is never used by two threads at once)."""
        if self._nft is None:
            self._nft = Nft()
        nft = self._nft
        try:
            nft.run("".join(b.script for b in batches))
            self.transactions += 1
            return
        except DataplaneError:
            if len(batches) == 1:
                raise
        for batch in batches:  # one bad change must not fail the others
            try:
                nft.run(batch.script)
                self.transactions += 1
            except DataplaneError as exc:
                batch.failure = exc


def _element(ip: str) -> tuple[str, str]:
    family = family_of(ip)
    return f"inet {HOST_TABLE} {PROBE_IPSET[family]}", canonical_ip(ip)


def _checked_uid(uid: str) -> str:
    """A pod UID goes into a comment: it must be one (no quotes to end the string with)."""
    if not uid or any(not (c.isalnum() or c == "-") for c in uid) or len(uid) > 128:
        raise DataplaneError("UnsafeInput", f"{uid[:64]!r} is not a pod UID")
    return uid


class NftablesHostDataplane:
    def __init__(
        self,
        workers: NetnsWorkers,
        runner: Runner,
        addresses: NftAddressSets,
        kubelet_uid: Callable[[], int],
        host_netns: Path | None = None,
    ):
        self.workers = workers
        self.runner = runner
        self._addresses = addresses
        self.kubelet_uid = kubelet_uid
        self.host_netns = host_netns
        self._learner = NftLearner(
            workers, runner, [HOST_TABLE], prefix=host_nft_sets(), rejected="HostRuleRejected"
        )
        self._migrated = False

    @property
    def addresses(self) -> AddressSets:
        return self._addresses

    def _ruleset(self) -> str:
        try:
            uid = self.kubelet_uid()
        except LookupError as exc:
            raise DataplaneError("KubeletNotFound", str(exc), retryable=True) from exc
        return host_nft_ruleset(uid)

    def ensure(self) -> Changes:
        ruleset = self._ruleset()
        want = self._learner.learn(ruleset)

        def apply() -> Changes:
            nft = Nft()
            nft.run(host_nft_sets(), rejected="HostRuleRejected")
            have = nft.read([HOST_TABLE])
            if have == want:
                return NO_CHANGES
            nft.run(ruleset, rejected="HostRuleRejected")  # flush keeps the sets' elements
            if nft.read([HOST_TABLE]) != want:
                raise DataplaneError(
                    "RulesNotApplied", "the host table read back differs", retryable=True
                )
            what = "; ".join(differences(have, want))
            return Changes((Change("host-rules", f"nftables {what}: replaced"),))

        changes = _in(self.workers, self.host_netns, apply)
        if not self._migrated:
            changes += self._remove_iptables_host_rules()
            self._migrated = True
        return changes

    def verify(self) -> bool:
        want = self._learner.learn(self._ruleset())
        return _in(self.workers, self.host_netns, lambda: Nft().read([HOST_TABLE]) == want)

    def uninstall(self) -> bool:
        removed = self._addresses.destroy()
        return bool(self._remove_iptables_host_rules()) or removed

    def _remove_iptables_host_rules(self) -> Changes:
        """What the iptables backend left on the host (a node switched): its probe rules, then
        its ipsets, once the nftables rule is in."""
        done: list[Change] = []
        for flavour in (Flavour("nft"), Flavour("legacy")):
            chains = IptablesChains(flavour, self.runner)

            def remove(run: Exec, chains: IptablesChains = chains) -> bool:
                removed = [chains.remove(run, f, failed="HostRuleRemovalFailed") for f in FAMILIES]
                return any(removed)

            try:
                if self.runner.within(self.host_netns, remove):
                    done.append(Change("host-rules", f"{flavour.backend} probe rules removed"))
            except DataplaneError as exc:
                if exc.reason != "CommandNotFound":
                    raise
        if IpsetAddressSets(PROBE_IPSET, self.host_netns).destroy():
            done.append(Change("host-rules", "probe ipsets removed"))
        return Changes(tuple(done))
