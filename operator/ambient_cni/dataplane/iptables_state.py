"""What iptables holds in a network namespace: pure functions over iptables-save text."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .constants import OUTPUT_CHAIN, POSTROUTING_CHAIN, PREROUTING_CHAIN

OUR_CHAINS = (PREROUTING_CHAIN, OUTPUT_CHAIN, POSTROUTING_CHAIN)
Tables = dict[str, list[str]]


@dataclass(frozen=True)
class Ownership:
    """What of a namespace's iptables is ours: our chains and every rule that names one,
    and every rule of the built-in chains in `builtin_rules` of the tables in
    `builtin_tables` (a sidecar's capture puts rules straight into nat, mangle and raw
    PREROUTING and OUTPUT, some naming no chain of ours)."""

    chains: frozenset[str]
    builtin_rules: frozenset[str] = frozenset()
    builtin_tables: frozenset[str] = frozenset()

    def owns(self, table: str, rule: str) -> bool:
        words = rule.split()
        if words[1] in self.builtin_rules and table in self.builtin_tables:
            return True
        return any(c in words for c in self.chains)


INPOD = Ownership(frozenset(OUR_CHAINS))


def parse_save(saved: str) -> dict[str, tuple[list[str], list[str]]]:
    """Per table: (declared chains, rules) of iptables-save output."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    current: str | None = None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
            tables[current] = ([], [])
        elif current is None or line.startswith(("#", "COMMIT")) or not line.strip():
            continue
        elif line.startswith(":"):
            tables[current][0].append(line[1:].split()[0])
        elif line.startswith("-A "):
            tables[current][1].append(line)
    return tables


def our_rules(saved: str, owned: Ownership = INPOD) -> Tables:
    """Only what this project owns: our chains and the rules that jump to or live in them."""
    result: Tables = {}
    for table, (chains, rules) in parse_save(saved).items():
        mine = [f":{chain}" for chain in chains if chain in owned.chains]
        mine += [rule for rule in rules if owned.owns(table, rule)]
        if mine:
            result[table] = mine
    return result


def removal_input(saved: str, owned: Ownership = INPOD) -> str:
    """iptables-restore --noflush input removing all of ours in `saved`, and nothing else."""
    lines: list[str] = []
    for table, (chains, rules) in parse_save(saved).items():
        ours = [chain for chain in chains if chain in owned.chains]
        jumps = [
            rule
            for rule in rules
            if owned.owns(table, rule) and rule.split()[1] not in owned.chains
        ]
        if not ours and not jumps:
            continue
        lines.append(f"*{table}")
        lines += ["-D" + jump[2:] for jump in jumps]
        lines += [f"-F {chain}" for chain in ours]
        lines += [f"-X {chain}" for chain in ours]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def replace_input(saved: str, ruleset: str, owned: Ownership = INPOD) -> str:
    """One transaction per table: remove what is there of ours, then add the ruleset."""
    removal = {_table(block): block for block in _blocks(removal_input(saved, owned))}
    merged: list[str] = []
    for block in _blocks(ruleset):
        old = removal.pop(_table(block), None)
        if old is None:
            merged.append(block)
        else:
            # Drop the first block's COMMIT so removal and re-add commit together.
            merged.append(old.rsplit("COMMIT", 1)[0] + block.split("\n", 1)[1])
    merged += removal.values()  # tables ours no longer uses (e.g. raw without DNS capture)
    return "".join(merged)


def _table(block: str) -> str:
    """The table a restore block is for: `*nat` and Istio's `* nat` alike."""
    return block.split("\n", 1)[0][1:].strip()


def _blocks(restore_input: str) -> list[str]:
    blocks: list[str] = []
    current: list[str] = []
    for line in restore_input.splitlines():
        current.append(line)
        if line == "COMMIT":
            blocks.append("\n".join(current) + "\n")
            current = []
    return blocks


def differences(have: Tables, want: Tables) -> list[str]:
    """What differs between two sets of our rules, per table, for a person: "nat: 10 of our
    rules missing", "raw: 2 unexpected"."""
    found: list[str] = []
    for table in sorted(set(have) | set(want)):
        present, wanted = Counter(have.get(table, [])), Counter(want.get(table, []))
        missing = sum((wanted - present).values())
        unexpected = sum((present - wanted).values())
        parts = [f"{missing} of our rules missing"] if missing else []
        parts += [f"{unexpected} unexpected"] if unexpected else []
        if not parts and have.get(table) != want.get(table):
            parts = ["out of order"]
        if parts:
            found.append(f"{table}: {', '.join(parts)}")
    return found
