"""Takes the not-ready taint off a node once its redirection is Ready (opt-in, as in Istio).

A node registered with `cni.istio.io/not-ready:NoSchedule` gets no ordinary pod
until this removes it, so no pod can start there before the node agent could
enrol it. Istio removes the taint when its istio-cni pod on the node is Ready;
here the signal is the node's AmbientNodeConfig, as its agent last reported on
the current spec: the agent running, its host rules in place, ztunnel
connected and istio-cni installed. One pod failing on the node does not keep
the taint (it is that pod's problem, in status). Like Istio, it never adds the
taint (the node pool does), and takes it off whenever it is there on a node
that is ready.

The decision is pure (`ready_for`), made on the watched copy and again on the
object read just before the patch (the agent may have stopped meanwhile); the
patch is a JSON patch that tests the taints it read before replacing them, so
a taint someone adds meanwhile is never lost.

Known limit, as in Istio (#55968): an agent that dies without a word leaves
its last status behind, so a node tainted again after that is untainted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ambient_cni.api import names
from ambient_cni.kube import as_body, discard, raw
from ambient_cni.workqueue import WorkQueue

from . import metrics

log = logging.getLogger("ambient_cni.controller.untaint")

JSON_PATCH = "application/json-patch+json"
ATTEMPTS = 5
MAX_BACKOFF = 60.0
# The conditions that say a new pod on the node would be redirected.
NEEDED = ("ZtunnelConnected", "HostRulesReady")


def ready_for(anc: Mapping[str, Any]) -> str | None:
    """The UID of the Node this AmbientNodeConfig says can redirect new pods, or None.

    Only when the agent reported on the current spec, runs (its last word when it stops
    is Ready=False, AgentStopped), supports the mode, and has ztunnel, its host rules
    and (where it runs one) the CNI plugin in place; and only for the Node the object
    belongs to (a Node re-created under the same name is another node).
    """
    meta = anc.get("metadata") or {}
    status = anc.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready")
    if ready is None or ready.get("reason") in ("AgentStopped", "RedirectModeNotSupported"):
        return None
    needed = [*NEEDED, *(["CniPluginInstalled"] if "CniPluginInstalled" in conditions else [])]
    if any((conditions.get(kind) or {}).get("status") != "True" for kind in needed):
        return None
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("kind") == "Node"]
    return str(owners[0]["uid"]) if owners else None


def without_key(taints: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    return [t for t in taints if t.get("key") != key]


class NodeUntainter:
    def __init__(self, api: ApiClient, key: str, leading: threading.Event):
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)
        self.key = key
        self.leading = leading
        self.queue: WorkQueue[str] = WorkQueue()
        self._lock = threading.Lock()
        self._tainted: dict[str, str] = {}  # node name -> uid, for nodes with the taint
        self._ready: dict[str, str] = {}  # node name -> the Node UID its object says is Ready
        self._failures: dict[str, int] = {}  # node name -> failed patches in a row

    def on_node(self, node: Mapping[str, Any], *, deleted: bool = False) -> None:
        name = str(node["metadata"]["name"])
        taints = (node.get("spec") or {}).get("taints") or []
        with self._lock:
            if deleted or not any(t.get("key") == self.key for t in taints):
                self._tainted.pop(name, None)
            else:
                self._tainted[name] = str(node["metadata"]["uid"])
        self._check(name)

    def on_anc(self, anc: Mapping[str, Any], *, deleted: bool = False) -> None:
        name = str(anc["metadata"]["name"])
        uid = None if deleted else ready_for(anc)
        with self._lock:
            if uid is None:
                self._ready.pop(name, None)
            else:
                self._ready[name] = uid
        self._check(name)

    def became_leader(self) -> None:
        with self._lock:
            names = list(self._tainted)
        for name in names:
            self._check(name)

    def _check(self, name: str) -> None:
        with self._lock:
            due = name in self._tainted and self._tainted[name] == self._ready.get(name)
        if due and self.leading.is_set():
            self.queue.add(name)

    def start(self) -> None:
        self.queue.start(self._untaint, name="node-untaint", on_error=self._failed)

    def _failed(self, name: str, exc: Exception) -> None:
        """Retried with backoff (a missing RBAC rule would otherwise fail every second)."""
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        delay = min(2.0**failures, MAX_BACKOFF)
        log.warning("cannot take %s off node %s (retry in %.0f s): %s", self.key, name, delay, exc)
        self.queue.add_after(name, delay)

    def stop(self) -> None:
        self.queue.join()

    def _untaint(self, name: str) -> None:
        if not self.leading.is_set():
            return  # the leader does it
        try:
            anc = raw(
                self.custom.get_cluster_custom_object(
                    names.GROUP, names.VERSION, names.PLURAL, name, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        ready = ready_for(anc)  # as it is now, not as the watch last said
        for attempt in range(1, ATTEMPTS + 1):
            try:
                node = raw(self.core.read_node(name, _preload_content=False))
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            if ready != node["metadata"]["uid"]:
                return  # not ready, or another Node now has this name
            taints = (node.get("spec") or {}).get("taints") or []
            kept = without_key(taints, self.key)
            if len(kept) == len(taints):
                return
            patch: list[dict[str, Any]] = [
                {"op": "test", "path": "/spec/taints", "value": taints},
                {"op": "replace", "path": "/spec/taints", "value": kept},
            ]
            try:
                discard(
                    self.core.patch_node(
                        name, as_body(patch), _content_type=JSON_PATCH, _preload_content=False
                    )
                )
            except ApiException as exc:
                # 422: the test failed (the taints changed since read); 409: a conflict.
                if exc.status in (409, 422) and attempt < ATTEMPTS:
                    continue
                if exc.status == 404:
                    return
                raise
            self._failures.pop(name, None)
            metrics.NODE_UNTAINTS.inc()
            log.info("removed taint %s from node %s: it redirects new pods", self.key, name)
            return
