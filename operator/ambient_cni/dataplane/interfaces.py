"""The dataplane's seams: what the agent's redirect modes need from the kernel, as Protocols.

Each concern has one small interface and one or more implementations
(`iptables_pod`, `iptables_host`, `ipset`, `routing`, `runner`); the factory
(`factory.py`) assembles a backend from them. Tests put recording fakes in
their place to exercise the algorithms without root.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from ambient_cni.api.models import Backend, SidecarCapture

from .constants import Family
from .node_plan import TunnelKind, ZtunnelPath
from .node_rules import NodeHost
from .redirection import PodRedirect

T = TypeVar("T")


ChangeKind = Literal["rules", "routing", "host-rules", "tunnels", "ztunnel-rules"]


@dataclass(frozen=True)
class Change:
    """One thing an ensure had to change, said for a person."""

    kind: ChangeKind
    what: str


@dataclass(frozen=True)
class Changes:
    """What an ensure changed; empty (and false) when the kernel already held it all."""

    items: tuple[Change, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    def __add__(self, other: Changes) -> Changes:
        return Changes(self.items + other.items)

    def describe(self) -> str:
        return "; ".join(change.what for change in self.items)


NO_CHANGES = Changes()


@dataclass(frozen=True)
class Completed:
    """A finished command: its exit code and what it printed."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


# Runs one command in the namespace it was handed out for: (argv, stdin) -> Completed.
Exec = Callable[[Sequence[str], str | None], Completed]


class Runner(Protocol):
    """Runs commands inside a network namespace: the only place the dataplane starts processes.

    `netns` None is the agent's own namespace. The runner chooses the xtables lock file for
    the namespace (scoped to it, never shared between pods) and turns a missing namespace,
    a missing tool or a timeout into a DataplaneError.
    """

    def within(self, netns: Path | None, work: Callable[[Exec], T]) -> T:
        """Enter `netns` once and call `work` there, with an Exec for commands in it: one
        thread per operation, and in-process work (netlink) may run in `work` too."""
        ...

    def run(
        self, argv: Sequence[str], *, netns: Path | None = None, stdin: str | None = None
    ) -> Completed:
        """One command in `netns`."""
        ...

    def scratch(self) -> AbstractContextManager[Path]:
        """A private, empty network namespace that disappears when the context ends."""
        ...


class Routing(Protocol):
    """The pod's policy routing: `ip rule fwmark 0x111/0xfff pref 32764 lookup 100` and the
    local default route in table 100, per IP family. `netns` None: the caller's own."""

    def ensure(self, netns: Path | None, families: Sequence[Family]) -> Changes:
        """Add what is missing; says what that was."""
        ...

    def present(self, netns: Path | None, families: Sequence[Family]) -> bool: ...

    def remove(self, netns: Path | None, families: Sequence[Family]) -> bool:
        """Remove ours; True if anything was there."""
        ...


class PodDataplane(Protocol):
    """One pod's redirection in its network namespace: rules and policy routing."""

    @property
    def backend(self) -> Backend: ...

    def ensure(self, netns: Path, redirects: Sequence[PodRedirect]) -> Changes:
        """Make the pod's redirection exactly right (one PodRedirect per IP family); says what
        had to change. Raises DataplaneError, having changed nothing when the kernel refuses
        the ruleset."""
        ...

    def verify(self, netns: Path, redirects: Sequence[PodRedirect]) -> bool:
        """Whether the kernel holds exactly the redirection `ensure` would make."""
        ...

    def remove(self, netns: Path, families: Sequence[Family] = (4, 6)) -> bool:
        """Remove all of ours; True if anything was there."""
        ...


class SidecarDataplane(Protocol):
    """A sidecar pod's capture in its network namespace: its rules and, for TPROXY, its
    policy routing (sidecar sheet sections 3-7)."""

    @property
    def backend(self) -> Backend: ...

    def ensure(self, netns: Path, capture: SidecarCapture, families: Sequence[Family]) -> Changes:
        """Make the capture exactly right for these families (and none of ours in others);
        says what had to change. Raises DataplaneError, having changed nothing when the
        kernel refuses the ruleset."""
        ...


class AddressSets(Protocol):
    """Kernel address sets of pod IPs, one per IP family, each entry commented with the UID of
    the pod that owns it (ipset today; nft sets are another implementation)."""

    def at(self, netns: Path | None) -> AddressSets:
        """The same sets in another namespace (a scratch one, to learn rules that use them)."""
        ...

    def create(self) -> None:
        """Create the sets if missing (idempotent)."""
        ...

    def destroy(self) -> bool:
        """Destroy the sets; True if any existed."""
        ...

    def entries(self) -> dict[str, str]:
        """Every entry: IP -> the UID in its comment."""
        ...

    def add(self, ips: Sequence[str], uid: str) -> None:
        """Add or replace these entries, owned by `uid`."""
        ...

    def delete(self, ips: Sequence[str]) -> None:
        """Delete these entries, whoever owns them; absent ones are fine."""
        ...


class HostDataplane(Protocol):
    """The node's side of a redirect mode: its rules and its address sets."""

    @property
    def addresses(self) -> AddressSets: ...

    def ensure(self) -> Changes:
        """Create the sets and make the host rules exactly right; says what had to change."""
        ...

    def verify(self) -> bool: ...

    def uninstall(self) -> bool:
        """Remove the host rules, then the sets; True if anything was there."""
        ...


class NodeModeKernel(Protocol):
    """The legacy node mode's kernel side (node_dataplane.py): the node's chains, set,
    tunnels, routes and rules; the ztunnel pod's side; one pod's set entry and route."""

    @property
    def tunnel_kind(self) -> TunnelKind: ...

    def ztunnel_path(self, ztunnel_ip: str) -> ZtunnelPath:
        """How the node reaches its ztunnel pod; raises DataplaneError when not by a veth."""
        ...

    def ensure_rules(self, host: NodeHost) -> Changes: ...

    def sync_set(self, pods: Mapping[str, str]) -> Changes:
        """The set holds exactly `pods` (IPv4 address -> UID)."""
        ...

    def ensure_tunnels(self, host: NodeHost, pods: Mapping[str, str]) -> Changes: ...

    def ensure_ztunnel(self, netns: Path, ztunnel_ip: str, host_ip: str, port: int) -> Changes: ...

    def add_pod(self, ip: str, uid: str, host: NodeHost) -> Changes: ...

    def remove_pod(self, ip: str) -> bool: ...

    def uninstall(self) -> bool: ...
