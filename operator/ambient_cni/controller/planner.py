"""Desired AmbientNodeConfig specs from the cluster view: pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from ambient_cni.api.models import AmbientNodeConfigSpec, RedirectMode, ZtunnelRef
from ambient_cni.selection import (
    PodView,
    SelectionConfig,
    desired_workload,
    is_ztunnel,
)


class PlannerConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    selection: SelectionConfig = SelectionConfig()
    redirect_mode: RedirectMode = "inpod"
    dns_capture: bool = True


def choose_ztunnel(pods: Iterable[PodView], config: SelectionConfig) -> ZtunnelRef | None:
    """The ztunnel pod serving a node: a ready one first, then one not being deleted,
    then the newest (a rolling update briefly runs two)."""
    candidates = [
        p for p in pods if is_ztunnel(p, config) and p.phase not in ("Succeeded", "Failed")
    ]
    if not candidates:
        return None
    best = max(
        candidates, key=lambda p: (p.ready and bool(p.ips), not p.deleting, p.created, p.name)
    )
    return ZtunnelRef(
        name=best.name,
        namespace=best.namespace,
        uid=best.uid,
        ip=best.ips[0] if best.ips else None,
        ready=best.ready and bool(best.ips),
    )


def plan_node(
    node: str,
    pods: Iterable[PodView],
    namespace_labels: Mapping[str, Mapping[str, str]],
    config: PlannerConfig,
) -> AmbientNodeConfigSpec:
    """The spec of one node, from the pods bound to it."""
    pods = list(pods)
    enrolled = []
    for pod in pods:
        found = desired_workload(pod, namespace_labels.get(pod.namespace), config.selection)
        if found is not None:
            enrolled.append(found)
    enrolled.sort(key=lambda w: (w.namespace, w.name, w.uid))
    return AmbientNodeConfigSpec(
        node_name=node,
        redirect_mode=config.redirect_mode,
        dns_capture=config.dns_capture,
        ztunnel=choose_ztunnel(pods, config.selection),
        workloads=enrolled,
    )


def plan(
    nodes: Iterable[str],
    pods: Iterable[PodView],
    namespace_labels: Mapping[str, Mapping[str, str]],
    config: PlannerConfig,
) -> dict[str, AmbientNodeConfigSpec]:
    """Every node's spec. Pods bound to unknown nodes are ignored."""
    by_node: dict[str, list[PodView]] = {node: [] for node in nodes}
    for pod in pods:
        if pod.node_name in by_node:
            by_node[pod.node_name].append(pod)
    return {
        node: plan_node(node, node_pods, namespace_labels, config)
        for node, node_pods in by_node.items()
    }
