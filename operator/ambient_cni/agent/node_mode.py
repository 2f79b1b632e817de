"""The legacy node redirect mode (reference section 3; Istio 1.16-1.20): nothing in the pods.

The node steers every enrolled pod's TCP to the ztunnel pod through two tunnels: its
ipset `ztunnel-pods-ips` marks what a pod sends, table 100 sends what comes for a pod
through `istioin`, and inside the ztunnel pod TPROXY hands both to its listeners. So a
pod's part is its address in the set and its route (enrolled in one step, no ZDS:
ztunnel learnt pods from the API server then); the node's part is the chains, tunnels,
routes, rules and the ztunnel pod's side, set up once ztunnel's pod is known and again
whenever it is replaced. Each piece is a condition of its own in status, as a person
checks them by hand (`ipset list`, `iptables-save -t mangle`, `ip rule`,
`ip route show table 101`), and drift in any of them is put right with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Mapping, Set

from ambient_cni.api import names
from ambient_cni.api.models import Backend, ConditionType, RedirectMode, ZtunnelRef
from ambient_cni.dataplane.address_sets import canonical_ip
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import Changes, NodeModeKernel
from ambient_cni.dataplane.node_rules import NodeHost
from ambient_cni.dataplane.redirection import family_of

from . import metrics
from .interfaces import NetnsNotFoundError, NetnsResolver, PodApi
from .mode import HostReport, NodeDefaults, PodState, Step
from .status import REPAIRED, HostPart
from .steps import failed, repaired

log = logging.getLogger("ambient_cni.agent.node")
# An IPv4 address as a change's words name it ("10.244.0.3 added", "10.244.0.3/32 via ...").
_ADDRESS = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.]*\d)")

RETRY_WAITING = 2.0


class NodeMode:
    def __init__(
        self,
        *,
        dataplane: NodeModeKernel,
        resolver: NetnsResolver,
        pod_api: PodApi,
        backend: Backend,
    ):
        self.dataplane = dataplane
        self.resolver = resolver
        self.pod_api = pod_api
        self._backend = backend
        self._lock = threading.Lock()
        # Held while the node's set and table 100 change: a pod's entry added on a pod
        # worker is never taken for a stray by the node's pass syncing them.
        self._kernel = threading.Lock()
        self._pods: dict[str, str] = {}  # IPv4 address -> UID of the pod enrolled with it
        self._host: NodeHost | None = None  # the node's side as last applied in full
        self._waiting = "the node's side is not applied yet"
        self._repaired: dict[str, Changes] = {}  # UID -> what the node's pass put back for it
        self._parts: dict[ConditionType, HostPart] = {}
        self._fresh_repairs: list[str] = []  # this host pass's repairs (the host worker's own)

    @property
    def name(self) -> RedirectMode:
        return "node"

    @property
    def backend(self) -> Backend:
        return self._backend

    # -- one pod ------------------------------------------------------------------------------

    def enrol(self, pod: PodState, defaults: NodeDefaults) -> Step:  # noqa: ARG002 - the seam's
        """In two steps, as the in-pod mode: the set entry and route, then (once the pods
        queued meanwhile had theirs) the annotation: in a burst, every pod reaches the
        kernel before the API writes hold any up."""
        if pod.kernel_done == "in":
            pod = self._annotate(
                dataclasses.replace(pod, kernel_done=None), names.REDIRECTION_ENABLED
            )
            return Step(pod.with_outcome("Enrolled", "Enrolled", None))
        workload = pod.workload
        ips = _ipv4(workload.ips)
        if not ips:
            return failed(
                pod,
                "NoIPv4Address",
                f"node mode redirects IPv4 only, as Istio's did; the pod has {workload.ips}",
            )
        with self._lock:
            host, waiting = self._host, self._waiting
            held = {ip for ip, uid in self._pods.items() if uid == workload.uid}
            known = held == set(ips)
            put_back = self._repaired.pop(workload.uid, None)
        if host is None:
            pending = pod.with_outcome("Pending", "NodeRulesNotReady", waiting)
            return Step(pending, RETRY_WAITING)
        if known and pod.outcome.state == "Enrolled" and pod.annotation is not None:
            # The node's pass keeps the set and the routes right; it said if it had to.
            return Step(repaired(pod, put_back) if put_back else pod, applied=True)
        try:
            with self._kernel:
                for stale in held - set(ips):  # a new sandbox's new address replaces it
                    self.dataplane.remove_pod(stale)
                    with self._lock:
                        del self._pods[stale]
                changes = Changes()
                for ip in ips:
                    changes += self.dataplane.add_pod(ip, workload.uid, host)
                with self._lock:
                    for ip in ips:
                        self._pods[ip] = workload.uid
        except DataplaneError as exc:
            return failed(pod, exc.reason, exc.message)
        if changes and pod.outcome.state == "Enrolled" and pod.handler == self.name:
            pod = repaired(pod, changes)  # not when coming from another mode
        return Step(dataclasses.replace(pod, kernel_done="in"), more=True)

    def unenrol(
        self, pod: PodState, ips_held_by_others: Set[str], *, keep_annotation: bool = False
    ) -> Step:
        """Out of the set and table 100 (an address another pod now holds stays)."""
        workload = pod.workload
        with self._lock:
            self._repaired.pop(workload.uid, None)
            ips = {ip for ip, uid in self._pods.items() if uid == workload.uid}
        try:
            for ip in sorted(ips | set(_ipv4(workload.ips))):
                if canonical_ip(ip) in ips_held_by_others:
                    continue
                with self._kernel:
                    self.dataplane.remove_pod(ip)
                    with self._lock:
                        if self._pods.get(ip) == workload.uid:
                            del self._pods[ip]
        except DataplaneError as exc:
            log.warning("%s/%s: %s", workload.namespace, workload.name, exc.message)
            return Step(pod.with_outcome("Removing", exc.reason, exc.message), RETRY_WAITING)
        if not keep_annotation:
            self._annotate(pod, None)
        log.info("un-enrolled %s/%s (node mode)", workload.namespace, workload.name)
        return Step(None)

    def _annotate(self, pod: PodState, value: str | None) -> PodState:
        if pod.annotation == value and value is not None:
            return pod
        self.pod_api.annotate(pod.workload, value)
        return dataclasses.replace(pod, annotation=value)

    # -- the node ------------------------------------------------------------------------------

    def ensure_host(self, prune_to: Mapping[str, str] | None, defaults: NodeDefaults) -> HostReport:
        ztunnel = defaults.ztunnel
        if prune_to is not None:
            # After a restart: the spec's pods are what the set should hold.
            with self._lock:
                self._pods = {ip: uid for ip, uid in prune_to.items() if family_of(ip) == 4}
        if ztunnel is None or ztunnel.ip is None:
            return self._not_yet(
                "waiting for the node's ztunnel pod (spec.ztunnel) and its address"
            )
        try:
            path = self.dataplane.ztunnel_path(ztunnel.ip)
        except DataplaneError as exc:
            return self._not_yet(exc.message, exc.reason)
        host = NodeHost(
            ztunnel_veth=path.veth,
            ztunnel_ip=ztunnel.ip,
            host_ip=path.host_ip,
            dns_capture=defaults.dns_capture,
        )
        with self._lock:
            before = self._host
        same = before == host  # changes against the same ztunnel are repairs
        self._fresh_repairs = []
        with self._kernel:
            with self._lock:
                pods = dict(self._pods)
            rules = self._part(
                "HostRulesReady",
                same,
                lambda: self._rules(host, pods),
                lambda: ("Applied", _rules_said(host)),
            )
            # Said after the fact: the tunnels' kind is known once the kernel took one.
            tunnels = self._part(
                "TunnelsReady",
                same,
                lambda: self.dataplane.ensure_tunnels(host, pods),
                lambda: _tunnels_said(host, self.dataplane.tunnel_kind),
            )
        inside = self._part(
            "ZtunnelRulesReady",
            same,
            lambda: self._ztunnel_side(ztunnel, host),
            lambda: (
                "Applied",
                "tunnel ends, ip rules 20000/20003, tables 100-102 and TPROXY in "
                f"{ztunnel.namespace}/{ztunnel.name} ({ztunnel.ip})",
            ),
        )
        parts = (rules, tunnels, inside)
        ok = all(part.ok for part in parts)
        with self._lock:
            self._host = host if rules.ok and tunnels.ok else None
            self._waiting = "; ".join(p.message for p in parts if not p.ok) or ""
            self._parts = {p.condition: p for p in parts}
            requeue = not same or bool(self._repaired)
        if ok and not same:
            log.info("node mode: the node's side is in place for ztunnel %s", ztunnel.ip)
        return HostReport(
            ok=ok,
            message="; ".join(f"{p.condition}: {p.message}" for p in parts if not p.ok)
            or rules.message,
            changed=not same,
            parts=parts,
            requeue_pods=requeue,
            prune_taken=True,
            repaired="; ".join(self._fresh_repairs),
        )

    def _rules(self, host: NodeHost, pods: Mapping[str, str]) -> Changes:
        return self.dataplane.ensure_rules(host) + self.dataplane.sync_set(pods)

    def _ztunnel_side(self, ztunnel: ZtunnelRef, host: NodeHost) -> Changes:
        assert ztunnel.ip is not None
        try:
            netns = self.resolver.resolve(ztunnel.uid, [ztunnel.ip])
        except NetnsNotFoundError as exc:
            raise DataplaneError("ZtunnelNetnsNotFound", str(exc), retryable=True) from exc
        return self.dataplane.ensure_ztunnel(netns, ztunnel.ip, host.host_ip, host.tunnel_port)

    def _part(
        self,
        condition: ConditionType,
        same: bool,
        ensure: Callable[[], Changes],
        describe: Callable[[], tuple[str, str]],
    ) -> HostPart:
        """One piece, applied; (reason, message) from `describe` once it is in place."""
        try:
            changes = ensure()
        except DataplaneError as exc:
            return _part(condition, False, exc.reason, exc.message)
        reason, said = describe()
        with self._lock:
            before = self._parts.get(condition)
        if changes and same and before is not None and before.ok:
            for change in changes.items:
                metrics.REPAIRS.labels(change.kind).inc()
            what = changes.describe()
            log.warning("node mode: repaired %s: %s", condition, what)
            self._fresh_repairs.append(f"{condition}: {what}")
            self._note_pod_repairs(changes)
            return _part(condition, True, reason, f"{said}{REPAIRED}{what}"[:32768])
        if before is not None and before.ok and same:
            return before  # keeps the last repair in the message
        return _part(condition, True, reason, said)

    def _note_pod_repairs(self, changes: Changes) -> None:
        """Credit a repair of a pod's set entry or route to that pod too."""
        with self._lock:
            for change in changes.items:
                named = set(_ADDRESS.findall(change.what))
                for ip, uid in self._pods.items():
                    if ip in named:
                        previous = self._repaired.get(uid, Changes())
                        self._repaired[uid] = previous + Changes((change,))

    def _not_yet(self, message: str, reason: str = "WaitingForZtunnel") -> HostReport:
        """Nothing can be set up before the ztunnel pod is known and reachable; the set
        the first pass was given is kept for then."""
        with self._lock:
            self._host = None
            self._waiting = message
        parts = tuple(
            _part(c, False, reason, message)
            for c in ("HostRulesReady", "TunnelsReady", "ZtunnelRulesReady")
        )
        return HostReport(ok=False, message=message, parts=parts, prune_taken=True)

    def uninstall_host(self) -> bool:
        with self._kernel:
            with self._lock:
                self._host = None
                self._pods = {}
                self._parts = {}
                self._repaired = {}
                self._waiting = "the node's side is not applied yet"
            return self.dataplane.uninstall()


def _part(condition: ConditionType, ok: bool, reason: str, message: str) -> HostPart:
    return HostPart(condition=condition, ok=ok, reason=reason, message=message)


def _ipv4(ips: list[str]) -> list[str]:
    return [canonical_ip(ip) for ip in ips if family_of(ip) == 4]


def _rules_said(host: NodeHost) -> str:
    return (
        "ipset ztunnel-pods-ips and the ztunnel-* chains (mangle, nat, filter) in place for "
        f"ztunnel {host.ztunnel_ip} behind {host.ztunnel_veth}"
    )


def _tunnels_said(host: NodeHost, kind: str) -> tuple[str, str]:
    return kind.capitalize(), (
        f"istioin (VNI 1000) and istioout (VNI 1001) are {kind} tunnels to ztunnel "
        f"{host.ztunnel_ip} on UDP {host.tunnel_port}; ip rules 100-103 and tables 100-102 "
        "in place"
    )
