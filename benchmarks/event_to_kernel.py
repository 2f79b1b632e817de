"""Benchmark 3: from a namespace label to rules in each pod's kernel namespace and
to its `ambient.istio.io/redirection: enabled` annotation, on the full sandbox
(controller, an agent and a ztunnel stand-in per node, real pods)."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import CoreV1Api

from ambient_cni.api import names
from ambient_cni.kube import MERGE_PATCH, as_body
from ambient_cni.reflector import Reflector
from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.components import Mesh

from .measure import RuleEvents, percentiles, wait_until

NAMESPACE = "bench-event"


def run(cluster: SandboxCluster, pods: int = 50, backend: str = "iptables-nft") -> dict[str, Any]:
    mesh = Mesh(cluster, f"--backend={backend}", "--kubelet-uid=0")
    stop = threading.Event()
    events: RuleEvents | None = None
    try:
        mesh.start()
        cluster.create_namespace(NAMESPACE)
        nodes = cluster.node_names
        pod_names = [f"pod-{i:03d}" for i in range(pods)]
        for i, name in enumerate(pod_names):
            cluster.create_pod(NAMESPACE, name, node=nodes[i % len(nodes)])
        running = {name: cluster.wait_running(NAMESPACE, name, timeout=120) for name in pod_names}
        events = kernel = RuleEvents(
            {name: Path("/run/netns") / cluster.pod_netns(pod) for name, pod in running.items()}
        )
        enabled_at: dict[str, float] = {}
        watch: Reflector

        def seen(key: str) -> None:
            pod = watch.get(key)
            if pod is None:
                return
            annotations = pod["metadata"].get("annotations") or {}
            if annotations.get(names.REDIRECTION_ANNOTATION) == "enabled":
                enabled_at.setdefault(pod["metadata"]["name"], time.monotonic())

        watch = Reflector(
            "bench-pods",
            functools.partial(CoreV1Api(cluster.api).list_namespaced_pod, NAMESPACE),
            seen,
        )
        watch.start(stop)
        wait_until("the pod watch to sync", watch.synced.is_set, timeout=30)

        labelled_at = time.monotonic()
        cluster.core.patch_namespace(
            NAMESPACE,
            as_body({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}),
            _content_type=MERGE_PATCH,
        )
        wait_until(
            f"{pods} pods annotated enabled",
            lambda: len(enabled_at) == pods and len(kernel.added) == pods,
            timeout=120,
        )
        to_kernel = [events.added[name] - labelled_at for name in pod_names]
        to_annotation = [enabled_at[name] - labelled_at for name in pod_names]
        return {
            "backend": backend,
            "pods": pods,
            "nodes": len(nodes),
            "label_to_kernel_s": percentiles(to_kernel),
            "label_to_annotation_s": percentiles(to_annotation),
        }
    finally:
        stop.set()
        if events is not None:
            events.close()
        mesh.stop()
        cluster.delete_namespace(NAMESPACE)
        wait_until(
            f"namespace {NAMESPACE} to be gone",
            lambda: cluster.namespace(NAMESPACE) is None,
            timeout=120,
            interval=0.2,
        )
