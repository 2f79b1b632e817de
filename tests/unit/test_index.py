from __future__ import annotations

from typing import Any

from ambient_cni.controller.index import ClusterIndex
from ambient_cni.selection import PodView


def pod(uid: str, node: str | None = "node-1", namespace: str = "shop", **extra: Any) -> PodView:
    return PodView(uid=uid, name=uid, namespace=namespace, node_name=node, **extra)


def test_pod_updates_affect_old_and_new_node_only_when_changed() -> None:
    index = ClusterIndex()
    assert index.set_pod(pod("a", node=None)) == set()
    assert index.set_pod(pod("a")) == {"node-1"}
    assert index.set_pod(pod("a")) == set()  # unchanged: nothing to re-plan
    assert index.set_pod(pod("a", node="node-2")) == {"node-1", "node-2"}
    assert [p.uid for p in index.pods_on("node-2")] == ["a"]
    assert index.pods_on("node-1") == []
    assert index.delete_pod("a") == {"node-2"}
    assert index.delete_pod("a") == set()


def test_namespace_changes_affect_nodes_with_its_pods_only_for_the_mode_label() -> None:
    index = ClusterIndex()
    index.set_pod(pod("a", node="node-1"))
    index.set_pod(pod("b", node="node-2"))
    index.set_pod(pod("c", node="node-3", namespace="other"))
    assert index.set_namespace("shop", {}) == {"node-1", "node-2"}
    assert index.set_namespace("shop", {"team": "x"}) == set()  # irrelevant label
    assert index.set_namespace("shop", {"istio.io/dataplane-mode": "ambient"}) == {
        "node-1",
        "node-2",
    }
    assert index.namespace_labels()["shop"] == {"istio.io/dataplane-mode": "ambient"}
    assert index.delete_namespace("shop") == {"node-1", "node-2"}
    assert index.delete_namespace("shop") == set()


def test_nodes() -> None:
    index = ClusterIndex()
    assert index.set_node("node-1", "u1") == {"node-1"}
    assert index.set_node("node-1", "u1") == set()
    assert index.set_node("node-1", "u2") == {"node-1"}  # re-created with a new uid
    assert index.node_uid("node-1") == "u2"
    index.delete_node("node-1")
    assert index.node_uid("node-1") is None
    assert index.sizes() == {"nodes": 0, "namespaces": 0, "pods": 0}
