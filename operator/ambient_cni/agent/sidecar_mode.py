"""Sidecar capture (reference sidecar-interception.md): a pod with an injected proxy gets
its capture rules in its own netns, for its own proxy; ztunnel and the node's probe sets
play no part.

Istio's plugin writes the rules once, at the pod's CNI ADD, and never looks again. Here
the pod is also in its node's AmbientNodeConfig, so its capture is in status and rules
changed behind the agent's back are put right, with the reason in status. Like Istio's,
the rules live and die with the pod: when a pod leaves the spec (it finished, or its
annotations stopped asking for capture) they are left as they are, since its proxy was
started expecting them; a deleted pod's netns takes them along.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Set

from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import SidecarDataplane
from ambient_cni.dataplane.sidecar_rules import families

from .interfaces import NetnsHandles, NetnsNotFoundError, NetnsResolver
from .mode import NodeDefaults, PodState, Step
from .steps import failed, repaired

log = logging.getLogger("ambient_cni.agent.sidecar")


class SidecarMode:
    def __init__(
        self, *, dataplane: SidecarDataplane, resolver: NetnsResolver, handles: NetnsHandles
    ):
        self.dataplane = dataplane
        self.resolver = resolver
        self.handles = handles

    def enrol(self, pod: PodState, defaults: NodeDefaults) -> Step:  # noqa: ARG002 - the seam's
        """In two steps, as the in-pod mode: the rules first, then (after the pods queued
        meanwhile had theirs) the pod counts as captured."""
        if pod.kernel_done == "in" and pod.netns is not None:
            done = dataclasses.replace(pod, kernel_done=None)
            return Step(done.with_outcome("Enrolled", "Captured", None))
        workload = pod.workload
        capture = workload.sidecar
        if capture is None:  # the reconciler gives this mode sidecar pods only
            return failed(pod, "NotASidecarPod", "the pod has no sidecar capture in the spec")
        try:
            netns = self.handles.hold(
                workload.uid, self.resolver.resolve(workload.uid, workload.ips)
            )
        except NetnsNotFoundError as exc:
            held = self.handles.held(workload.uid)
            if held is None:
                return failed(pod, "NetnsNotFound", str(exc))
            netns = held
        try:
            changes = self.dataplane.ensure(netns, capture, families(capture, workload.ips))
        except DataplaneError as exc:
            return failed(pod, exc.reason, exc.message)
        if changes and pod.outcome.state == "Enrolled":
            pod = repaired(pod, changes)
        elif changes:
            log.info(
                "captured %s/%s for its sidecar: %s",
                workload.namespace,
                workload.name,
                changes.describe(),
            )
        return Step(dataclasses.replace(pod, netns=netns, kernel_done="in"), more=True)

    def unenrol(
        self, pod: PodState, ips_held_by_others: Set[str], *, keep_annotation: bool = False
    ) -> Step:
        del ips_held_by_others, keep_annotation  # the seam's: nothing here is shared or ours
        workload = pod.workload
        self.handles.release(workload.uid)
        log.info(
            "%s/%s: no longer in the spec; its sidecar capture stays with the pod",
            workload.namespace,
            workload.name,
        )
        return Step(None)
