"""After a relist, the controller forgets what the new list no longer holds."""

from __future__ import annotations

from kubernetes.client import ApiClient

from ambient_cni.controller.app import Controller, ControllerOptions


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

    ctl.on_nodes_listed({"n1"})
    ctl.on_namespaces_listed({"shop"})
    ctl.on_pods_listed({"a"})
    ctl.on_ancs_listed({"n1"})

    assert ctl.index.nodes() == ["n1"]
    assert set(ctl.index.namespace_labels()) == {"shop"}
    assert ctl.index.pod("b") is None
    assert ctl.index.pod("a") is not None
    assert ctl.writer.known() == ["n1"]
