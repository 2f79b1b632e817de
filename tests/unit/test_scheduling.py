from __future__ import annotations

from typing import Any

import pytest

from ambient_cni_sandbox.scheduling import NodeView, choose_node, fits, node_view

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
    node = {
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
    assert not node_view({"metadata": {"name": "x"}}).ready
