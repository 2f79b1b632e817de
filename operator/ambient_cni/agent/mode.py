"""The seam between the agent's orchestration and a redirect mode.

A redirect mode knows the order of operations that puts one pod into the
mesh and takes it out again, and what the node itself needs; the agent
(reconciler.py) only decides when to call it, retries, and reports. Pod
state is immutable: a mode returns a new PodState, and the agent stores it
whole under its lock, so no other thread ever sees a pod half-changed.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ambient_cni.api.models import (
    Backend,
    RedirectMode,
    Repair,
    Workload,
    WorkloadState,
    ZtunnelRef,
)
from ambient_cni.sidecar import describe

from .status import HostPart, PodOutcome


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class PodState:
    """What the agent knows of one pod it handles."""

    workload: Workload  # the last desired entry, kept to undo it after un-enrolment
    outcome: PodOutcome
    netns: Path | None = None  # where its redirection was applied
    annotation: str | None = None  # what we last wrote to ambient.istio.io/redirection
    failures: int = 0  # passes in a row that asked for a retry
    generation: int = -1  # the spec generation it was last reconciled against
    # This pass did the kernel's part, to bring the pod in or take it out; the rest is next.
    kernel_done: Literal["in", "out"] | None = None
    # Which handler holds the pod (a redirect mode's name, or "sidecar"); and, while the
    # node switches modes, the one it is still to leave once the new one holds it.
    handler: str | None = None
    leaving: str | None = None

    @classmethod
    def new(cls, workload: Workload) -> PodState:
        return cls(workload, outcome(workload, "Pending", "Enrolling", None))

    def with_outcome(
        self, state: WorkloadState, reason: str | None, message: str | None
    ) -> PodState:
        """The same pod in another state; `since` moves only when something changed."""
        old = self.outcome
        if (old.state, old.reason, old.message) == (state, reason, message):
            return self
        changed = outcome(self.workload, state, reason, message, old.last_repair)
        return dataclasses.replace(self, outcome=changed)

    def with_repair(self, reason: str, message: str) -> PodState:
        before = self.outcome.last_repair
        count = 1 if before is None else before.times + 1
        repair = Repair(time=now(), reason=reason, message=message[:4096], count=count)
        return dataclasses.replace(
            self, outcome=self.outcome.model_copy(update={"last_repair": repair})
        )


def outcome(
    workload: Workload,
    state: str,
    reason: str | None,
    message: str | None,
    last_repair: Repair | None = None,
) -> PodOutcome:
    return PodOutcome.model_validate(
        {
            "uid": workload.uid,
            "name": workload.name,
            "namespace": workload.namespace,
            "state": state,
            "reason": reason,
            "message": message,
            "since": now(),
            "last_repair": last_repair,
            "capture": describe(workload.sidecar) if workload.sidecar else None,
        }
    )


@dataclass(frozen=True)
class Step:
    """Where one pass left a pod: `state` None means it is fully out and forgotten; `retry`
    is the base delay before another pass (doubled for each retry in a row); `more` asks
    for the pass to go on once the pods already waiting had theirs (a mode may do the
    kernel's part for a whole burst of pods first); `applied`: a mode that does it all in
    one pass put the pod's redirection in place in this one (a CNI ADD waits for that)."""

    state: PodState | None
    retry: float | None = None
    more: bool = False
    applied: bool = False


@dataclass(frozen=True)
class HostReport:
    ok: bool
    message: str = ""
    changed: bool = False
    parts: tuple[HostPart, ...] = ()  # conditions beyond HostRulesReady (node mode's)
    requeue_pods: bool = False  # the node's side changed under the pods: give each a pass
    # The mode took `prune_to` even though the node's side is not in place yet (node mode
    # waiting for its ztunnel pod): the agent's first pass is done all the same.
    prune_taken: bool = False
    # What was put back on the node after it had been in place (a repair of drift, never the
    # first apply), in words; the agent records it as an Event.
    repaired: str = ""


@dataclass(frozen=True)
class NodeDefaults:
    """Node-wide settings from the spec that a pod's entry may override, and the node's
    ztunnel pod."""

    dns_capture: bool = True
    ztunnel: ZtunnelRef | None = None


class PodHandler(Protocol):
    """What brings one pod in and takes it out: a redirect mode, or sidecar capture."""

    def enrol(self, pod: PodState, defaults: NodeDefaults) -> Step:
        """Bring the pod to fully redirected (idempotent: a pass over a redirected pod changes
        nothing); report failures in the returned state, never by raising."""
        ...

    def unenrol(
        self, pod: PodState, ips_held_by_others: Set[str], *, keep_annotation: bool = False
    ) -> Step:
        """Take the pod out, in the reverse order; never touch an address another pod holds.
        `keep_annotation`: another mode holds the pod already (a switch of modes)."""
        ...


class RedirectModeHandler(PodHandler, Protocol):
    @property
    def name(self) -> RedirectMode: ...

    @property
    def backend(self) -> Backend: ...

    def ensure_host(self, prune_to: Mapping[str, str] | None, defaults: NodeDefaults) -> HostReport:
        """Make the node's side right; with `prune_to` (IP -> pod UID), also drop every address
        set entry not in it (after a restart: pods that left while the agent was away)."""
        ...

    def uninstall_host(self) -> bool:
        """Remove the node's side; True if anything was there."""
        ...
