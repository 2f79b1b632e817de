from __future__ import annotations

from typing import Any

import pytest

from ambient_cni_sandbox.scheduling import (
    NodeView,
    Taint,
    choose_node,
    fits,
    node_view,
    tolerates,
    unschedulable_message,
)

NODES = [
    NodeView(name="node-2", ready=True, labels={"zone": "b"}),
    NodeView(name="node-1", ready=True, labels={"zone": "a", "gpu": "yes"}),
    NodeView(name="node-3", ready=False, labels={"zone": "a"}),
    NodeView(name="node-4", ready=True, unschedulable=True, labels={"zone": "a"}),
]


def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
    return {
        "spec": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": list(terms)
                    }
                }
            }
        }
    }


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        ({}, ["node-1", "node-2"]),
        ({"spec": {"nodeSelector": {"zone": "a"}}}, ["node-1"]),
        ({"spec": {"nodeSelector": {"zone": "c"}}}, []),
        (
            affinity({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}),
            ["node-2"],
        ),
        (
            affinity({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}),
            ["node-1"],
        ),
        (affinity({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}), ["node-1"]),
        (affinity({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}), ["node-2"]),
        (affinity({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["1"]}]}), []),
        # The DaemonSet controller's per-node affinity.
        (
            affinity(
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-2"]}]}
            ),
            ["node-2"],
        ),
        # Terms are ORed; expressions within a term are ANDed.
        (
            affinity(
                {
                    "matchExpressions": [
                        {"key": "zone", "operator": "In", "values": ["a"]},
                        {"key": "gpu", "operator": "DoesNotExist"},
                    ]
                },
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
            ),
            ["node-2"],
        ),
    ],
)
def test_candidates(pod: dict[str, Any], expected: list[str]) -> None:
    chosen = {choose_node(pod, NODES, turn) for turn in range(4)}
    assert sorted(n for n in chosen if n) == expected
    if not expected:
        assert chosen == {None}


def test_round_robin_in_name_order() -> None:
    assert [choose_node({}, NODES, turn) for turn in range(4)] == ["node-1", "node-2"] * 2


def test_fits_ignores_readiness() -> None:
    assert fits({}, NODES[2])


def test_node_view_from_api_json() -> None:
    node: dict[str, Any] = {
        "metadata": {"name": "node-1", "labels": {"a": "b"}},
        "spec": {"unschedulable": True},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True"},
            ]
        },
    }
    assert node_view(node) == NodeView(
        name="node-1", ready=True, unschedulable=True, labels={"a": "b"}
    )
    node["spec"]["taints"] = [{"key": "k", "effect": "NoSchedule"}]
    assert node_view(node).taints == (Taint(key="k", effect="NoSchedule"),)
    assert not node_view({"metadata": {"name": "x"}}).ready


def hostname(name: str) -> dict[str, str]:
    return {"kubernetes.io/hostname": name}


NOT_READY = Taint(key="cni.istio.io/not-ready", effect="NoSchedule")


@pytest.mark.parametrize(
    ("toleration", "expected"),
    [
        ({"key": "cni.istio.io/not-ready", "operator": "Exists"}, True),
        ({"key": "cni.istio.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"key": "cni.istio.io/not-ready", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"key": "cni.istio.io/not-ready"}, True),  # Equal to the empty value
        ({"key": "cni.istio.io/not-ready", "value": "true"}, False),
        ({"operator": "Exists"}, True),  # tolerates everything, as DaemonSets often do
        ({"operator": "Equal"}, False),  # an empty key needs Exists
        ({"key": "other", "operator": "Exists"}, False),
    ],
)
def test_tolerations_match_taints_as_in_kubernetes(
    toleration: dict[str, str], expected: bool
) -> None:
    assert tolerates(toleration, NOT_READY) is expected


def test_a_tainted_node_takes_only_pods_that_tolerate_it_and_says_why_not() -> None:
    nodes = [
        NodeView(name="node-1", ready=True, labels=hostname("node-1"), taints=(NOT_READY,)),
        NodeView(name="node-2", ready=True, labels=hostname("node-2")),
        NodeView(
            name="node-3",
            ready=True,
            labels=hostname("node-3"),
            taints=(Taint(key="soft", effect="PreferNoSchedule"),),
        ),
    ]
    assert {choose_node({}, nodes, turn) for turn in range(3)} == {"node-2", "node-3"}
    tolerant = {"spec": {"tolerations": [{"operator": "Exists"}]}}
    assert {choose_node(tolerant, nodes, turn) for turn in range(3)} == {
        "node-1",
        "node-2",
        "node-3",
    }
    pinned = {"spec": {"nodeSelector": {"kubernetes.io/hostname": "node-1"}}}
    assert choose_node(pinned, nodes, 0) is None
    assert unschedulable_message(pinned, nodes) == (
        "0/3 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, "
        "1 node(s) had untolerated taint {cni.istio.io/not-ready: }."
    )
