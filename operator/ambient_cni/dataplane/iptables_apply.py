"""Applying in-pod rules: iptables-restore inside a pod's netns, ip rule and route by netlink.

Every kernel call for a pod runs on a dedicated thread that entered the pod's
network namespace; child processes started there inherit it. Each apply is
one `iptables-restore --noflush` per IP family that removes what is there of
ours and adds the full ruleset in the same transaction, with a lock file
scoped to the pod (never the host's /run/xtables.lock). What "correct"
looks like is learned once per ruleset variant by applying it in a private
throwaway namespace and reading it back, so comparisons are exact whatever
the iptables version prints.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ambient_cni.netns import NetnsError, netns_path, run_in_netns, run_in_new_netns

from .constants import BACKENDS, CONN_MARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY, Family
from .iptables_rules import PodRedirect, pod_ruleset
from .iptables_state import Tables, our_rules, removal_input, replace_input

FlavourName = Literal["nft", "legacy"]
T = TypeVar("T")
RESTORE_TIMEOUT = 30.0
RT_SCOPE_HOST = 254  # local routes are host-scoped


class ApplyError(RuntimeError):
    """The kernel (or iptables) refused; `reason` is CamelCase for status, message is theirs."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class Flavour:
    name: FlavourName

    def tool(self, family: Family, verb: Literal["save", "restore"]) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return f"{base}-{self.name}-{verb}"

    @property
    def backend(self) -> str:
        return f"iptables-{self.name}"


def _count_rules(flavour: Flavour) -> int:
    total = 0
    for family in (4, 6):
        try:
            out = subprocess.run(
                [flavour.tool(family, "save")],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
        except FileNotFoundError:
            return -1
        total += sum(1 for line in out.splitlines() if line.startswith("-A "))
    return total


def detect_flavour(host_netns: str | Path | None = None) -> Flavour:
    """The flavour the host already uses (more rules wins); nft when neither has rules."""

    def count() -> tuple[int, int]:
        return _count_rules(Flavour("legacy")), _count_rules(Flavour("nft"))

    legacy, nft = count() if host_netns is None else run_in_netns(host_netns, count)
    return Flavour("legacy") if legacy > max(nft, 0) else Flavour("nft")


def flavour_for(backend: str, host_netns: str | Path | None = None) -> Flavour:
    """The flavour a `--backend` choice names; `auto` follows what the host uses."""
    if backend == "auto":
        return detect_flavour(host_netns)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return Flavour("nft" if backend == "iptables-nft" else "legacy")


def run_iptables(argv: list[str], stdin: str | None, lock: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XTABLES_LOCKFILE": lock}
    try:
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=RESTORE_TIMEOUT,
            env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ApplyError("IptablesMissing", f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ApplyError(
            "IptablesTimeout", f"{argv[0]} took over {RESTORE_TIMEOUT:.0f}s", retryable=True
        ) from exc


# Namespaces remembered as already applied to; past this, forget them all (the cost of
# forgetting is one fast-path attempt that fails, per pod, the next time it is ensured).
TOUCHED_LIMIT = 65536


class PodRules:
    """Ensures, checks and removes one pod's redirection in its network namespace."""

    def __init__(self, flavour: Flavour):
        self.flavour = flavour
        self._canonical: dict[PodRedirect, Tables] = {}
        # (netns inode, family) this process has applied to: not worth a fast-path try again.
        self._touched: set[tuple[int, Family]] = set()
        self._lock = threading.Lock()
        self._scratch_lock = str(Path(tempfile.gettempdir()) / "ambient-cni-scratch.xtables.lock")

    # -- what correct looks like -------------------------------------------------------------

    def canonical(self, redirect: PodRedirect) -> Tables:
        with self._lock:
            known = self._canonical.get(redirect)
        if known is not None:
            return known

        def learn() -> Tables:
            ruleset = pod_ruleset(redirect)
            restored = run_iptables(
                [self.flavour.tool(redirect.family, "restore"), "--noflush"],
                ruleset,
                self._scratch_lock,
            )
            if restored.returncode != 0:
                raise ApplyError("RuleRejected", first_error(restored.stderr))
            saved = run_iptables(
                [self.flavour.tool(redirect.family, "save")], None, self._scratch_lock
            )
            return our_rules(saved.stdout)

        tables = run_in_new_netns(learn)
        with self._lock:
            self._canonical[redirect] = tables
        return tables

    # -- per pod ---------------------------------------------------------------------------------

    def current(self, netns: str | Path, family: Family) -> Tables:
        path = netns_path(netns)
        saved = _inside(
            path, lambda: run_iptables([self.flavour.tool(family, "save")], None, str(path))
        )
        return our_rules(saved.stdout)

    def in_sync(self, netns: str | Path, redirect: PodRedirect) -> bool:
        return self.current(netns, redirect.family) == self.canonical(redirect)

    def ensure(self, netns: str | Path, redirects: list[PodRedirect]) -> bool:
        """Make the pod's rules, ip rule and route exactly right; True if anything changed."""
        changed = False
        for redirect in redirects:
            changed |= self._ensure_family(netns, redirect)
        changed |= _inside(netns_path(netns), lambda: ensure_routing([r.family for r in redirects]))
        return changed

    def _ensure_family(self, netns: str | Path, redirect: PodRedirect) -> bool:
        # Learnt once per variant in a scratch netns: a ruleset the kernel refuses fails
        # here, before anything touches the pod (a restore commits table by table).
        want = self.canonical(redirect)
        path = netns_path(netns)
        family = redirect.family

        first_time = (_inode(path), family) not in self._touched

        def apply() -> bool:
            if first_time:
                # Fast path, one process: the ruleset creates its chains with -N, so it fails
                # on a namespace that already has them (a table that had none may have been
                # added); the careful path below then reads and replaces, table by table.
                fresh = run_iptables(
                    [self.flavour.tool(family, "restore"), "--noflush"],
                    pod_ruleset(redirect),
                    str(path),
                )
                if fresh.returncode == 0:
                    return True
            saved = run_iptables([self.flavour.tool(family, "save")], None, str(path)).stdout
            if our_rules(saved) == want:
                return False
            restored = run_iptables(
                [self.flavour.tool(family, "restore"), "--noflush"],
                replace_input(saved, pod_ruleset(redirect)),
                str(path),
            )
            if restored.returncode != 0:
                raise ApplyError("RuleRejected", first_error(restored.stderr))
            after = our_rules(
                run_iptables([self.flavour.tool(family, "save")], None, str(path)).stdout
            )
            if after != want:
                raise ApplyError(
                    "RulesNotApplied",
                    "the rules read back differ from those applied",
                    retryable=True,
                )
            return True

        changed = _inside(path, apply)
        with self._lock:
            if len(self._touched) >= TOUCHED_LIMIT:  # only a hint: pods come and go
                self._touched.clear()
            self._touched.add((_inode(path), family))
        return changed

    def remove(self, netns: str | Path, families: tuple[Family, ...] = (4, 6)) -> bool:
        """Remove all of ours (chains, jumps, ip rule, route); True if anything was there."""
        path = netns_path(netns)

        def remove_all() -> bool:
            removed = False
            for family in families:
                saved = run_iptables([self.flavour.tool(family, "save")], None, str(path)).stdout
                script = removal_input(saved)
                if not script:
                    continue
                result = run_iptables(
                    [self.flavour.tool(family, "restore"), "--noflush"], script, str(path)
                )
                if result.returncode != 0:
                    raise ApplyError(
                        "RuleRemovalFailed", first_error(result.stderr), retryable=True
                    )
                removed = True
            return remove_routing(families) or removed

        return _inside(path, remove_all)


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def _inside(path: Path, fn: Callable[[], T]) -> T:
    try:
        return run_in_netns(path, fn)
    except NetnsError as exc:
        raise ApplyError("NetnsNotFound", f"network namespace {path}: {exc.strerror}") from exc


def _loopback_route_dst(family: Family) -> str:
    return "0.0.0.0/0" if family == 4 else "::/0"


def _ipv6_on_loopback() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def ensure_routing(families: list[Family]) -> bool:
    """ip rule fwmark 0x111/0xfff pref 32764 lookup 100; local default route in table 100."""
    changed = False
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in families:
            if family == 6 and not _ipv6_on_loopback():
                continue
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            if not _our_rules(ipr, af):
                ipr.rule("add", **_rule_spec(af))
                changed = True
            if not ipr.route("dump", family=af, table=ROUTE_TABLE):
                ipr.route("replace", oif=lo, **_route_spec(af, family))
                changed = True
    return changed


def _rule_spec(af: int) -> dict[str, Any]:
    """ip rule fwmark 0x111/0xfff pref 32764 lookup 100, as added and as deleted."""
    return {
        "family": af,
        "fwmark": CONN_MARK,
        "fwmask": MARK_MASK,
        "priority": RULE_PRIORITY,
        "table": ROUTE_TABLE,
    }


def _route_spec(af: int, family: Family) -> dict[str, Any]:
    """The local default route in table 100, as added and as deleted."""
    return {
        "family": af,
        "dst": _loopback_route_dst(family),
        "type": "local",
        "scope": RT_SCOPE_HOST,
        "table": ROUTE_TABLE,
    }


def _our_rules(ipr: IPRoute, af: int) -> list[Any]:
    return [
        rule
        for rule in ipr.get_rules(family=af)
        if rule.get("priority") == RULE_PRIORITY and rule.get("table") == ROUTE_TABLE
    ]


def remove_routing(families: tuple[Family, ...]) -> bool:
    removed = False
    with IPRoute() as ipr:
        for family in families:
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            for _rule in _our_rules(ipr, af):
                with contextlib.suppress(NetlinkError):
                    ipr.rule("del", **_rule_spec(af))
                    removed = True
            for _route in ipr.route("dump", family=af, table=ROUTE_TABLE):
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", **_route_spec(af, family))
                    removed = True
    return removed


def first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return "; ".join(lines[:3]) or "iptables-restore failed without a message"
