"""After a relist, the controller forgets what the new list no longer holds."""

from __future__ import annotations

import kopf
import pytest
from kubernetes.client import ApiClient

from ambient_cni.controller.app import (
    WATCH_SILENCE_LIMIT,
    Controller,
    ControllerOptions,
    check_watches,
)


def controller() -> Controller:
    return Controller(ControllerOptions(leader_election=False), ApiClient())


def pod(uid: str, node: str) -> dict[str, object]:
    return {
        "metadata": {"uid": uid, "name": uid, "namespace": "shop"},
        "spec": {"nodeName": node},
        "status": {"podIP": "10.0.0.1"},
    }


def test_a_relist_forgets_deleted_nodes_pods_namespaces_and_objects() -> None:
    ctl = controller()
    ctl.on_node({"metadata": {"name": "n1", "uid": "u1"}})
    ctl.on_node({"metadata": {"name": "n2", "uid": "u2"}})
    ctl.on_namespace({"metadata": {"name": "shop"}})
    ctl.on_namespace({"metadata": {"name": "gone"}})
    ctl.on_pod(pod("a", "n1"))
    ctl.on_pod(pod("b", "n2"))
    anc = {"metadata": {"name": "n2", "uid": "x", "generation": 1, "resourceVersion": "5"}}
    ctl.on_anc({**anc, "spec": {"nodeName": "n2"}})
    ctl.on_anc({**anc, "metadata": {**anc["metadata"], "name": "n1"}, "spec": {}})

    ctl.on_nodes_listed({"n1"}, "9")
    ctl.on_namespaces_listed({"shop"}, "9")
    ctl.on_pods_listed({"a"}, "9")
    ctl.on_ancs_listed({"n1"}, "9")

    assert ctl.index.nodes() == ["n1"]
    assert set(ctl.index.namespace_labels()) == {"shop"}
    assert ctl.index.pod("b") is None
    assert ctl.index.pod("a") is not None
    assert ctl.writer.unlisted(set(), "9") == ["n1"]  # n2's object is forgotten


def test_an_object_created_after_the_lists_snapshot_is_not_taken_for_deleted() -> None:
    ctl = controller()
    for name, rv in (("old", "5"), ("new", "120")):  # "new": our own create, answered at 120
        meta = {"name": name, "uid": name, "generation": 1, "resourceVersion": rv}
        ctl.on_anc({"metadata": meta, "spec": {"nodeName": name}})
    ctl.on_ancs_listed(set(), "100")  # a list taken at 100 held neither
    assert ctl.writer.unlisted(set(), "1000") == ["new"]


def test_liveness_fails_while_a_watch_hears_nothing() -> None:
    ctl = controller()
    assert set(check_watches(ctl)) == {"pods", "namespaces", "nodes", "ambientnodeconfigs"}
    ctl.pods.last_contact -= WATCH_SILENCE_LIMIT + 1  # stuck on a dead connection
    with pytest.raises(kopf.PermanentError, match="pods"):
        check_watches(ctl)
