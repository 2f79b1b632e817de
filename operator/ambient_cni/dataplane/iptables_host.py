"""The host side of in-pod mode with iptables: the probe SNAT rule per family over the probe
address sets (reference section 2.2), in the node's network namespace."""

from __future__ import annotations

from pathlib import Path

from .constants import Family
from .interfaces import NO_CHANGES, AddressSets, Changes, Exec, Runner
from .iptables_chains import IptablesChains
from .iptables_flavour import Flavour
from .iptables_rules import host_ruleset

FAMILIES: tuple[Family, ...] = (4, 6)


class IptablesHostDataplane:
    def __init__(
        self,
        flavour: Flavour,
        runner: Runner,
        addresses: AddressSets,
        host_netns: Path | None = None,
    ):
        self.runner = runner
        self.chains = IptablesChains(flavour, runner)
        self._addresses = addresses
        self.host_netns = host_netns

    @property
    def addresses(self) -> AddressSets:
        return self._addresses

    def _prepare(self, scratch: Path) -> None:
        self._addresses.at(scratch).create()  # the SNAT rule matches on the set

    def ensure(self) -> Changes:
        self._addresses.create()
        rulesets = {family: host_ruleset(family) for family in FAMILIES}
        for family, ruleset in rulesets.items():
            self.chains.learn(family, ruleset, prepare=self._prepare, rejected="HostRuleRejected")

        def apply(run: Exec) -> Changes:
            changes = NO_CHANGES
            for family, ruleset in rulesets.items():
                changes += self.chains.ensure(
                    run, family, ruleset, rejected="HostRuleRejected", kind="host-rules"
                )
            return changes

        return self.runner.within(self.host_netns, apply)

    def verify(self) -> bool:
        wanted = {
            family: self.chains.learn(family, host_ruleset(family), prepare=self._prepare)
            for family in FAMILIES
        }
        return self.runner.within(
            self.host_netns,
            lambda run: all(self.chains.read(run, f) == want for f, want in wanted.items()),
        )

    def uninstall(self) -> bool:
        """The rules first: a set in use by a rule cannot be destroyed."""

        def remove(run: Exec) -> bool:
            removed = False
            for family in FAMILIES:
                removed |= self.chains.remove(run, family, failed="HostRuleRemovalFailed")
            return removed

        removed = self.runner.within(self.host_netns, remove)
        return self._addresses.destroy() or removed
