"""The controller's in-memory view of the cluster, fed by watch events.

Each update returns the nodes whose desired spec may have changed, so the
writer re-plans only those. Updates that cannot change any spec (a pod's
unrelated status churn, a namespace's unrelated labels) affect no node.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from ambient_cni.api import names
from ambient_cni.selection import PodView


class ClusterIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, str] = {}  # name -> uid
        self._namespaces: dict[str, dict[str, str]] = {}  # name -> selection-relevant labels
        self._pods: dict[str, PodView] = {}  # uid -> view
        self._by_node: dict[str, set[str]] = {}  # node -> pod uids

    # -- nodes -------------------------------------------------------------------------

    def set_node(self, name: str, uid: str) -> set[str]:
        with self._lock:
            if self._nodes.get(name) == uid:
                return set()
            self._nodes[name] = uid
            return {name}

    def delete_node(self, name: str) -> set[str]:
        with self._lock:
            self._nodes.pop(name, None)
            return set()

    def node_uid(self, name: str) -> str | None:
        with self._lock:
            return self._nodes.get(name)

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    # -- namespaces --------------------------------------------------------------------

    def set_namespace(self, name: str, labels: Mapping[str, str]) -> set[str]:
        relevant = {k: v for k, v in labels.items() if k == names.DATAPLANE_MODE_LABEL}
        with self._lock:
            if self._namespaces.get(name) == relevant:
                return set()
            self._namespaces[name] = relevant
            return self._nodes_with_pods_in(name)

    def delete_namespace(self, name: str) -> set[str]:
        with self._lock:
            if self._namespaces.pop(name, None) is None:
                return set()
            return self._nodes_with_pods_in(name)

    def _nodes_with_pods_in(self, namespace: str) -> set[str]:
        return {
            p.node_name for p in self._pods.values() if p.namespace == namespace and p.node_name
        }

    def namespace_labels(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {name: dict(labels) for name, labels in self._namespaces.items()}

    # -- pods ------------------------------------------------------------------------

    def set_pod(self, pod: PodView) -> set[str]:
        with self._lock:
            old = self._pods.get(pod.uid)
            if old == pod:
                return set()
            self._pods[pod.uid] = pod
            affected = set()
            if old is not None and old.node_name:
                self._by_node.get(old.node_name, set()).discard(pod.uid)
                affected.add(old.node_name)
            if pod.node_name:
                self._by_node.setdefault(pod.node_name, set()).add(pod.uid)
                affected.add(pod.node_name)
            return affected

    def delete_pod(self, uid: str) -> set[str]:
        with self._lock:
            old = self._pods.pop(uid, None)
            if old is None or not old.node_name:
                return set()
            self._by_node.get(old.node_name, set()).discard(uid)
            return {old.node_name}

    def pods_on(self, node: str) -> list[PodView]:
        with self._lock:
            return [self._pods[uid] for uid in self._by_node.get(node, ())]

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "nodes": len(self._nodes),
                "namespaces": len(self._namespaces),
                "pods": len(self._pods),
            }
