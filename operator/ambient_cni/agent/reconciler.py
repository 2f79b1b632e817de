"""The node agent's reconciler: its node's AmbientNodeConfig spec in, the kernel and ztunnel out.

Level-based: every pass for a pod compares what should be (the spec) with
what is (the kernel, the ZDS session) and does only what differs, in the
order of reference section 2.4. Pods are reconciled independently on worker
threads through a keyed queue, so one slow or broken pod never stalls the
others; failures are retried with a per-pod backoff and reported in status.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ambient_cni.agent import metrics
from ambient_cni.agent.podnetns import NetnsNotFoundError, PodNetnsResolver
from ambient_cni.agent.status import NodeFacts, PodOutcome, render
from ambient_cni.agent.zds_server import SnapshotEntry, ZdsError, ZdsServer
from ambient_cni.api import names
from ambient_cni.api.models import (
    AmbientNodeConfigSpec,
    AmbientNodeConfigStatus,
    Condition,
    Workload,
)
from ambient_cni.dataplane.constants import Family
from ambient_cni.dataplane.host import HostDataplane, family_of
from ambient_cni.dataplane.iptables_apply import ApplyError, PodRules
from ambient_cni.dataplane.iptables_rules import PodRedirect, pod_redirect
from ambient_cni.kube import MERGE_PATCH, Obj, as_body, raw
from ambient_cni.mergepatch import merge_patch
from ambient_cni.workqueue import WorkQueue
from ambient_cni.zds import WorkloadInfo

log = logging.getLogger("ambient_cni.agent")

HOST_KEY = "@host"
STATUS_KEY = "@status"
STATUS_DEBOUNCE = 0.2
MAX_BACKOFF = 30.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass
class PodRecord:
    workload: Workload  # the last desired entry, kept to undo it after un-enrolment
    outcome: PodOutcome
    netns: Path | None = None
    rules_in: bool = False
    annotation: str | None = None  # what we last wrote to ambient.istio.io/redirection
    failures: int = 0
    generation: int = -1  # the spec generation this record was last reconciled against


@dataclass
class AgentOptions:
    node: str
    zds_socket: Path
    host_netns: Path | None = None
    netns_dir: Path = Path("/run/netns")
    proc: Path = Path("/proc")
    netns_prefix: str = ""
    daemonset: str | None = None  # NAMESPACE/NAME; its deletion at stop means uninstall
    backend: str = "auto"  # auto, iptables-nft or iptables-legacy
    drift_interval: float = 10.0
    workers: int = 4


@dataclass
class _HostState:
    ok: bool = False
    message: str = "not applied yet"
    pruned: bool = False


@dataclass
class _Desired:
    spec: AmbientNodeConfigSpec | None = None
    generation: int = 0
    status: dict[str, Any] = field(default_factory=dict)


class NodeAgent:
    def __init__(
        self,
        options: AgentOptions,
        api: ApiClient,
        rules: PodRules,
        host: HostDataplane,
        resolver: PodNetnsResolver,
    ):
        self.options = options
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)
        self.rules = rules
        self.host = host
        self.resolver = resolver
        self.zds = ZdsServer(options.zds_socket, self._snapshot, on_change=self._ztunnel_changed)
        self.queue: WorkQueue[str] = WorkQueue()
        self._lock = threading.Lock()
        self._desired = _Desired()
        self._records: dict[str, PodRecord] = {}
        self._host = _HostState()
        self._written_status: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- inputs -----------------------------------------------------------------------------------

    def on_object(self, obj: Obj | None) -> None:
        """The node's AmbientNodeConfig changed (None: it is gone)."""
        with self._lock:
            if obj is None:
                self._desired = _Desired()
            else:
                try:
                    spec = AmbientNodeConfigSpec.model_validate(obj.get("spec") or {})
                except ValueError as exc:
                    log.error("ignoring an invalid spec for %s: %s", self.options.node, exc)
                    return
                self._desired = _Desired(
                    spec=spec,
                    generation=int(obj["metadata"].get("generation") or 0),
                    status=obj.get("status") or {},
                )
                if self._written_status is None:  # after a restart: what the last agent wrote
                    self._written_status = self._desired.status
            keys = set(self._records) | {w.uid for w in self._desired_workloads()}
        for key in keys:
            self.queue.add(key)
        self.queue.add(HOST_KEY)
        self._status_soon()

    def _desired_workloads(self) -> list[Workload]:
        spec = self._desired.spec
        return list(spec.workloads) if spec is not None and spec.redirect_mode == "inpod" else []

    def _ztunnel_changed(self) -> None:
        # A new session holds the snapshot: pending pods can complete; a lost one shows in status.
        with self._lock:
            keys = [w.uid for w in self._desired_workloads()]
        for key in keys:
            self.queue.add(key)
        self._status_soon()

    def _snapshot(self) -> list[SnapshotEntry]:
        with self._lock:
            return [
                SnapshotEntry(uid, _info(record.workload), record.netns)
                for uid, record in self._records.items()
                if record.rules_in
            ]

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; ZDS is served by `serve_ztunnel` once pods are re-applied."""
        for number in range(self.options.workers):
            thread = threading.Thread(target=self._work, name=f"agent-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        drift = threading.Thread(target=self._drift_loop, name="agent-drift", daemon=True)
        drift.start()
        self._threads.append(drift)

    def initial_pass_done(self) -> bool:
        """The spec is known, host rules were tried and every desired pod was reconciled once."""
        with self._lock:
            if self._desired.spec is None:
                return False
            done = {uid for uid, r in self._records.items() if r.generation >= 0}
            return self._host.pruned and {w.uid for w in self._desired_workloads()} <= done

    def serve_ztunnel(self) -> None:
        """Serve ZDS. Only after the first pass: a ztunnel that connected earlier would get an
        empty snapshot and drop every pod it serves."""
        self.zds.start()

    def stop(self) -> None:
        """Leave pod rules in place (traffic keeps flowing); stop serving."""
        self._stop.set()
        self.queue.close()
        self.zds.stop()
        for thread in self._threads:
            thread.join(timeout=10)

    def _drift_loop(self) -> None:
        while not self._stop.wait(self.options.drift_interval):
            with self._lock:
                keys = [w.uid for w in self._desired_workloads()]
            for key in [HOST_KEY, *keys]:
                self.queue.add(key)

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                if key == HOST_KEY:
                    self._reconcile_host()
                elif key == STATUS_KEY:
                    self._write_status()
                else:
                    self._reconcile_pod(key)
            except Exception:
                log.exception("reconciling %s", key)
                self.queue.add_after(key, 5.0)
            finally:
                self.queue.done(key)

    # -- host ---------------------------------------------------------------------------------

    def _reconcile_host(self) -> None:
        try:
            changed = self.host.ensure()
            with self._lock:
                first = not self._host.pruned
                wanted = {ip: w.uid for w in self._desired_workloads() for ip in w.ips}
            if first and self._desired.spec is not None:
                self.host.prune(wanted)  # stale entries from pods gone while we were away
                with self._lock:
                    self._host.pruned = True
            state = _HostState(ok=True, message="", pruned=self._host.pruned)
            if changed:
                log.info("host probe rules and ipsets applied")
        except ApplyError as exc:
            state = _HostState(
                ok=False, message=f"{exc.reason}: {exc.message}", pruned=self._host.pruned
            )
            self.queue.add_after(HOST_KEY, 5.0)
        with self._lock:
            before, self._host = self._host, state
        if (before.ok, before.message) != (state.ok, state.message):
            self._status_soon()

    # -- one pod ----------------------------------------------------------------------------------

    def _reconcile_pod(self, uid: str) -> None:
        with self._lock:
            desired = {w.uid: w for w in self._desired_workloads()}.get(uid)
            record = self._records.get(uid)
            generation = self._desired.generation
            dns_default = self._desired.spec.dns_capture if self._desired.spec else True
        started = time.monotonic()
        if desired is not None:
            if record is None:
                record = PodRecord(desired, _outcome(desired, "Pending", "Enrolling", None))
                with self._lock:
                    self._records[uid] = record
            record.workload = desired
            self._enrol(record, dns_default)
            record.generation = generation
            metrics.POD_RECONCILES.labels(record.outcome.state).inc()
        elif record is not None:
            self._unenrol(record)
            metrics.POD_RECONCILES.labels("Removed").inc()
        metrics.POD_RECONCILE_SECONDS.observe(time.monotonic() - started)
        self._status_soon()

    def _enrol(self, record: PodRecord, dns_default: bool) -> None:
        workload = record.workload
        families: list[Family] = sorted({family_of(ip) for ip in workload.ips})
        redirects: list[PodRedirect] = [pod_redirect(workload, f, dns_default) for f in families]
        # (1) rules in the pod's netns
        try:
            netns = self.resolver.resolve(workload.uid, workload.ips)
        except NetnsNotFoundError as exc:
            self._fail(record, "NetnsNotFound", str(exc))
            return
        try:
            self.rules.ensure(netns, redirects)
        except ApplyError as exc:
            self._fail(record, exc.reason, exc.message)
            return
        record.netns, record.rules_in = netns, True
        # (2) ztunnel takes the pod
        if not self.zds.is_acked(workload.uid):
            if not self.zds.connected and record.outcome.state == "Enrolled":
                return  # ztunnel is away: the pod keeps working; the next snapshot re-adds it
            try:
                self.zds.add(workload.uid, _info(workload), netns)
            except ZdsError as exc:
                self._set(record, "Pending", exc.reason, exc.message)
                self._annotate(record, names.REDIRECTION_PENDING)
                self._retry(record, 2.0)
                return
        # (3) host ipset, (4) the annotation
        try:
            self.host.add(list(workload.ips), workload.uid)
        except Exception as exc:
            self._fail(record, "IpsetFailed", str(exc))
            return
        self._annotate(record, names.REDIRECTION_ENABLED)
        record.failures = 0
        self._set(record, "Enrolled", "Enrolled", None)

    def _unenrol(self, record: PodRecord) -> None:
        workload = record.workload
        self._set(record, "Removing", "Removing", None)
        # Our records say who else holds an address (a reused IP): no ipset listing per pod.
        held = self._ips_held_by_others(workload.uid)
        self.host.delete([ip for ip in workload.ips if _canonical_ip(ip) not in held])
        if record.netns is not None and record.netns.exists():
            families = tuple(sorted({family_of(ip) for ip in workload.ips}))
            try:
                self.rules.remove(record.netns, families)
            except ApplyError as exc:
                if exc.reason != "NetnsNotFound":  # a deleted pod: nothing left to remove
                    self._set(record, "Removing", exc.reason, exc.message)
                    self._retry(record, 5.0)
                    return
        self.zds.delete(workload.uid)
        self._annotate(record, None)
        with self._lock:
            self._records.pop(workload.uid, None)
        log.info("un-enrolled %s/%s", workload.namespace, workload.name)

    def _ips_held_by_others(self, uid: str) -> set[str]:
        with self._lock:
            return {
                _canonical_ip(ip)
                for other, record in self._records.items()
                if other != uid
                for ip in record.workload.ips
            }

    def _fail(self, record: PodRecord, reason: str, message: str) -> None:
        log.warning(
            "%s/%s: %s: %s", record.workload.namespace, record.workload.name, reason, message
        )
        self._set(record, "Failed", reason, message)
        self._retry(record, 1.0)

    def _retry(self, record: PodRecord, base: float) -> None:
        record.failures += 1
        self.queue.add_after(
            record.workload.uid, min(base * 2 ** (record.failures - 1), MAX_BACKOFF)
        )

    def _set(self, record: PodRecord, state: str, reason: str | None, message: str | None) -> None:
        old = record.outcome
        if (old.state, old.reason, old.message) == (state, reason, message):
            return
        record.outcome = _outcome(record.workload, state, reason, message)

    def _annotate(self, record: PodRecord, value: str | None) -> None:
        """Write ambient.istio.io/redirection through pods/status; never overwrite `disabled`."""
        if record.annotation == value and value is not None:
            return
        workload = record.workload
        try:
            pod = self.core.read_namespaced_pod(
                workload.name, workload.namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                record.annotation = value
                return
            raise
        meta = raw(pod)["metadata"]
        if meta.get("uid") != workload.uid:
            return  # a new pod with the same name
        current = (meta.get("annotations") or {}).get(names.REDIRECTION_ANNOTATION)
        if current in (names.REDIRECTION_DISABLED, value):
            record.annotation = value
            return
        if value is None and current not in (names.REDIRECTION_ENABLED, names.REDIRECTION_PENDING):
            record.annotation = None
            return
        patch = {"metadata": {"annotations": {names.REDIRECTION_ANNOTATION: value}}}
        self.core.patch_namespaced_pod_status(
            workload.name, workload.namespace, as_body(patch), _content_type=MERGE_PATCH
        )
        record.annotation = value

    # -- status ------------------------------------------------------------------------------------

    def _status_soon(self) -> None:
        self.queue.add_after(STATUS_KEY, STATUS_DEBOUNCE)

    def facts(self) -> tuple[NodeFacts, list[PodOutcome], list[Condition]] | None:
        with self._lock:
            spec = self._desired.spec
            if spec is None:
                return None
            desired = {w.uid for w in self._desired_workloads()}
            records = list(self._records.values())
            in_sync = all(
                r.generation == self._desired.generation
                for r in records
                if r.workload.uid in desired
            ) and desired <= {r.workload.uid for r in records}
            previous = AmbientNodeConfigStatus.model_validate(self._written_status or {}).conditions
            host = self._host
        ztunnel = spec.ztunnel
        facts = NodeFacts(
            generation=self._desired.generation,
            mode=spec.redirect_mode,
            backend=self.rules.flavour.backend,  # type: ignore[arg-type]
            ztunnel_connected=self.zds.connected,
            ztunnel_pod=f"{ztunnel.namespace}/{ztunnel.name}" if ztunnel else None,
            ztunnel_since=_since(self.zds.connected_since),
            host_rules_ok=host.ok,
            host_rules_message=host.message,
            in_sync=in_sync and host.pruned,
        )
        return facts, [r.outcome for r in records], list(previous)

    def _write_status(self) -> None:
        found = self.facts()
        if found is None:
            return
        facts, outcomes, previous = found
        status = render(facts, outcomes, previous, _now()).to_wire()
        # Gauges first, so they are never behind the status a reader can see.
        metrics.ZTUNNEL_CONNECTED.set(1 if facts.ztunnel_connected else 0)
        for state in ("Enrolled", "Pending", "Failed", "Removing"):
            metrics.WORKLOADS.labels(state).set(sum(1 for o in outcomes if o.state == state))
        comparable = {k: v for k, v in status.items() if k != "lastSyncTime"}
        with self._lock:
            before = self._written_status or {}
        if {k: v for k, v in before.items() if k != "lastSyncTime"} == comparable:
            return
        try:
            self.custom.patch_cluster_custom_object_status(
                names.GROUP,
                names.VERSION,
                names.PLURAL,
                self.options.node,
                as_body({"status": merge_patch(before, status)}),
                _content_type=MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            log.warning("writing status: %s", exc.reason)
            self.queue.add_after(STATUS_KEY, 2.0)
            return
        with self._lock:
            self._written_status = status
        metrics.STATUS_WRITES.inc()


def _info(workload: Workload) -> WorkloadInfo:
    return WorkloadInfo(
        name=workload.name, namespace=workload.namespace, service_account=workload.service_account
    )


def _outcome(workload: Workload, state: str, reason: str | None, message: str | None) -> PodOutcome:
    return PodOutcome.model_validate(
        {
            "uid": workload.uid,
            "name": workload.name,
            "namespace": workload.namespace,
            "state": state,
            "reason": reason,
            "message": message,
            "since": _now(),
        }
    )


def _since(epoch: float | None) -> datetime.datetime | None:
    return None if epoch is None else datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)


def _canonical_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))
