"""When the agent re-checks what it put in the kernel: on the kernel's word, and on a clock.

Where the backend's kernel announces changes (nftables, iptables-nft: rules,
and the pods' policy routing), each pod's namespace is watched and re-checked
when it changes, alone; every pod is re-checked whole only every `resync`
seconds, the safety net (Calico felix re-checks every 90 s). Where it
announces nothing (legacy iptables), or a namespace could not be watched, a
pod is polled every `poll` seconds (`--drift-interval`), as before. The node's
own side is one pass whatever the number of pods, and partly announced by
nobody (ipsets, node mode's tunnels): it is re-checked every `poll` seconds,
and at once when its rules change. Pure bookkeeping: the reconciler asks `due`
on each tick of its drift thread and acts on the answer.
"""

from __future__ import annotations

import threading
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from .interfaces import KernelChanges

HOST = "host"  # the key of the node's own namespace, beside pod UIDs


@dataclass(frozen=True)
class Due:
    """What one tick re-checks: these pods, the host's rules, and (on a full pass) status."""

    pods: frozenset[str] = frozenset()
    host: bool = False
    full: bool = False


class DriftSchedule:
    def __init__(self, *, poll: float, resync: float, announces: bool, now: float):
        if poll <= 0 or resync <= 0:
            raise ValueError("drift and resync intervals must be positive")
        self.poll = poll
        self.resync = resync
        self.announces = announces
        self._next_full = now + self.full_every

    @property
    def full_every(self) -> float:
        """Seconds between passes over every pod."""
        return self.resync if self.announces else self.poll

    @property
    def tick(self) -> float:
        """Seconds between the drift thread's wake-ups."""
        return self.poll

    def due(self, now: float, pods: Set[str], watched: Set[str]) -> Due:
        """At a tick: the host; every pod and status when a full pass is due, else only the
        pods the kernel announces no changes of (not in `watched`)."""
        if now >= self._next_full:
            self._next_full = now + self.full_every
            return Due(frozenset(pods), host=True, full=True)
        return Due(frozenset(pods - watched), host=True)

    def describe(self, backend: str) -> str:
        if self.announces:
            return (
                f"{backend} announces rule changes: each pod is re-checked when its rules or"
                f" policy routing change, and every {self.resync:g} s (--resync-interval);"
                f" the node's side every {self.poll:g} s (--drift-interval) and on a change"
            )
        return (
            f"{backend} announces nothing: every pod is re-checked every {self.poll:g} s"
            " (--drift-interval)"
        )


class Watches:
    """Which namespace each key is watched in, through a KernelChanges; a key the source
    could not watch is not `watching` (the kernel says nothing of it: it is polled).
    Idempotent: watching a key where it is watched already costs a dictionary lookup."""

    def __init__(self, source: KernelChanges):
        self.source = source
        self._lock = threading.Lock()
        self._netns: dict[str, Path | None] = {}
        self._watching: set[str] = set()

    def watch(self, key: str, netns: Path | None) -> None:
        """Watch `key` in `netns` from now on (the agent's own for the host)."""
        with self._lock:
            if key in self._netns and self._netns[key] == netns:
                return
        watched = self.source.watch(key, netns)
        with self._lock:
            self._netns[key] = netns
            if watched:
                self._watching.add(key)
            else:
                self._watching.discard(key)

    def drop(self, key: str) -> None:
        with self._lock:
            if key not in self._netns:
                return
            del self._netns[key]
            self._watching.discard(key)
        self.source.unwatch(key)

    def watching(self) -> set[str]:
        """The keys the kernel announces changes of."""
        with self._lock:
            return set(self._watching)
