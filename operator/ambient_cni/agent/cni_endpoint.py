"""What the agent answers the CNI plugin: the decision the plugin does not make.

On ADD the pod and its namespace are read from the API server, the same pure
selection as the controller's decides, and a pod that is to be redirected is
enrolled whole (rules in the netns the plugin names, ztunnel's ack, probe
set, annotation) before the answer: fail closed, so its sandbox is torn down
and retried rather than started unredirected. A pod with an injected sidecar
gets its capture in the same way instead (never both), and one whose sidecar
annotations are malformed gets an error naming the annotation and the value.
A pod that is not to be redirected gets its answer at once.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from ambient_cni.api.models import Workload
from ambient_cni.selection import (
    SelectionConfig,
    decide,
    decide_sidecar_pod,
    pod_view,
    sidecar_workload,
    workload,
)

from .interfaces import NetnsReports, PodSource
from .status import PodOutcome

log = logging.getLogger("ambient_cni.agent.cni")

# The plugin waits 5 s by default; the agent answers before that.
ANSWER_WITHIN = 4.0


class _IPConfig(BaseModel):
    """One entry of prevResult's `ips`, as the CNI library marshals it."""

    model_config = ConfigDict(extra="ignore")

    address: str  # CIDR: 10.244.0.7/24


class PluginEvent(BaseModel):
    """The plugin's request body: Istio's event (its Go field names; the IPs as the CNI
    result has them) plus the pod UID and the sandbox's container ID."""

    model_config = ConfigDict(extra="ignore")

    Netns: str = ""  # a DEL may come without one: the namespace is already gone
    PodName: str = Field(min_length=1)
    PodNamespace: str = Field(min_length=1)
    PodUID: str = ""
    ContainerID: str = ""
    IPs: list[_IPConfig] | None = None

    def ips(self) -> tuple[str, ...]:
        """The pod's addresses, valid ones only, each family once."""
        found: dict[int, str] = {}
        for config in self.IPs or []:
            try:
                address = ipaddress.ip_interface(config.address).ip
            except ValueError:
                continue
            found.setdefault(address.version, str(address))
        return tuple(found[v] for v in sorted(found))


@dataclass(frozen=True)
class CniAnswer:
    ok: bool
    message: str


class Enroller(Protocol):
    def enrol_now(self, workload: Workload, timeout: float) -> PodOutcome: ...

    def cni_deleted(self, uid: str) -> None: ...

    def state(self, uid: str) -> str | None:
        """The pod's state in status (Enrolled, Pending, ...), None if unknown."""
        ...


class CniEndpoint:
    def __init__(
        self,
        node: str,
        pods: PodSource,
        enroller: Enroller,
        netns: NetnsReports,
        selection: SelectionConfig,
        *,
        answer_within: float = ANSWER_WITHIN,
    ):
        self.node = node
        self.pods = pods
        self.enroller = enroller
        self.netns = netns
        self.selection = selection
        self.answer_within = answer_within
        self._sandboxes: dict[str, str] = {}  # pod uid -> container ID of its latest ADD

    def add(self, event: PluginEvent) -> CniAnswer:
        arrived = time.monotonic()  # the plugin's clock runs from before this
        who = f"{event.PodNamespace}/{event.PodName}"
        if not event.Netns:
            return CniAnswer(False, f"pod {who}: ADD without a network namespace")
        pod = self.pods.pod(event.PodNamespace, event.PodName)
        if pod is None:
            return CniAnswer(False, f"pod {who} is not in the API server")
        view = pod_view(pod)
        if event.PodUID and view.uid != event.PodUID:
            return CniAnswer(False, f"pod {who} is another pod now (UID {view.uid})")
        ips = event.ips()
        if not ips:
            return CniAnswer(False, f"pod {who}: the plugins before istio-cni gave it no IP")
        view = view.model_copy(update={"ips": ips, "node_name": view.node_name or self.node})
        labels = self.pods.namespace_labels(event.PodNamespace)
        decision = decide(view, labels, self.selection)
        if decision.enrolled:
            wanted = workload(view)
        else:
            sidecar = decide_sidecar_pod(view, labels, self.selection)
            if sidecar.error is not None:
                log.warning("CNI ADD %s: %s", who, sidecar.error)
                return CniAnswer(False, f"pod {who}: sidecar capture refused: {sidecar.error}")
            found = sidecar_workload(view, labels, self.selection) if sidecar.captured else None
            if found is None:
                log.debug("CNI ADD %s: not redirected (%s)", who, decision.reason)
                return CniAnswer(True, f"not redirected: {decision.reason}")
            wanted = found
        self._sandboxes[wanted.uid] = event.ContainerID
        self.netns.report(wanted.uid, Path(event.Netns))
        budget = self.answer_within - (time.monotonic() - arrived)
        result = self.enroller.enrol_now(wanted, max(budget, 0.0))
        if result.state == "Enrolled":
            what = "sidecar capture in place" if wanted.sidecar else "redirected"
            log.info("CNI ADD %s: %s before it starts", who, what)
            return CniAnswer(True, what)
        why = ": ".join(part for part in (result.reason, result.message) if part)
        return CniAnswer(False, f"pod {who} is to be redirected and is not yet ({why})")

    def delete(self, event: PluginEvent) -> CniAnswer:
        """Forget the netns the plugin gave; never fails (DEL must succeed when things are
        gone). Un-enrolment itself follows the spec, or the CNI grace."""
        uid = event.PodUID
        if not uid:
            return CniAnswer(True, "nothing to forget")
        latest = self._sandboxes.get(uid)
        if latest is not None and event.ContainerID and event.ContainerID != latest:
            # A late DEL of an earlier sandbox: the pod's current one stays as it is.
            return CniAnswer(True, "an earlier sandbox: ignored")
        self._sandboxes.pop(uid, None)
        self.netns.forget(uid)
        self.enroller.cni_deleted(uid)
        return CniAnswer(True, "forgotten")

    def check(self, event: PluginEvent) -> CniAnswer:
        """Whether a pod that is to be redirected is."""
        who = f"{event.PodNamespace}/{event.PodName}"
        state = self.enroller.state(event.PodUID) if event.PodUID else None
        if state == "Enrolled":
            return CniAnswer(True, "redirected")
        pod = self.pods.pod(event.PodNamespace, event.PodName)
        if pod is None:
            return CniAnswer(False, f"pod {who} is not in the API server")
        view = pod_view(pod).model_copy(update={"ips": event.ips() or pod_view(pod).ips})
        decision = decide(view, self.pods.namespace_labels(event.PodNamespace), self.selection)
        if not decision.enrolled:
            return CniAnswer(True, f"not redirected: {decision.reason}")
        return CniAnswer(False, f"pod {who} is to be redirected and is {state or 'unknown'}")
