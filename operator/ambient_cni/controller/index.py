"""The controller's in-memory view of the cluster, fed by watch events.

Each update returns the nodes whose desired spec may have changed, so the
writer re-plans only those. Updates that cannot change any spec (a pod's
unrelated status churn, a namespace's unrelated labels) affect no node.

Every answer costs in proportion to the answer, not to the cluster: the
index keeps node -> pods and namespace -> nodes (with a count of that
namespace's pods on each node) up to date on every event, so a namespace
change finds its nodes without walking the pods. Sizes are reported as
they move (`on_resize`), never recounted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from ambient_cni.api import names
from ambient_cni.selection import PodView

NODES = "nodes"
NAMESPACES = "namespaces"
PODS = "pods"

# Called with a kind (NODES, NAMESPACES, PODS) and by how much its count moved.
ResizeHook = Callable[[str, int], None]


def _ignore(_kind: str, _delta: int) -> None:
    pass


class ClusterIndex:
    def __init__(self, on_resize: ResizeHook | None = None) -> None:
        self._lock = threading.Lock()
        self._on_resize = on_resize or _ignore
        self._nodes: dict[str, str] = {}  # name -> uid
        # name -> selection-relevant labels; a value is replaced, never changed in place, so
        # readers get a view of this dict rather than a copy.
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._namespace_view = MappingProxyType(self._namespaces)
        self._pods: dict[str, PodView] = {}  # uid -> view
        self._by_node: dict[str, dict[str, PodView]] = {}  # node -> uid -> view
        self._ns_nodes: dict[str, dict[str, int]] = {}  # namespace -> node -> its pods there

    # -- nodes -------------------------------------------------------------------------

    def set_node(self, name: str, uid: str) -> set[str]:
        with self._lock:
            old = self._nodes.get(name)
            if old == uid:
                return set()
            self._nodes[name] = uid
        if old is None:
            self._on_resize(NODES, 1)
        return {name}

    def delete_node(self, name: str) -> set[str]:
        with self._lock:
            gone = self._nodes.pop(name, None) is not None
        if gone:
            self._on_resize(NODES, -1)
        return set()

    def node_uid(self, name: str) -> str | None:
        return self._nodes.get(name)  # one dict read: atomic, no lock needed

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    # -- namespaces --------------------------------------------------------------------

    def set_namespace(self, name: str, labels: Mapping[str, str]) -> set[str]:
        mode = labels.get(names.DATAPLANE_MODE_LABEL)
        relevant: Mapping[str, str] = {} if mode is None else {names.DATAPLANE_MODE_LABEL: mode}
        with self._lock:
            old = self._namespaces.get(name)
            if old == relevant:
                return set()
            self._namespaces[name] = relevant
            affected = set(self._ns_nodes.get(name, ()))
        if old is None:
            self._on_resize(NAMESPACES, 1)
        return affected

    def delete_namespace(self, name: str) -> set[str]:
        with self._lock:
            if self._namespaces.pop(name, None) is None:
                return set()
            affected = set(self._ns_nodes.get(name, ()))
        self._on_resize(NAMESPACES, -1)
        return affected

    def namespace_labels(self) -> Mapping[str, Mapping[str, str]]:
        """Every namespace's selection labels: a read-only view, not a copy."""
        return self._namespace_view

    def nodes_with_pods_in(self, namespace: str) -> set[str]:
        with self._lock:
            return set(self._ns_nodes.get(namespace, ()))

    # -- pods ------------------------------------------------------------------------

    def pod(self, uid: str) -> PodView | None:
        return self._pods.get(uid)

    def set_pod(self, pod: PodView) -> set[str]:
        with self._lock:
            old = self._pods.get(pod.uid)
            if old == pod:
                return set()
            self._pods[pod.uid] = pod
            affected = set()
            if old is not None:
                self._unplace(old)
                if old.node_name:
                    affected.add(old.node_name)
            self._place(pod)
            if pod.node_name:
                affected.add(pod.node_name)
        if old is None:
            self._on_resize(PODS, 1)
        return affected

    def delete_pod(self, uid: str) -> set[str]:
        with self._lock:
            old = self._pods.pop(uid, None)
            if old is None:
                return set()
            self._unplace(old)
        self._on_resize(PODS, -1)
        return {old.node_name} if old.node_name else set()

    def retain_pods(self, uids: Iterable[str]) -> set[str]:
        """Forget every pod not in `uids` (after a relist): the nodes they were on."""
        keep = set(uids)
        with self._lock:
            gone = [uid for uid in self._pods if uid not in keep]
        affected: set[str] = set()
        for uid in gone:
            affected |= self.delete_pod(uid)
        return affected

    def retain_namespaces(self, kept: Iterable[str]) -> set[str]:
        """Forget every namespace not in `kept` (after a relist): the nodes with pods in them."""
        keep = set(kept)
        with self._lock:
            gone = [name for name in self._namespaces if name not in keep]
        affected: set[str] = set()
        for name in gone:
            affected |= self.delete_namespace(name)
        return affected

    def _place(self, pod: PodView) -> None:
        node = pod.node_name
        if not node:
            return
        self._by_node.setdefault(node, {})[pod.uid] = pod
        counts = self._ns_nodes.setdefault(pod.namespace, {})
        counts[node] = counts.get(node, 0) + 1

    def _unplace(self, pod: PodView) -> None:
        node = pod.node_name
        if not node:
            return
        on_node = self._by_node.get(node)
        if on_node is not None:
            on_node.pop(pod.uid, None)
            if not on_node:
                del self._by_node[node]
        counts = self._ns_nodes.get(pod.namespace)
        if counts is not None:
            left = counts.get(node, 0) - 1
            if left > 0:
                counts[node] = left
            else:
                counts.pop(node, None)
                if not counts:
                    del self._ns_nodes[pod.namespace]

    def pods_on(self, node: str) -> list[PodView]:
        with self._lock:
            return list(self._by_node.get(node, {}).values())

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                NODES: len(self._nodes),
                NAMESPACES: len(self._namespaces),
                PODS: len(self._pods),
            }
