"""The agent's writes to the API server: the pod annotation and its node's status."""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ambient_cni.api import names
from ambient_cni.api.models import Workload
from ambient_cni.kube import MERGE_PATCH, as_body, raw

from .interfaces import StatusWriteError

OURS = (names.REDIRECTION_ENABLED, names.REDIRECTION_PENDING)


class KubePodApi:
    """Reads pods; writes `ambient.istio.io/redirection` through `pods/status`, as Istio's agent
    does (the chart's admission policy lets the agent write nothing else there)."""

    def __init__(self, api: ApiClient):
        self.core = CoreV1Api(api)

    def _read(self, workload: Workload) -> dict[str, Any] | None:
        """The pod's metadata, None if it is gone or another pod now has its name."""
        try:
            pod = self.core.read_namespaced_pod(
                workload.name, workload.namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        meta: dict[str, Any] = raw(pod)["metadata"]
        return meta if meta.get("uid") == workload.uid else None

    def exists(self, workload: Workload) -> bool:
        return self._read(workload) is not None

    def annotate(self, workload: Workload, value: str | None) -> None:
        meta = self._read(workload)
        if meta is None:
            return
        current = (meta.get("annotations") or {}).get(names.REDIRECTION_ANNOTATION)
        if current in (names.REDIRECTION_DISABLED, value):
            return
        if value is None and current not in OURS:
            return
        patch = {"metadata": {"annotations": {names.REDIRECTION_ANNOTATION: value}}}
        self.core.patch_namespaced_pod_status(
            workload.name, workload.namespace, as_body(patch), _content_type=MERGE_PATCH
        )


class KubeStatusWriter:
    """Merge patches to one AmbientNodeConfig's status subresource."""

    def __init__(self, api: ApiClient, node: str):
        self.custom = CustomObjectsApi(api)
        self.node = node

    def write(self, patch: dict[str, Any]) -> dict[str, Any] | None:
        try:
            written = self.custom.patch_cluster_custom_object_status(
                names.GROUP,
                names.VERSION,
                names.PLURAL,
                self.node,
                as_body({"status": patch}),
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise StatusWriteError(f"writing status of {self.node}: {exc.reason}") from exc
        return raw(written)
