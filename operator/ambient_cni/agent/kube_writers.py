"""The agent's writes to the API server: the pod annotation, its node's status and Events."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ambient_cni.api import names
from ambient_cni.api.models import Workload
from ambient_cni.event_recorder import EventRecorder, ObjectRef
from ambient_cni.kube import MERGE_PATCH, as_body, discard, raw

from .events import EventNote
from .interfaces import StatusWriteError

OURS = (names.REDIRECTION_ENABLED, names.REDIRECTION_PENDING)


class PodCache(Protocol):
    """A watched copy of the pods on this node, by UID (a reflector)."""

    synced: threading.Event

    def get(self, key: str) -> dict[str, Any] | None: ...


STATUS_WRITE_TIMEOUT = (3.0, 10.0)  # seconds to connect, to read the answer

# A pod in these phases has no sandbox, and so no netns: the kubelet tears it down once
# every container has ended for good.
TERMINAL = ("Succeeded", "Failed")

# Tries of an annotation write whose pod changed between its read and the write.
CONFLICT_TRIES = 3


class KubePodApi:
    """Reads pods; writes `ambient.istio.io/redirection` through `pods/status`, as Istio's agent
    does (the chart's admission policy lets the agent write nothing else there).

    With `pods`, a watched copy of the node's pods, a pod is read from it rather than
    from the server (Istio's agent has the same informer): a pod enrolled costs one
    request, the patch, and a pod already annotated none. Every patch carries the
    resourceVersion it was decided on, so a pod changed meanwhile (a user's `disabled`,
    a copy not yet current) is a conflict, read again from the server and decided anew.
    """

    def __init__(self, api: ApiClient, pods: PodCache | None = None):
        self.core = CoreV1Api(api)
        self.pods = pods

    def _read(self, workload: Workload) -> dict[str, Any] | None:
        """The pod from the server, None if it is gone or another pod now has its name."""
        try:
            answer = self.core.read_namespaced_pod(
                workload.name, workload.namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        pod: dict[str, Any] = raw(answer)
        return pod if pod["metadata"].get("uid") == workload.uid else None

    def _cached(self, workload: Workload) -> dict[str, Any] | None:
        if self.pods is None or not self.pods.synced.is_set():
            return None
        return self.pods.get(workload.uid)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """From the server: at CNI ADD the watched copy may not have the pod yet."""
        try:
            answer = self.core.read_namespaced_pod(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return raw(answer)

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        try:
            answer = self.core.read_namespace(namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(raw(answer)["metadata"].get("labels") or {})

    def has_sandbox(self, workload: Workload) -> bool:
        # Only a pod the copy has is taken from it: one it lacks may not have arrived yet.
        pod = self._cached(workload) or self._read(workload)
        return pod is not None and (pod.get("status") or {}).get("phase") not in TERMINAL

    def annotate(self, workload: Workload, value: str | None) -> None:
        pod = self._cached(workload) or self._read(workload)
        for attempt in range(1, CONFLICT_TRIES + 1):
            if pod is None:
                return
            meta = pod["metadata"]
            current = (meta.get("annotations") or {}).get(names.REDIRECTION_ANNOTATION)
            if current in (names.REDIRECTION_DISABLED, value):
                return
            if value is None and current not in OURS:
                return
            patch = {
                "metadata": {
                    "resourceVersion": meta["resourceVersion"],
                    "annotations": {names.REDIRECTION_ANNOTATION: value},
                }
            }
            try:
                answer = self.core.patch_namespaced_pod_status(
                    workload.name,
                    workload.namespace,
                    as_body(patch),
                    _content_type=MERGE_PATCH,
                    _preload_content=False,  # no V1Pod built from the answer, which is not used
                )
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409 or attempt == CONFLICT_TRIES:
                    raise
                pod = self._read(workload)  # changed since it was read: read it again
                continue
            discard(answer)
            return


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
                # Bounded: the last write happens at shutdown, when the API may be unreachable.
                _request_timeout=STATUS_WRITE_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise StatusWriteError(f"writing status of {self.node}: {exc.reason}") from exc
        return raw(written)


class KubeNodeEvents:
    """Events on one node's AmbientNodeConfig (cluster-scoped), through a recorder."""

    def __init__(self, recorder: EventRecorder, node: str):
        self.recorder = recorder
        self.node = node

    def record(self, uid: str, notes: Sequence[EventNote]) -> None:
        ref = ObjectRef(names.API_VERSION, names.KIND, self.node, uid)
        for note in notes:
            self.recorder.record(ref, note.type, note.reason, note.message, count=note.count)
