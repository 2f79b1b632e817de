from __future__ import annotations

from typing import Any

from ambient_cni.api.models import SidecarCapture
from ambient_cni.controller.planner import PlannerConfig, choose_ztunnel, plan
from ambient_cni.selection import PodView, SelectionConfig
from ambient_cni.sidecar import ProxyFacts

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def pod(name: str, node: str = "node-1", **overrides: Any) -> PodView:
    base: dict[str, Any] = {
        "uid": f"uid-{name}",
        "name": name,
        "namespace": "shop",
        "node_name": node,
        "ips": (f"10.0.0.{len(name)}",),
        "phase": "Running",
        "ready": True,
        "created": "2026-01-01T00:00:00Z",
    }
    return PodView(**{**base, **overrides})


def ztunnel(name: str, node: str = "node-1", **overrides: Any) -> PodView:
    return pod(name, node, namespace="istio-system", labels={"app": "ztunnel"}, **overrides)


def test_every_node_gets_a_spec_with_its_enrolled_pods_sorted() -> None:
    pods = [
        pod("b"),
        pod("a"),
        pod("c", node="node-2"),
        pod("x", node="gone"),
        pod("d", namespace="other"),
    ]
    specs = plan(["node-1", "node-2", "node-3"], pods, {"shop": AMBIENT}, PlannerConfig())
    assert {n: [w.name for w in s.workloads] for n, s in specs.items()} == {
        "node-1": ["a", "b"],
        "node-2": ["c"],
        "node-3": [],
    }
    assert specs["node-3"].to_wire() == {
        "nodeName": "node-3",
        "redirectMode": "inpod",
        "dnsCapture": True,
        "workloads": [],
    }


def test_global_settings_flow_into_specs() -> None:
    config = PlannerConfig(redirect_mode="node", dns_capture=False)
    spec = plan(["node-1"], [], {}, config)["node-1"]
    assert (spec.redirect_mode, spec.dns_capture) == ("node", False)


def test_ztunnel_is_chosen_per_node_and_not_enrolled() -> None:
    specs = plan(
        ["node-1", "node-2"],
        [ztunnel("zt-1"), ztunnel("zt-2", node="node-2", ready=False)],
        {"istio-system": AMBIENT},
        PlannerConfig(),
    )
    one, two = specs["node-1"], specs["node-2"]
    assert one.ztunnel is not None
    assert (one.ztunnel.name, one.ztunnel.ready, one.ztunnel.ip) == ("zt-1", True, "10.0.0.4")
    assert two.ztunnel is not None
    assert (two.ztunnel.name, two.ztunnel.ready) == ("zt-2", False)
    assert one.workloads == two.workloads == []


def test_ztunnel_preference_during_rollout() -> None:
    config = SelectionConfig()
    old_ready = ztunnel("old", created="2026-01-01T00:00:00Z")
    new_starting = ztunnel("new", created="2026-01-02T00:00:00Z", ready=False)
    assert choose_ztunnel([old_ready, new_starting], config).name == "old"  # type: ignore[union-attr]
    new_ready = ztunnel("new", created="2026-01-02T00:00:00Z")
    assert choose_ztunnel([old_ready, new_ready], config).name == "new"  # type: ignore[union-attr]
    deleting = ztunnel("old", deleting=True)
    assert choose_ztunnel([deleting, new_ready], config).name == "new"  # type: ignore[union-attr]
    assert choose_ztunnel([ztunnel("done", phase="Succeeded")], config) is None
    assert choose_ztunnel([pod("app")], config) is None


def test_plan_is_deterministic() -> None:
    pods = [pod(n) for n in "qwertyuiop"]
    first = plan(["node-1"], pods, {"shop": AMBIENT}, PlannerConfig())
    again = plan(["node-1"], list(reversed(pods)), {"shop": AMBIENT}, PlannerConfig())
    assert first == again


def test_sidecar_pods_are_listed_with_their_capture_and_never_as_ambient() -> None:
    injected = {"sidecar.istio.io/status": "{}"}
    proxy = ProxyFacts(proxy_args=("proxy", "sidecar"), annotations=injected)
    pods = [
        pod("app"),
        pod("side", namespace="web", annotations=injected, proxy=proxy),
        pod("kube", namespace="kube-system", annotations=injected, proxy=proxy),
        pod("own", proxy=proxy),  # a proxy container but never injected: ambient
        pod("done", namespace="web", annotations=injected, proxy=proxy, phase="Succeeded"),
        pod("early", namespace="web", annotations=injected, proxy=proxy, ips=()),
        # Injected, in an ambient namespace: neither (Istio leaves it to the ambient path,
        # which redirects no sidecar pod).
        pod("both", annotations=injected, proxy=proxy),
    ]
    spec = plan(["node-1"], pods, {"shop": AMBIENT, "web": {}}, PlannerConfig())["node-1"]
    found = {w.name: w.sidecar for w in spec.workloads}
    assert sorted(found) == ["app", "own", "side"]
    assert found["app"] is None
    assert found["own"] is None
    assert found["side"] == SidecarCapture()
