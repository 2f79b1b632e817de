"""The node agent's reconciler: its node's AmbientNodeConfig spec in, a redirect mode applied,
status out.

Orchestration only. Each pod is reconciled on its own, level-based, on
worker threads through a keyed queue, so one slow or broken pod never stalls
the others; failures are retried with a per-pod backoff. What is done to a
pod, and in which order, belongs to the redirect mode (inpod.py); the
kernel to the dataplane behind it; the API server to the status writer.
Pod states are immutable and replaced whole under the lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ambient_cni.api.models import (
    AmbientNodeConfigSpec,
    AmbientNodeConfigStatus,
    Backend,
    Condition,
    RedirectMode,
    Workload,
)
from ambient_cni.api.version import operator_version
from ambient_cni.install_report import InstallReport
from ambient_cni.mergepatch import merge_patch
from ambient_cni.selection import SelectionConfig
from ambient_cni.workqueue import WorkQueue

from . import events, metrics
from .drift import HOST, DriftSchedule, Watches
from .interfaces import (
    KernelChanges,
    NoAnnouncements,
    NodeEvents,
    StatusWriteError,
    StatusWriter,
    Ztunnel,
)
from .mode import (
    NodeDefaults,
    PodHandler,
    PodState,
    RedirectModeHandler,
    Step,
    now,
    outcome,
)
from .status import HostPart, NodeFacts, PodOutcome, render

log = logging.getLogger("ambient_cni.agent")

STATUS_DEBOUNCE = 0.2
# While pods wait in the queue, status waits for them, but never longer than this: a burst of
# 250 pods costs a handful of status writes (each carries every pod), not one per debounce.
STATUS_BUSY_MAX_DELAY = 1.0
MAX_BACKOFF = 30.0
HOST_RETRY = 5.0
# A pod enrolled at its CNI ADD, before the controller listed it, is held as wanted at
# least this long, and until a spec newer than the one at its ADD leaves it out (it left
# the mesh meanwhile): a controller that is slow or away un-enrols nobody.
CNI_GRACE = 30.0
# Seconds a change the kernel announced on the node waits for its pass, gathering others.
HOST_CHANGE_DELAY = 1.0
STATUS_RETRY = 2.0
# Events tell changes from the status the server held at start; what happens while the
# agent comes up (pods re-applied, ztunnel reconnecting) is told only as it stands once
# that is over, or this long after the start.
EVENTS_SETTLE = 60.0
SIDECAR = "sidecar"  # the handler name of sidecar capture, beside the modes' names
# The mode that leaves state inside pods (the other's is all on the node).
POD_LEVEL_MODE: RedirectMode = "inpod"


@dataclass
class AgentOptions:
    node: str
    zds_socket: Path
    host_netns: Path | None = None
    netns_dir: Path = Path("/run/netns")
    proc: Path = Path("/proc")
    netns_prefix: str = ""
    daemonset: str | None = None  # NAMESPACE/NAME; its deletion at stop means uninstall
    backend: str = "auto"  # auto, or one of dataplane.factory.BACKENDS
    # Seconds between passes over every pod: where the backend's kernel announces nothing
    # (polling); and where it does (the safety net beside its announcements). See drift.py.
    drift_interval: float = 10.0
    resync_interval: float = 90.0
    redirect_modes: tuple[str, ...] = ("inpod", "node")  # the modes this agent applies
    workers: int = 4
    kubelet_uid: int | None = None  # for the nftables probe rule; found in `proc` if None
    cni_run_dir: Path | None = None  # serve the CNI plugin there (None: no plugin)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # CNI ADD decisions


@dataclass(frozen=True)
class _HostState:
    ok: bool = False
    message: str = "not applied yet"
    pruned: bool = False
    parts: tuple[HostPart, ...] = ()


@dataclass(frozen=True)
class _Desired:
    spec: AmbientNodeConfigSpec | None = None
    generation: int = 0


@dataclass(frozen=True)
class _ServerStatus:
    """The object's status as the API server last said it, with the version that said so."""

    status: dict[str, Any] = field(default_factory=dict)
    version: int = 0


class NodeAgent:
    def __init__(
        self,
        options: AgentOptions,
        modes: Mapping[RedirectMode, RedirectModeHandler],
        ztunnel: Ztunnel,
        status_writer: StatusWriter,
        backend: Backend,
        *,
        sidecar: PodHandler | None = None,
        events: NodeEvents | None = None,
        changes: KernelChanges | None = None,
    ):
        """`changes`: where the kernel announces changes to the backend's rules (None: it
        announces none; every pod is polled every drift interval)."""
        self.options = options
        self.modes = dict(modes)
        self.sidecar = sidecar
        self.ztunnel = ztunnel
        self.status_writer = status_writer
        self.events = events
        self.backend = backend
        self.pods: WorkQueue[str] = WorkQueue()  # pod UIDs
        self.host: WorkQueue[Literal["host"]] = WorkQueue()
        self.status: WorkQueue[Literal["status"]] = WorkQueue()
        self._lock = threading.Lock()
        self._desired = _Desired()
        self._records: dict[str, PodState] = {}
        # uid -> (the workload its CNI ADD asked for, held at least until, spec generation then)
        self._cni_added: dict[str, tuple[Workload, float, int]] = {}
        self._host_change_pending = False  # a pass for a change the kernel told is queued
        # For callers waiting on a pass: each pass is numbered when it starts; per pod, the
        # number of the pass that last stored it, and of the last that did its kernel step.
        self._pass_count = 0
        self._passes: dict[str, int] = {}
        self._kernel_passes: dict[str, int] = {}
        self._stored = threading.Condition(self._lock)
        self._host = _HostState()
        self._server = _ServerStatus()
        self._uid = ""  # the object's, for its Events
        # The status last told in Events (None: not one yet); the status worker's own.
        self._told: AmbientNodeConfigStatus | None = None
        self._settled = False  # the agent is past coming up (see EVENTS_SETTLE)
        self._started_at = time.monotonic()
        self._missing_since: float | None = None
        self._status_written_at = float("-inf")
        self._refused_mode: RedirectMode | None = None
        self._cleared: set[str] = set()  # modes whose node side is known removed
        self._from_before: set[str] | None = None  # pods listed in the first spec seen
        # install-cni's last word on the plugin (None: this node runs no CNI plugin)
        self._cni_plugin: InstallReport | None = (
            None
            if options.cni_run_dir is None
            else InstallReport(installed=False, message="install-cni's report not read yet")
        )
        self._stopped = False
        self._stop = threading.Event()
        self._drift: threading.Thread | None = None
        self.changes: KernelChanges = changes or NoAnnouncements()
        self._watches = Watches(self.changes)
        self._schedule = DriftSchedule(
            poll=options.drift_interval,
            resync=options.resync_interval,
            announces=self.changes.announces,
            now=time.monotonic(),
        )

    # -- inputs -----------------------------------------------------------------------------------

    def on_object(self, obj: Mapping[str, Any] | None) -> None:
        """The node's AmbientNodeConfig changed (None: it is gone).

        A missing object means "not known yet", not "nothing wanted": every pod is held as
        it is until a spec says otherwise (the controller re-creates a deleted object).
        """
        with self._lock:
            before = self._desired
            if obj is None:
                self._desired = _Desired()
                self._server = _ServerStatus()
                self._went_missing()
            else:
                try:
                    spec = AmbientNodeConfigSpec.model_validate(obj.get("spec") or {})
                except ValueError as exc:
                    log.error("ignoring an invalid spec for %s: %s", self.options.node, exc)
                    return
                self._came_back()
                self._uid = str(obj.get("metadata", {}).get("uid") or "")
                if self._from_before is None:
                    # The pods the first spec lists were there before this agent started.
                    self._from_before = {w.uid for w in spec.workloads}
                self._desired = _Desired(
                    spec=spec, generation=int(obj["metadata"].get("generation") or 0)
                )
                self._saw_status(obj)
                self._note_mode(spec.redirect_mode)
            spec_changed = before != self._desired
            keys = set(self._records) | {w.uid for w in self._desired_workloads()}
        if spec_changed:
            self._reconcile_all(keys)
        else:
            # Only status changed (our own writes come back this way; or someone else's):
            # no pod needs a pass, status is compared again.
            self._status_soon()

    def _saw_status(self, obj: Mapping[str, Any]) -> None:
        """Keep the status the server holds, unless we know a newer one (caller holds the
        lock): an event can arrive after our own write's answer."""
        version = _version(obj)
        if version >= self._server.version:
            self._server = _ServerStatus(dict(obj.get("status") or {}), version)

    def _went_missing(self) -> None:
        if self._missing_since is None:
            self._missing_since = time.monotonic()
            metrics.OBJECT_MISSING.set(1)
            log.warning(
                "AmbientNodeConfig %s is gone: holding every pod as it is until it is back",
                self.options.node,
            )

    def _came_back(self) -> None:
        if self._missing_since is not None:
            gone = time.monotonic() - self._missing_since
            self._missing_since = None
            metrics.OBJECT_MISSING.set(0)
            metrics.OBJECT_MISSING_SECONDS.inc(gone)
            log.info("AmbientNodeConfig %s is back after %.1f s", self.options.node, gone)

    def _note_mode(self, mode: RedirectMode) -> None:
        """Log a change between a mode this agent has and one it lacks, once (caller holds
        the lock): our own status writes come back as events too."""
        refused = None if mode in self.modes else mode
        if refused != self._refused_mode:
            if refused is not None:
                log.error(
                    "redirectMode %s is not supported by this agent; every pod is kept as it is",
                    refused,
                )
            else:
                log.info("redirectMode %s: reconciling again", mode)
            self._refused_mode = refused

    def ztunnel_changed(self) -> None:
        """A new session holds the snapshot: pending pods can complete; a lost one shows."""
        with self._lock:
            keys = {w.uid for w in self._desired_workloads()}
        self._reconcile_all(keys)

    def cni_plugin_changed(self, report: InstallReport) -> None:
        """install-cni said whether istio-cni is installed: part of the node's Ready."""
        with self._lock:
            changed = report != self._cni_plugin
            self._cni_plugin = report
        if changed:
            self._status_soon()

    def _reconcile_all(self, keys: set[str]) -> None:
        for key in keys:
            self.pods.add(key)
        self.host.add("host")
        self._status_soon()

    def _mode(self) -> RedirectModeHandler | None:
        """The mode the spec asks for, if this agent has it (caller holds the lock)."""
        spec = self._desired.spec
        return None if spec is None else self.modes.get(spec.redirect_mode)

    def _desired_workloads(self) -> list[Workload]:
        """The spec's workloads, and pods enrolled at their CNI ADD that it does not list
        yet (caller holds the lock)."""
        spec = self._desired.spec
        wanted = list(spec.workloads) if spec is not None else []
        index = {w.uid: i for i, w in enumerate(wanted)}
        now_ = time.monotonic()
        for uid, (workload, until, generation) in list(self._cni_added.items()):
            listed = index.get(uid)
            if listed is not None and wanted[listed].ips == workload.ips:
                del self._cni_added[uid]  # the spec has caught up with the sandbox
            elif listed is not None:
                wanted[listed] = workload  # a new sandbox: its addresses are the current ones
            elif now_ >= until and self._desired.generation > generation:
                del self._cni_added[uid]  # a newer spec leaves it out: it left the mesh
            else:
                wanted.append(workload)
        return wanted

    # -- the CNI plugin ---------------------------------------------------------------------------

    def enrol_now(self, workload: Workload, timeout: float) -> PodOutcome:
        """Enrol a pod at its CNI ADD, before the controller lists it, and wait (at most
        `timeout`) for a pass begun after this call to finish it. Enrolled only when such a
        pass did the kernel's part and all the rest; an older outcome never counts."""
        uid = workload.uid
        with self._lock:
            if self._mode() is None and workload.sidecar is None:
                return outcome(
                    workload, "Failed", "NoSpec", f"no usable spec for {self.options.node} yet"
                )
            generation = self._desired.generation
            self._cni_added[uid] = (workload, time.monotonic() + CNI_GRACE, generation)
            asked = self._pass_count  # passes numbered above this began after the ADD
        self.pods.add(uid)
        self.pods.add_after(uid, CNI_GRACE + 1.0)  # to let it go then, if it left the mesh
        deadline = time.monotonic() + timeout
        with self._stored:
            while True:
                record = self._records.get(uid)
                if record is not None and not record.kernel_done:
                    state = record.outcome.state
                    if state == "Enrolled" and self._kernel_passes.get(uid, 0) > asked:
                        return record.outcome
                    if state == "Failed" and self._passes.get(uid, 0) > asked:
                        return record.outcome
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if record is not None and record.outcome.state in ("Pending", "Failed"):
                        return record.outcome  # its reason (ztunnel away, ...) says why
                    return outcome(workload, "Pending", "Enrolling", "not enrolled in time")
                self._stored.wait(remaining)

    def state(self, uid: str) -> str | None:
        with self._lock:
            record = self._records.get(uid)
        return None if record is None else record.outcome.state

    def cni_deleted(self, uid: str) -> None:
        """The pod's sandbox is gone: a pod only its CNI ADD asked for is not wanted now."""
        with self._lock:
            if self._cni_added.pop(uid, None) is None:
                return
        self.pods.add(uid)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; ZDS is served by the caller once `initial_pass_done`."""
        self._started_at = time.monotonic()
        self.pods.start(
            self._reconcile_pod, workers=self.options.workers, name="agent-pod", retry_after=5.0
        )
        self.host.start(self._reconcile_host, name="agent-host", retry_after=HOST_RETRY)
        self.status.start(self._write_status, name="agent-status", retry_after=STATUS_RETRY)
        self._schedule = DriftSchedule(
            poll=self.options.drift_interval,
            resync=self.options.resync_interval,
            announces=self.changes.announces,
            now=time.monotonic(),
        )
        metrics.DRIFT_ANNOUNCED.set(1 if self.changes.announces else 0)
        log.info("drift: %s", self._schedule.describe(self.backend))
        self.changes.start(self._kernel_changed)
        self._watch(HOST, self.options.host_netns)
        self._drift = threading.Thread(target=self._drift_loop, name="agent-drift", daemon=True)
        self._drift.start()

    def initial_pass_done(self) -> bool:
        """The spec is known, its mode supported, host rules were tried and every desired pod
        was reconciled once."""
        with self._lock:
            if self._mode() is None:
                return False
            done = {uid for uid, r in self._records.items() if r.generation >= 0}
            return self._host.pruned and {w.uid for w in self._desired_workloads()} <= done

    def mode_supported(self) -> bool:
        with self._lock:
            return self._desired.spec is None or self._mode() is not None

    def stop(self) -> None:
        """Leave every pod's redirection in place (traffic keeps flowing); stop the workers;
        say in status that the node is not Ready while no agent runs (new pods wait)."""
        self._stop.set()
        for queue in (self.pods, self.host, self.status):
            queue.join()
        if self._drift is not None:
            self._drift.join(timeout=10)
        self.changes.close()
        with self._lock:
            self._stopped = True
        try:
            self._write_status("status")
        except Exception as exc:  # the API may be what is going away; stopping goes on
            log.warning("could not say in status that the agent stopped: %s", exc)

    def _drift_loop(self) -> None:
        """Re-check what the kernel does not announce, on each tick; everything, on a full
        pass (drift.py says when)."""
        while not self._stop.wait(self._schedule.tick):
            with self._lock:
                keys = {w.uid for w in self._desired_workloads()}
            due = self._schedule.due(time.monotonic(), keys, self._watches.watching())
            for key in due.pods:
                self.pods.add(key)
            if due.host:
                self.host.add("host")
            if due.full:
                self._status_soon()  # and status against the server's, in case it was edited

    def _kernel_changed(self, key: str) -> None:
        """The kernel announced a change (not ours) in a watched namespace: re-check it, and
        only it."""
        if key == HOST:
            metrics.KERNEL_CHANGES.labels("host").inc()
            # The node's tables change often for others' reasons (kube-proxy, the CNI):
            # one pass per HOST_CHANGE_DELAY at most, however many commits come.
            with self._lock:
                pending, self._host_change_pending = self._host_change_pending, True
            if not pending:
                self.host.add_after("host", HOST_CHANGE_DELAY)
            return
        with self._lock:
            known = key in self._records
        if known:
            metrics.KERNEL_CHANGES.labels("pod").inc()
            self.pods.add(key)

    def _watch(self, key: str, netns: Path | None) -> None:
        self._watches.watch(key, netns)
        metrics.WATCHED_NAMESPACES.set(len(self._watches.watching()))

    def _unwatch(self, key: str) -> None:
        self._watches.drop(key)
        metrics.WATCHED_NAMESPACES.set(len(self._watches.watching()))

    # -- the node ---------------------------------------------------------------------------------

    def _reconcile_host(self, _key: str) -> None:
        with self._lock:
            self._host_change_pending = False  # what comes from here on is heard anew
            mode = self._mode()
            first = not self._host.pruned
            wanted = {
                ip: w.uid for w in self._desired_workloads() if w.sidecar is None for ip in w.ips
            }
            defaults = self._defaults()
        if mode is None:
            return  # no spec yet, or a mode this agent lacks: touch nothing
        report = mode.ensure_host(wanted if first else None, defaults)
        self._cleared.discard(mode.name)
        self._clear_other_modes(mode.name)
        with self._lock:
            before = self._host
            self._host = _HostState(
                ok=report.ok,
                message=report.message,
                pruned=before.pruned or report.ok or report.prune_taken,
                parts=report.parts,
            )
            changed = (before.ok, before.message, before.parts) != (
                self._host.ok,
                self._host.message,
                self._host.parts,
            )
            keys = {w.uid for w in self._desired_workloads()} if report.requeue_pods else set()
        for key in keys:
            self.pods.add(key)
        if not report.ok:
            self.host.add_after("host", HOST_RETRY)
        if report.repaired:
            self._tell_now(
                events.EventNote(
                    "Warning", "DriftRepaired", f"the node's rules repaired: {report.repaired}"
                )
            )
        if changed:
            if not report.ok:
                log.error("the node's own rules are not in place: %s", report.message)
            self._status_soon()

    def _clear_other_modes(self, current: str) -> None:
        """Once no pod is held by another mode, its node side goes (after a switch, or a
        restart in another mode than the node had); decided on what is true right now."""
        for name, other in self.modes.items():
            if name == current or name in self._cleared:
                continue
            with self._lock:
                if self._mode() is None or self._mode().name != current:  # type: ignore[union-attr]
                    return  # the spec moved on meanwhile: the next pass decides
                in_use = {r.handler for r in self._records.values()}
                in_use |= {r.leaving for r in self._records.values()}
                if any(uid not in self._records for uid in self._from_before or ()):
                    in_use.add(POD_LEVEL_MODE)  # pods from before the start, not yet seen
            if name in in_use:
                continue
            try:
                if other.uninstall_host():
                    log.info("removed what %s mode had on the node", name)
            except Exception:  # the next pass tries again; this one goes on
                log.exception("could not remove what %s mode had on the node", name)
                self.host.add_after("host", HOST_RETRY)
                continue
            self._cleared.add(name)

    # -- one pod ----------------------------------------------------------------------------------

    def _reconcile_pod(self, uid: str) -> None:
        with self._lock:
            self._pass_count += 1
            number = self._pass_count
            mode = self._mode()
            desired = {w.uid: w for w in self._desired_workloads()}.get(uid)
            record = self._records.get(uid)
            generation = self._desired.generation
            defaults = self._defaults()
            from_before = record is None and uid in (self._from_before or set())
            # Addresses other pods hold: only a pod on its way out needs them (O(pods)).
            leaving = record is not None and (
                desired is None
                or record.leaving is not None
                or _kind(desired) != _kind(record.workload)
            )
            held = _ips_held(self._records, but=uid) if leaving else set()
        workload = desired or (record.workload if record else None)
        if workload is None or (mode is None and workload.sidecar is None):
            return  # no such pod; or no spec yet, or a mode this agent lacks: kept as it is
        want = self._wanted_handler(mode, desired)
        started = time.monotonic()
        if record is not None and record.leaving and (desired is None or _held_by(record, want)):
            self._leave(uid, record, held, number, wanted=desired is not None)
        elif (
            desired is not None and record is not None and _kind(desired) != _kind(record.workload)
        ):
            # A pod that became a sidecar pod, or stopped being one, leaves the old way first
            # (both ways write the pod's own chains: they cannot overlap).
            step = self._holder(record, mode).unenrol(record, held)
            self._store(uid, step, None, number)
            if step.state is None:
                self.pods.add(uid)  # out the old way: in the new one
        elif desired is not None and want is not None:
            self._enrol(
                record,
                desired,
                want=want,
                defaults=defaults,
                from_before=from_before,
                generation=generation,
                number=number,
            )
        elif record is not None:
            step = self._holder(record, mode).unenrol(record, held)
            if not step.more:
                metrics.POD_RECONCILES.labels("Removed" if step.state is None else "Removing").inc()
            self._store(uid, step, None, number)
        else:
            return
        metrics.POD_RECONCILE_SECONDS.observe(time.monotonic() - started)
        with self._lock:
            after = self._records.get(uid)
        if _reported(after) != _reported(record):
            # Status only when what it says of the pod changed: a pass that found the pod
            # right (most of a resync) renders nothing.
            self._status_soon()

    def _enrol(
        self,
        record: PodState | None,
        desired: Workload,
        *,
        want: str,
        defaults: NodeDefaults,
        from_before: bool,
        generation: int,
        number: int,
    ) -> None:
        """Into the mesh the way the node now asks; when that is another mode than the one
        holding the pod, the new one takes it first and the old one lets go after (make
        before break: the pod is never without redirection)."""
        pod = PodState.new(desired) if record is None else _with_workload(record, desired)
        if (
            from_before
            and desired.sidecar is None
            and want != POD_LEVEL_MODE
            and POD_LEVEL_MODE in self.modes
        ):
            # After a restart in another mode: whatever rules a pod still has from in-pod
            # mode go once this mode holds it.
            pod = dataclasses.replace(pod, leaving=POD_LEVEL_MODE)
        elif pod.handler is not None and pod.handler != want:
            pod = dataclasses.replace(pod, leaving=pod.handler, handler=None, kernel_done=None)
            log.info("%s/%s: %s -> %s", desired.namespace, desired.name, pod.leaving, want)
        if pod.leaving == want:
            pod = dataclasses.replace(pod, leaving=None)  # switched back before it was done
        step = self._by_name(want).enrol(pod, defaults)
        if step.state is not None:
            # Whatever it did, this mode has touched the pod: on a switch it is the one to undo.
            touched = dataclasses.replace(step.state, handler=want)
            step = dataclasses.replace(step, state=touched)
            if not step.more:
                metrics.POD_RECONCILES.labels(touched.outcome.state).inc()
        self._store(desired.uid, step, None if step.more else generation, number)
        if step.state is not None and step.state.leaving and _held_by(step.state, want):
            self.pods.add(desired.uid)  # held the new way: out of the old one

    def _leave(
        self, uid: str, record: PodState, held: set[str], number: int, *, wanted: bool
    ) -> None:
        """The mode a pod is switching away from lets go of it; its state stays the new
        holder's (or, for a pod leaving the mesh, the one to undo next)."""
        assert record.leaving is not None
        step = self._by_name(record.leaving).unenrol(record, held, keep_annotation=True)
        if step.state is None:
            kept = dataclasses.replace(record, leaving=None, kernel_done=None)
            log.info(
                "%s/%s: out of %s mode",
                record.workload.namespace,
                record.workload.name,
                record.leaving,
            )
            self._store(uid, Step(kept), None, number)
            self.host.add("host")  # the old mode's node side may go now
            if not wanted:
                self.pods.add(uid)  # a pod leaving the mesh: its holder's turn next
            return
        # Only the kernel step's progress counts; the pod's outcome is the holder's.
        progress = dataclasses.replace(record, kernel_done=step.state.kernel_done)
        self._store(uid, Step(progress, step.retry, step.more), None, number)

    def _wanted_handler(
        self, mode: RedirectModeHandler | None, desired: Workload | None
    ) -> str | None:
        """Who should hold the pod: sidecar capture for a pod with an injected proxy
        (whatever the node's mode: it needs neither ztunnel nor the spec's mode), the node's
        mode for the rest (None: a mode this agent lacks, or no pod)."""
        if desired is None:
            return None
        if desired.sidecar is not None:
            return SIDECAR if self.sidecar is not None else None
        return None if mode is None else mode.name

    def _by_name(self, name: str) -> PodHandler:
        if name == SIDECAR and self.sidecar is not None:
            return self.sidecar
        return self.modes[name]  # type: ignore[index]

    def _holder(self, record: PodState, mode: RedirectModeHandler | None) -> PodHandler:
        """Who takes the pod out: the one that touched it last; for a pod none has yet,
        the one it would have been given to."""
        if record.handler is not None:
            return self._by_name(record.handler)
        if record.workload.sidecar is not None and self.sidecar is not None:
            return self.sidecar
        assert mode is not None  # the caller returned for an ambient pod without one
        return mode

    def _defaults(self) -> NodeDefaults:
        """Node-wide settings from the spec (caller holds the lock)."""
        spec = self._desired.spec
        if spec is None:
            return NodeDefaults()
        return NodeDefaults(dns_capture=spec.dns_capture, ztunnel=spec.ztunnel)

    def _store(self, uid: str, step: Step, generation: int | None, number: int = 0) -> None:
        """Keep the pod's new state and schedule its retry: the one place records change."""
        state = step.state
        if state is not None and not step.more:
            failures = state.failures + 1 if step.retry is not None else 0
            state = dataclasses.replace(state, failures=failures)
            if generation is not None:
                state = dataclasses.replace(state, generation=generation)
        with self._lock:
            if state is None:
                self._records.pop(uid, None)
                self._passes.pop(uid, None)
                self._kernel_passes.pop(uid, None)
            else:
                self._records[uid] = state
                self._passes[uid] = number
                if state.kernel_done == "in" or step.applied:
                    self._kernel_passes[uid] = number
            self._stored.notify_all()
        # Its namespace is watched while its state says where it is (node mode's pods have
        # nothing of ours inside: they are polled).
        if state is not None and state.netns is not None:
            self._watch(uid, state.netns)
        else:
            self._unwatch(uid)
        if state is not None and step.more:
            # The pod's next step, after the pods already queued: in a burst every pod's
            # rules reach the kernel before any pod's API writes hold them up.
            self.pods.add(uid)
        elif state is not None and step.retry is not None:
            self.pods.add_after(uid, min(step.retry * 2 ** (state.failures - 1), MAX_BACKOFF))

    # -- status ------------------------------------------------------------------------------------

    def _status_soon(self) -> None:
        self.status.add_after("status", STATUS_DEBOUNCE)

    def facts(self) -> tuple[NodeFacts, list[PodOutcome], list[Condition]] | None:
        with self._lock:
            spec = self._desired.spec
            if spec is None:
                return None
            supported = self._mode() is not None
            desired = {w.uid for w in self._desired_workloads()}
            records = list(self._records.values())
            in_sync = all(
                r.generation == self._desired.generation
                for r in records
                if r.workload.uid in desired
            ) and desired <= {r.workload.uid for r in records}
            in_sync = in_sync and not any(r.leaving for r in records)
            previous = _conditions(self._server.status)
            host = self._host
            cni_plugin = self._cni_plugin
            stopped = self._stopped
        ztunnel = spec.ztunnel
        by_api = spec.redirect_mode == "node"
        if by_api:
            inside = [p.ok for p in host.parts if p.condition == "ZtunnelRulesReady"]
            connected = bool(ztunnel and ztunnel.ready and all(inside) and inside)
        else:
            connected = self.ztunnel.connected
        facts = NodeFacts(
            generation=self._desired.generation,
            mode=spec.redirect_mode,
            mode_supported=supported,
            backend=self.backend,
            ztunnel_connected=connected,
            ztunnel_pod=f"{ztunnel.namespace}/{ztunnel.name}" if ztunnel else None,
            ztunnel_since=None if by_api else _since(self.ztunnel.connected_since),
            ztunnel_by_api=by_api,
            host_parts=host.parts,
            host_rules_ok=all(p.ok for p in host.parts if p.condition == "HostRulesReady")
            if host.parts
            else host.ok,
            host_rules_message=host.message,
            in_sync=in_sync and host.pruned and supported,
            cni_plugin=cni_plugin,
            agent_stopped=stopped,
            agent_version=operator_version(),
        )
        return facts, [r.outcome for r in records], list(previous)

    def _write_status(self, _key: str) -> None:
        busy = len(self.pods) and time.monotonic() - self._status_written_at < STATUS_BUSY_MAX_DELAY
        if busy and not self._stopped:
            self._status_soon()
            return
        found = self.facts()
        if found is None:
            return
        facts, outcomes, previous = found
        rendered = render(facts, outcomes, previous, now())
        status = rendered.to_wire()
        # Gauges first, so they are never behind the status a reader can see.
        metrics.ZTUNNEL_CONNECTED.set(1 if facts.ztunnel_connected else 0)
        for state in ("Enrolled", "Pending", "Failed", "Removing"):
            metrics.WORKLOADS.labels(state).set(sum(1 for o in outcomes if o.state == state))
        with self._lock:
            before = self._server.status
        if _without_sync_time(before) == _without_sync_time(status):
            self._tell(before, rendered)  # the server holds it already
            return
        try:
            written = self.status_writer.write(merge_patch(before, status))
        except StatusWriteError as exc:
            log.warning("%s", exc)
            self.status.add_after("status", STATUS_RETRY)
            return
        if written is None:
            return  # the object is gone; its successor brings a spec and a new pass
        with self._lock:
            self._saw_status(written)
        self._status_written_at = time.monotonic()
        metrics.STATUS_WRITES.inc()
        self._tell(before, rendered)

    def _tell(self, server: Mapping[str, Any], current: AmbientNodeConfigStatus) -> None:
        """Events for what changed since the status last told, once the server holds
        `current` (`server`: the status it held before, the baseline of a first call)."""
        if self.events is None:
            return
        try:
            if self._told is None:
                self._told = _parsed(server) or current  # unreadable: nothing to compare with
            self._settled = self._settled or self._came_up(current)
            if not self._settled:
                return
            told, self._told = self._told, current
            found = events.notes(told, current)
            with self._lock:
                uid = self._uid
            if found:
                self.events.record(uid, found)
        except Exception:  # an Event lost is no reason to stop reporting status
            log.exception("could not record Events on %s", self.options.node)

    def _tell_now(self, note: events.EventNote) -> None:
        """An Event that no status shows (a repair of the node's own rules)."""
        if self.events is None:
            return
        with self._lock:
            uid = self._uid
        self.events.record(uid, [note])

    def _came_up(self, current: AmbientNodeConfigStatus) -> bool:
        """The agent has come up: every pod re-applied and ztunnel back, or long enough after
        the start that what still is so is news."""
        if time.monotonic() - self._started_at >= EVENTS_SETTLE:
            return True
        connected = current.ztunnel is not None and current.ztunnel.connected
        return connected and self.initial_pass_done()


def _without_sync_time(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "lastSyncTime"}


def _parsed(status: Mapping[str, Any]) -> AmbientNodeConfigStatus | None:
    try:
        return AmbientNodeConfigStatus.model_validate(status)
    except ValueError:
        return None


def _conditions(status: Mapping[str, Any]) -> list[Condition]:
    """The conditions the server holds, for their transition times; none if unreadable (a
    status edited by hand is rewritten whole)."""
    parsed = _parsed(status)
    return [] if parsed is None else list(parsed.conditions)


def _version(obj: Mapping[str, Any]) -> int:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return 0


def _with_workload(record: PodState, desired: Workload) -> PodState:
    """The record for the pod as the spec now has it; a changed entry starts its pass over."""
    if record.workload == desired:
        return record
    return dataclasses.replace(record, workload=desired, kernel_done=None)


def _held_by(record: PodState, handler: str | None) -> bool:
    """The pod is wholly in `handler`'s hands: in, both steps done (a step "out" is the
    old mode's, letting go)."""
    return (
        record.handler == handler
        and record.kernel_done != "in"
        and record.outcome.state == "Enrolled"
    )


def _reported(record: PodState | None) -> tuple[Any, ...] | None:
    """What status says of a pod (its outcome, and whether it is in sync)."""
    if record is None:
        return None
    return (record.outcome, record.generation, record.leaving, record.handler)


def _kind(workload: Workload) -> str:
    return "ambient" if workload.sidecar is None else "sidecar"


def _ips_held(records: Mapping[str, PodState], but: str) -> set[str]:
    """Addresses other pods hold (a reused IP): our records say, no set listing per pod."""
    return {
        _canonical_ip(ip)
        for uid, r in records.items()
        if uid != but and r.workload.sidecar is None  # sidecar pods are in no probe set
        for ip in r.workload.ips
    }


@functools.lru_cache(maxsize=65536)
def _canonical_ip(ip: str) -> str:
    """Cached: a node's un-enrolment asks this of every other pod's address, per pod."""
    return str(ipaddress.ip_address(ip))


def _since(epoch: float | None) -> datetime.datetime | None:
    return None if epoch is None else datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
