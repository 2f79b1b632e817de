"""The in-pod redirect mode (reference section 2): rules inside each pod's network namespace.

Enrolling a pod, in Istio's order (section 2.4): (1) the pod's redirection in
its netns, (2) ztunnel takes the netns over ZDS, (3) the pod's IPs in the
host probe sets, (4) the `ambient.istio.io/redirection` annotation. Leaving
undoes the same in reverse, the annotation last.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Set
from pathlib import Path

from ambient_cni.api import names
from ambient_cni.api.models import Backend, RedirectMode, Workload
from ambient_cni.dataplane.address_sets import canonical_ip, prune
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import (
    NO_CHANGES,
    Change,
    Changes,
    HostDataplane,
    PodDataplane,
)
from ambient_cni.dataplane.redirection import family_of, pod_redirects
from ambient_cni.zds import WorkloadInfo

from . import metrics
from .interfaces import NetnsHandles, NetnsNotFoundError, NetnsResolver, PodApi, ZdsError, Ztunnel
from .mode import HostReport, NodeDefaults, PodState, Step
from .steps import failed, repaired, still_redirected

log = logging.getLogger("ambient_cni.agent.inpod")

RETRY_PENDING = 2.0


def workload_info(workload: Workload) -> WorkloadInfo:
    return WorkloadInfo(
        name=workload.name, namespace=workload.namespace, service_account=workload.service_account
    )


class InpodMode:
    def __init__(
        self,
        *,
        pods: PodDataplane,
        host: HostDataplane,
        resolver: NetnsResolver,
        handles: NetnsHandles,
        ztunnel: Ztunnel,
        pod_api: PodApi,
    ):
        self.pods = pods
        self.host = host
        self.resolver = resolver
        self.handles = handles
        self.ztunnel = ztunnel
        self.pod_api = pod_api
        self._host_ok = False
        # The pods whose addresses this mode put in the probe sets (step 3), so a host pass
        # puts back one taken out behind its back (the sets announce nothing). The lock
        # orders that against a pod's own add and delete.
        self._probes: dict[str, tuple[str, ...]] = {}
        self._probes_lock = threading.Lock()

    @property
    def name(self) -> RedirectMode:
        return "inpod"

    @property
    def backend(self) -> Backend:
        return self.pods.backend

    # -- one pod ------------------------------------------------------------------------------

    def enrol(self, pod: PodState, defaults: NodeDefaults) -> Step:
        """In two steps: (1) the redirection in the kernel, then, once the pods queued
        meanwhile had theirs, (2)-(4): ztunnel, the probe set and the annotation."""
        if pod.kernel_done != "in" or pod.netns is None:
            return self._redirect(pod, defaults)
        return self._announce(dataclasses.replace(pod, kernel_done=None), pod.netns)

    def _redirect(self, pod: PodState, defaults: NodeDefaults) -> Step:
        workload = pod.workload
        # (1) the redirection in the pod's netns
        try:
            netns = self.handles.hold(
                workload.uid, self.resolver.resolve(workload.uid, workload.ips)
            )
        except NetnsNotFoundError as exc:
            held = self.handles.held(workload.uid)  # unmounted, while its process lives
            if held is None:
                return failed(pod, "NetnsNotFound", str(exc))
            netns = held
        if pod.netns is not None and netns != pod.netns:
            # A new sandbox for the same pod (a held path changes only with the namespace):
            # ztunnel must let go of the old one and take this one.
            self.ztunnel.delete(workload.uid)
        try:
            changes = self.pods.ensure(netns, pod_redirects(workload, defaults.dns_capture))
        except DataplaneError as exc:
            return failed(pod, exc.reason, exc.message)
        if changes and pod.outcome.state == "Enrolled" and pod.handler == self.name:
            pod = repaired(pod, changes)  # not when coming from another mode
        return Step(dataclasses.replace(pod, netns=netns, kernel_done="in"), more=True)

    def _announce(self, pod: PodState, netns: Path) -> Step:
        workload = pod.workload
        # (2) ztunnel takes the pod
        if not self.ztunnel.holds(workload.uid):
            if not self.ztunnel.connected and pod.outcome.state == "Enrolled":
                return Step(pod)  # ztunnel is away: the pod keeps working; its snapshot re-adds it
            try:
                self.ztunnel.add(workload.uid, workload_info(workload), netns)
            except ZdsError as exc:
                pending = pod.with_outcome("Pending", exc.reason, exc.message)
                return Step(self._annotate(pending, names.REDIRECTION_PENDING), RETRY_PENDING)
        # (3) the host probe sets, (4) the annotation
        try:
            with self._probes_lock:
                # Once in, an entry is kept by the host pass (which puts back one taken out).
                if self._probes.get(workload.uid) != tuple(workload.ips):
                    self.host.addresses.add(list(workload.ips), workload.uid)
                    self._probes[workload.uid] = tuple(workload.ips)
        except Exception as exc:
            return failed(pod, "IpsetFailed", str(exc))
        pod = self._annotate(pod, names.REDIRECTION_ENABLED)
        return Step(pod.with_outcome("Enrolled", "Enrolled", None))

    def unenrol(
        self, pod: PodState, ips_held_by_others: Set[str], *, keep_annotation: bool = False
    ) -> Step:
        """Out only when the kernel says so: a pod whose netns cannot be found stays
        `Removing` (and redirected, and announced as such) until it is found, or until the
        pod has no sandbox any more (deleted, or terminated) and its netns went with it. In
        two steps, as enrol: the rules first, then the probe set, ztunnel and the annotation."""
        if pod.kernel_done != "out":
            return self._unredirect(pod.with_outcome("Removing", "Removing", None))
        workload = pod.workload
        with self._probes_lock:
            self._probes.pop(workload.uid, None)
            self.host.addresses.delete(
                [ip for ip in workload.ips if canonical_ip(ip) not in ips_held_by_others]
            )
        self.ztunnel.delete(workload.uid)
        if not keep_annotation:
            self._annotate(pod, None)
        self.handles.release(workload.uid)
        log.info("un-enrolled %s/%s", workload.namespace, workload.name)
        return Step(None)

    def _unredirect(self, pod: PodState) -> Step:
        workload = pod.workload
        netns = self.handles.held(workload.uid)
        if netns is None and self.pod_api.has_sandbox(workload):
            try:
                netns = self.resolver.resolve(workload.uid, workload.ips)
            except NetnsNotFoundError as exc:
                return still_redirected(pod, str(exc))
        if netns is not None:
            families = tuple(sorted({family_of(ip) for ip in workload.ips}))
            try:
                self.pods.remove(netns, families)
            except DataplaneError as exc:
                if exc.reason != "NetnsNotFound" or self.pod_api.has_sandbox(workload):
                    return still_redirected(pod, exc.message, exc.reason)
        return Step(dataclasses.replace(pod, kernel_done="out"), more=True)

    def _annotate(self, pod: PodState, value: str | None) -> PodState:
        if pod.annotation == value and value is not None:
            return pod
        self.pod_api.annotate(pod.workload, value)
        return dataclasses.replace(pod, annotation=value)

    # -- the node ------------------------------------------------------------------------------

    def ensure_host(
        self,
        prune_to: Mapping[str, str] | None,
        defaults: NodeDefaults,  # noqa: ARG002 - the seam's
    ) -> HostReport:
        try:
            changes = self.host.ensure()
            if prune_to is not None:
                prune(self.host.addresses, prune_to)
            else:
                changes += self._put_back_probes()
        except DataplaneError as exc:
            self._host_ok = False
            return HostReport(ok=False, message=f"{exc.reason}: {exc.message}")
        repaired = ""
        if changes and self._host_ok:
            for change in changes.items:
                metrics.REPAIRS.labels(change.kind).inc()
            repaired = changes.describe()
            log.warning("repaired the host's rules: %s", repaired)
        elif changes:
            log.info("host probe rules and ipsets applied: %s", changes.describe())
        self._host_ok = True
        return HostReport(ok=True, changed=bool(changes), repaired=repaired)

    def _put_back_probes(self) -> Changes:
        """The probe set entries of pods this mode announced that are gone from the sets
        (one listing of the sets; nothing is written when none is missing)."""
        with self._probes_lock:
            if not self._probes:
                return NO_CHANGES
            have = self.host.addresses.entries()
            missing = {
                uid: [ip for ip in ips if canonical_ip(ip) not in have]
                for uid, ips in self._probes.items()
            }
            missing = {uid: ips for uid, ips in missing.items() if ips}
            for uid, ips in missing.items():
                self.host.addresses.add(ips, uid)
        if not missing:
            return NO_CHANGES
        put_back = ", ".join(sorted(ip for ips in missing.values() for ip in ips))
        return Changes((Change("host-rules", f"probe set entries put back: {put_back}"),))

    def uninstall_host(self) -> bool:
        return self.host.uninstall()
