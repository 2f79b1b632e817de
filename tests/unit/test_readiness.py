"""check-ready: every node's object Ready, orphans (no Node) reported and not waited for."""

from __future__ import annotations

from typing import Any

from ambient_cni.readiness import _orphans, _problems


def anc(name: str, ready: str, *, orphan: bool = False, behind: bool = False) -> dict[str, Any]:
    labels = {"cni.ambient.dev/orphaned": "true"} if orphan else {}
    return {
        "metadata": {"name": name, "generation": 2, "labels": labels},
        "status": {
            "observedGeneration": 1 if behind else 2,
            "conditions": [{"type": "Ready", "status": ready, "message": "why not"}],
        },
    }


def test_ready_nodes_have_no_problems_and_orphans_are_left_out() -> None:
    items = [anc("node-1", "True"), anc("node-9", "False", orphan=True)]
    assert _problems(items) == []
    assert _orphans(items) == ["node-9"]


def test_a_node_not_ready_or_behind_is_a_problem() -> None:
    assert _problems([anc("node-1", "False"), anc("node-2", "True", behind=True)]) == [
        "node-1: not Ready: why not",
        "node-2: status is behind the spec (not reconciled yet)",
    ]
