"""When the controller may take the not-ready taint off a node: the pure decision."""

from __future__ import annotations

from typing import Any

import pytest

from ambient_cni.controller.untaint import ready_for, without_key


def anc(
    *,
    ready: tuple[str, str] = ("True", "AllEnrolled"),
    observed: int | None = 4,
    generation: int = 4,
    owner: str | None = "u1",
    **conditions: str,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "node-1", "generation": generation}
    if owner is not None:
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": owner}
        ]
    found = {"ZtunnelConnected": "True", "HostRulesReady": "True", **conditions}
    status: dict[str, Any] = {
        "conditions": [
            {"type": "Ready", "status": ready[0], "reason": ready[1]},
            *({"type": kind, "status": value} for kind, value in found.items()),
        ]
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": meta, "status": status}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (anc(), "u1"),
        (anc(CniPluginInstalled="True"), "u1"),
        # One pod failing is that pod's problem: the node still redirects new pods.
        (anc(ready=("False", "NotReady")), "u1"),
        (anc(ready=("False", "AgentStopped")), None),
        (anc(ready=("False", "RedirectModeNotSupported")), None),
        (anc(ZtunnelConnected="False"), None),
        (anc(HostRulesReady="False"), None),
        (anc(CniPluginInstalled="False"), None),
        (anc(observed=3), None),  # the agent has not reported on the current spec
        (anc(observed=None), None),  # a new object no agent has reported on
        (anc(owner=None), None),
        ({"metadata": {"name": "node-1", "generation": 1}}, None),
    ],
)
def test_ready_for_the_node_it_belongs_to(obj: dict[str, Any], expected: str | None) -> None:
    assert ready_for(obj) == expected


def test_only_the_taint_with_the_key_goes() -> None:
    taints = [
        {"key": "cni.istio.io/not-ready", "effect": "NoSchedule"},
        {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
        {"key": "cni.istio.io/not-ready", "effect": "NoExecute"},
    ]
    assert without_key(taints, "cni.istio.io/not-ready") == [taints[1]]
