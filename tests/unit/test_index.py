from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- incremental indexes: answers in proportion to the answer, always equal to a recount ------

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.mark.parametrize(
    ("moves", "namespace", "nodes"),
    [
        ([], "shop", set()),
        ([("a", "n1", "shop")], "shop", {"n1"}),
        ([("a", "n1", "shop"), ("b", "n1", "shop")], "shop", {"n1"}),
        ([("a", "n1", "shop"), ("b", "n2", "shop")], "shop", {"n1", "n2"}),
        ([("a", "n1", "shop"), ("a", "n2", "shop")], "shop", {"n2"}),  # moved
        ([("a", "n1", "shop"), ("b", "n1", "shop"), ("a", None, "shop")], "shop", {"n1"}),
        ([("a", "n1", "shop"), ("a", None, "shop")], "shop", set()),  # unscheduled again
        ([("a", "n1", "shop"), ("b", "n2", "other")], "shop", {"n1"}),
        ([("a", "n1", "shop"), ("-", "a", "")], "shop", set()),  # deleted
        ([("a", "n1", "shop"), ("b", "n1", "shop"), ("-", "a", "")], "shop", {"n1"}),
    ],
)
def test_namespace_to_nodes(
    moves: list[tuple[str, str | None, str]], namespace: str, nodes: set[str]
) -> None:
    index = ClusterIndex()
    for uid, node, ns in moves:
        if uid == "-":
            index.delete_pod(str(node))
        else:
            index.set_pod(pod(uid, node=node, namespace=ns))
    assert index.nodes_with_pods_in(namespace) == nodes
    index.set_namespace(namespace, {})
    assert index.set_namespace(namespace, AMBIENT) == nodes  # a label change: those nodes only


def test_namespace_labels_are_a_view_not_a_copy() -> None:
    index = ClusterIndex()
    labels = index.namespace_labels()
    index.set_namespace("shop", AMBIENT)
    assert labels["shop"] == AMBIENT  # the same view sees the change
    assert index.namespace_labels() is labels
    with pytest.raises(TypeError):
        labels["other"] = {}  # type: ignore[index]


def test_sizes_move_with_the_counters() -> None:
    moved: dict[str, int] = {}
    index = ClusterIndex(
        on_resize=lambda kind, delta: moved.__setitem__(kind, moved.get(kind, 0) + delta)
    )
    index.set_node("n1", "u1")
    index.set_node("n1", "u2")  # the same node, re-created: still one
    index.set_pod(pod("a"))
    index.set_pod(pod("a", ips=("10.0.0.1",)))  # changed, not added
    index.set_pod(pod("b"))
    index.delete_pod("b")
    index.delete_pod("b")
    index.set_namespace("shop", {})
    index.set_namespace("shop", AMBIENT)
    index.delete_namespace("gone")
    assert moved == {"nodes": 1, "pods": 1, "namespaces": 1}
    assert moved == index.sizes()


def test_retain_forgets_what_a_relist_no_longer_holds() -> None:
    index = ClusterIndex()
    index.set_pod(pod("a", node="n1"))
    index.set_pod(pod("b", node="n2"))
    index.set_pod(pod("c", node=None))
    assert index.retain_pods({"a"}) == {"n2"}
    assert index.pod("b") is None
    assert index.pod("c") is None
    index.set_namespace("shop", {})
    index.set_namespace("other", {})
    assert index.retain_namespaces({"other"}) == {"n1"}
    assert set(index.namespace_labels()) == {"other"}


UIDS = st.sampled_from(["a", "b", "c", "d", "e"])
NODES = st.sampled_from([None, "n1", "n2", "n3"])
NAMESPACES = st.sampled_from(["shop", "bank", "kube-system"])
MODES = st.sampled_from([{}, AMBIENT, {"istio.io/dataplane-mode": "none"}, {"team": "x"}])
EVENTS = st.one_of(
    st.tuples(st.just("pod"), UIDS, NODES, NAMESPACES, st.booleans()),
    st.tuples(st.just("delete_pod"), UIDS),
    st.tuples(st.just("namespace"), NAMESPACES, MODES),
    st.tuples(st.just("delete_namespace"), NAMESPACES),
    st.tuples(st.just("node"), NODES, st.sampled_from(["u1", "u2"])),
    st.tuples(st.just("delete_node"), NODES),
    st.tuples(st.just("retain_pods"), st.frozensets(UIDS)),
    st.tuples(st.just("retain_namespaces"), st.frozensets(NAMESPACES)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(EVENTS, max_size=40))
def test_incremental_index_equals_a_recount(events: list[tuple[Any, ...]]) -> None:
    """After any sequence of events, every answer equals one recomputed from scratch, and
    each update names exactly the nodes whose plan inputs changed."""
    moved: dict[str, int] = {"nodes": 0, "namespaces": 0, "pods": 0}
    index = ClusterIndex(on_resize=lambda kind, delta: moved.__setitem__(kind, moved[kind] + delta))
    pods: dict[str, PodView] = {}  # the model: plain dicts, recounted on every question
    namespaces: dict[str, dict[str, str]] = {}
    nodes: dict[str, str] = {}

    def in_namespace(ns: str) -> set[str]:
        return {p.node_name for p in pods.values() if p.namespace == ns and p.node_name}

    def relevant(labels: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in labels.items() if k == "istio.io/dataplane-mode"}

    for event in events:
        kind = event[0]
        if kind == "pod":
            _, uid, node, ns, ready = event
            ns = pods[uid].namespace if uid in pods else ns  # a pod never changes namespace
            new = pod(uid, node=node, namespace=ns, ready=ready)
            old = pods.get(uid)
            want = set() if old == new else {p.node_name for p in (old, new) if p and p.node_name}
            pods[uid] = new
            assert index.set_pod(new) == want
        elif kind == "delete_pod":
            old = pods.pop(event[1], None)
            assert index.delete_pod(event[1]) == (
                {old.node_name} if old and old.node_name else set()
            )
        elif kind == "namespace":
            _, ns, labels = event
            changed = namespaces.get(ns) != relevant(labels)
            namespaces[ns] = relevant(labels)
            assert index.set_namespace(ns, labels) == (in_namespace(ns) if changed else set())
        elif kind == "delete_namespace":
            had = namespaces.pop(event[1], None) is not None
            assert index.delete_namespace(event[1]) == (in_namespace(event[1]) if had else set())
        elif kind == "node":
            if event[1] is not None:
                changed = nodes.get(event[1]) != event[2]
                nodes[event[1]] = event[2]
                assert index.set_node(event[1], event[2]) == ({event[1]} if changed else set())
        elif kind == "delete_node":
            if event[1] is not None:
                nodes.pop(event[1], None)
                index.delete_node(event[1])
        elif kind == "retain_pods":
            gone = [uid for uid in pods if uid not in event[1]]
            want = {str(pods[uid].node_name) for uid in gone if pods[uid].node_name}
            for uid in gone:
                del pods[uid]
            assert index.retain_pods(event[1]) == want
        elif kind == "retain_namespaces":
            gone = [ns for ns in namespaces if ns not in event[1]]
            want = set().union(*(in_namespace(ns) for ns in gone))
            for ns in gone:
                del namespaces[ns]
            assert index.retain_namespaces(event[1]) == want

        for node in ("n1", "n2", "n3"):
            assert sorted(p.uid for p in index.pods_on(node)) == sorted(
                uid for uid, p in pods.items() if p.node_name == node
            )
        for ns in ("shop", "bank", "kube-system"):
            assert index.nodes_with_pods_in(ns) == in_namespace(ns)
        assert dict(index.namespace_labels()) == namespaces
        assert {uid: index.pod(uid) for uid in pods} == pods
        assert index.nodes() == sorted(nodes)
        assert index.sizes() == {
            "nodes": len(nodes),
            "namespaces": len(namespaces),
            "pods": len(pods),
        }
        assert moved == index.sizes()
