"""Where one pass leaves a pod, shared by the redirect modes: failed, repaired, held."""

from __future__ import annotations

import logging

from ambient_cni.dataplane.interfaces import Changes

from . import metrics
from .mode import PodState, Step

log = logging.getLogger("ambient_cni.agent")

RETRY_FAILED = 1.0
RETRY_REMOVING = 5.0


def repaired(pod: PodState, changes: Changes) -> PodState:
    """An enrolled pod's redirection was changed behind the agent's back and is right again."""
    workload = pod.workload
    for change in changes.items:
        metrics.REPAIRS.labels(change.kind).inc()
    what = changes.describe()
    log.warning("repaired %s/%s: %s", workload.namespace, workload.name, what)
    return pod.with_repair("DriftRepaired", what)


def still_redirected(pod: PodState, message: str, reason: str = "NetnsNotFound") -> Step:
    workload = pod.workload
    log.warning(
        "%s/%s: cannot take its redirection out yet (%s: %s); it stays redirected",
        workload.namespace,
        workload.name,
        reason,
        message,
    )
    return Step(pod.with_outcome("Removing", reason, message), RETRY_REMOVING)


def failed(pod: PodState, reason: str, message: str) -> Step:
    workload = pod.workload
    log.warning("%s/%s: %s: %s", workload.namespace, workload.name, reason, message)
    return Step(pod.with_outcome("Failed", reason, message), RETRY_FAILED)
