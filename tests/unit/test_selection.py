"""Every selection rule of reference section 1, alone and in combination."""

from __future__ import annotations

from typing import Any

import pytest

from ambient_cni.selection import (
    SELECTION_LABELS,
    PodView,
    SelectionConfig,
    decide,
    desired_workload,
    knobs,
    pod_view,
    slim_pod_view,
    workload,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
CONFIG = SelectionConfig()


def pod(**overrides: Any) -> PodView:
    base: dict[str, Any] = {
        "uid": "u1",
        "name": "app",
        "namespace": "shop",
        "node_name": "node-1",
        "ips": ("10.244.0.5",),
        "phase": "Running",
    }
    return PodView(**{**base, **overrides})


CASES: list[tuple[str, PodView, dict[str, str] | None, bool, str]] = [
    ("namespace label enrols", pod(), AMBIENT, True, "NamespaceLabel"),
    ("no label anywhere", pod(), {}, False, "NotSelected"),
    ("unknown namespace", pod(), None, False, "NotSelected"),
    (
        "namespace label other value",
        pod(),
        {"istio.io/dataplane-mode": "sidecar"},
        False,
        "NotSelected",
    ),
    ("pod label enrols in unlabelled ns", pod(labels=AMBIENT), {}, True, "PodLabel"),
    (
        "pod label none opts out",
        pod(labels={"istio.io/dataplane-mode": "none"}),
        AMBIENT,
        False,
        "OptedOut",
    ),
    ("pod label ambient in labelled ns", pod(labels=AMBIENT), AMBIENT, True, "PodLabel"),
    ("excluded namespace", pod(namespace="kube-system"), AMBIENT, False, "ExcludedNamespace"),
    (
        "excluded ns beats pod label",
        pod(namespace="kube-system", labels=AMBIENT),
        {},
        False,
        "ExcludedNamespace",
    ),
    ("hostNetwork", pod(host_network=True), AMBIENT, False, "HostNetwork"),
    (
        "hostNetwork with pod label",
        pod(host_network=True, labels=AMBIENT),
        {},
        False,
        "HostNetwork",
    ),
    (
        "sidecar pod",
        pod(annotations={"sidecar.istio.io/status": "{}"}),
        AMBIENT,
        False,
        "SidecarPod",
    ),
    (
        "ztunnel pod",
        pod(namespace="istio-system", labels={"app": "ztunnel", **AMBIENT}),
        AMBIENT,
        False,
        "ZtunnelPod",
    ),
    (
        "app=ztunnel elsewhere is a workload",
        pod(labels={"app": "ztunnel"}),
        AMBIENT,
        True,
        "NamespaceLabel",
    ),
    (
        "node agent pod",
        pod(namespace="istio-system", labels={"k8s-app": "istio-cni-node"}),
        AMBIENT,
        False,
        "NodeAgentPod",
    ),
    ("succeeded", pod(phase="Succeeded"), AMBIENT, False, "Terminal"),
    ("failed", pod(phase="Failed"), AMBIENT, False, "Terminal"),
    ("pending with IP", pod(phase="Pending"), AMBIENT, True, "NamespaceLabel"),
    ("terminating pod stays", pod(deleting=True), AMBIENT, True, "NamespaceLabel"),
    (
        "redirection disabled",
        pod(annotations={"ambient.istio.io/redirection": "disabled"}),
        AMBIENT,
        False,
        "RedirectionDisabled",
    ),
    (
        "redirection enabled (our own status) keeps it",
        pod(annotations={"ambient.istio.io/redirection": "enabled"}),
        AMBIENT,
        True,
        "NamespaceLabel",
    ),
    ("not scheduled", pod(node_name=None), AMBIENT, False, "NotScheduled"),
    ("no IP yet", pod(ips=()), AMBIENT, False, "NoPodIP"),
]


@pytest.mark.parametrize(
    ("pod_", "ns_labels", "enrolled", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    pod_: PodView, ns_labels: dict[str, str] | None, enrolled: bool, reason: str
) -> None:
    decision = decide(pod_, ns_labels, CONFIG)
    assert (decision.enrolled, decision.reason) == (enrolled, reason)


def test_excluded_namespaces_and_system_namespace_are_configurable() -> None:
    config = SelectionConfig(excluded_namespaces=frozenset({"shop"}), system_namespace="mesh")
    assert decide(pod(), AMBIENT, config).reason == "ExcludedNamespace"
    assert decide(pod(namespace="kube-system"), AMBIENT, config).enrolled
    ztunnel = pod(namespace="mesh", labels={"app": "ztunnel"})
    assert decide(ztunnel, AMBIENT, config).reason == "ZtunnelPod"


@pytest.mark.parametrize(
    ("annotations", "dns", "bypass", "interfaces", "warnings"),
    [
        ({}, None, None, (), 0),
        ({"ambient.istio.io/dns-capture": "false"}, False, None, (), 0),
        ({"ambient.istio.io/dns-capture": "True"}, True, None, (), 0),
        ({"ambient.istio.io/dns-capture": "nope"}, None, None, (), 1),
        ({"ambient.istio.io/bypass-inbound-capture": "true"}, None, True, (), 0),
        ({"ambient.istio.io/bypass-inbound-capture": "false"}, None, None, (), 0),
        (
            {"istio.io/reroute-virtual-interfaces": "tun0, eth1,,tun0"},
            None,
            None,
            ("tun0", "eth1"),
            0,
        ),
        # One bad name drops the whole value, with one warning.
        (
            {"istio.io/reroute-virtual-interfaces": "ok,a/b,waytoolonginterfacename"},
            None,
            None,
            (),
            1,
        ),
        ({"istio.io/reroute-virtual-interfaces": 'a"b'}, None, None, (), 1),
        ({"istio.io/reroute-virtual-interfaces": "!"}, None, None, (), 1),
        ({"istio.io/reroute-virtual-interfaces": "-jDROP"}, None, None, (), 1),
        ({"istio.io/reroute-virtual-interfaces": "eth0+"}, None, None, (), 1),
        ({"istio.io/reroute-virtual-interfaces": "eth0\n-A X"}, None, None, (), 1),
        ({"istio.io/reroute-virtual-interfaces": ".."}, None, None, (), 1),
        ({"istio.io/reroute-virtual-interfaces": "tün0"}, None, None, (), 1),
        (
            {"istio.io/reroute-virtual-interfaces": "eth0.100,wg_0,veth-a"},
            None,
            None,
            ("eth0.100", "wg_0", "veth-a"),
            0,
        ),
    ],
)
def test_knobs(
    annotations: dict[str, str],
    dns: bool | None,
    bypass: bool | None,
    interfaces: tuple[str, ...],
    warnings: int,
) -> None:
    parsed, found = knobs(pod(annotations=annotations))
    assert (
        parsed.dns_capture,
        parsed.bypass_inbound_capture,
        parsed.reroute_virtual_interfaces,
    ) == (
        dns,
        bypass,
        interfaces,
    )
    assert len(found) == warnings


def test_a_dropped_value_is_named_in_its_warning() -> None:
    _, found = knobs(pod(annotations={"istio.io/reroute-virtual-interfaces": 'tun0,a"b'}))
    assert found == (
        "istio.io/reroute-virtual-interfaces='tun0,a\"b' ignored: 'a\"b' is not an interface "
        "name (at most 15 of A-Z a-z 0-9 _ . -, not starting with . or -)",
    )


def test_odd_annotations_still_enrol_with_warnings() -> None:
    decision = decide(pod(annotations={"ambient.istio.io/dns-capture": "maybe"}), AMBIENT, CONFIG)
    assert decision.enrolled
    assert "dns-capture" in decision.warnings[0]


def test_pod_view_from_api_json() -> None:
    obj = {
        "metadata": {
            "uid": "u9",
            "name": "web",
            "namespace": "shop",
            "labels": {"a": "b"},
            "annotations": {"unrelated": "x", "ambient.istio.io/dns-capture": "false"},
            "deletionTimestamp": "2026-01-01T00:00:00Z",
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
        "spec": {"nodeName": "node-2", "serviceAccountName": "web-sa", "hostNetwork": False},
        "status": {
            "phase": "Running",
            "podIP": "10.244.4.2",
            "podIPs": [{"ip": "10.244.4.2"}, {"ip": "fd00::2"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    view = pod_view(obj)
    assert view.ips == ("10.244.4.2", "fd00::2")
    assert view.annotations == {"ambient.istio.io/dns-capture": "false"}
    assert (view.node_name, view.service_account, view.ready, view.deleting) == (
        "node-2",
        "web-sa",
        True,
        True,
    )
    assert pod_view({"metadata": {}, "status": {"podIP": "10.0.0.1"}}).ips == ("10.0.0.1",)


def test_workload_entry() -> None:
    entry = workload(
        pod(annotations={"ambient.istio.io/dns-capture": "false"}, service_account="sa")
    )
    assert entry.to_wire() == {
        "uid": "u1",
        "name": "app",
        "namespace": "shop",
        "serviceAccount": "sa",
        "ips": ["10.244.0.5"],
        "dnsCapture": False,
    }


SLIM_CASES = [
    {"metadata": {}},
    {
        "metadata": {
            "uid": "r",
            "name": "w",
            "namespace": "shop",
            "annotations": {"ambient.istio.io/redirection": "disabled"},
        },
        "spec": {"nodeName": "n"},
        "status": {"podIP": "10.0.0.4"},
    },
    {"metadata": {"uid": "u1", "name": "w", "namespace": "shop"}, "spec": {"nodeName": "n"}},
    {
        "metadata": {
            "uid": "u2",
            "name": "w",
            "namespace": "shop",
            "labels": {"istio.io/dataplane-mode": "ambient", "team": "x", "pod-template-hash": "1"},
            "annotations": {"ambient.istio.io/dns-capture": "false", "unrelated": "x"},
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
        "spec": {"nodeName": "n", "serviceAccountName": "sa"},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
    },
    {
        "metadata": {
            "uid": "z",
            "name": "ztunnel-1",
            "namespace": "istio-system",
            "labels": {"app": "ztunnel"},
        },
        "spec": {"nodeName": "n"},
        "status": {"podIP": "10.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]},
    },
    {
        "metadata": {
            "uid": "s",
            "name": "sc",
            "namespace": "shop",
            "annotations": {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'},
            "deletionTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "nodeName": "n",
            "hostNetwork": True,
            "containers": [{"name": "app"}, {"name": "istio-proxy", "args": ["proxy"]}],
        },
        "status": {"phase": "Succeeded", "podIP": "10.0.0.3"},
    },
]


@pytest.mark.parametrize("obj", SLIM_CASES)
@pytest.mark.parametrize("ns_labels", [None, {}, {"istio.io/dataplane-mode": "ambient"}])
def test_slim_view_answers_as_the_full_view(
    obj: dict[str, Any], ns_labels: dict[str, str] | None
) -> None:
    """The controller's index holds slim views: selection and planning must not tell them apart."""
    full, slim = pod_view(obj), slim_pod_view(obj)
    config = SelectionConfig()
    assert decide(slim, ns_labels, config) == decide(full, ns_labels, config)
    assert desired_workload(slim, ns_labels, config) == desired_workload(full, ns_labels, config)
    assert knobs(slim) == knobs(full)
    assert set(slim.labels) <= set(SELECTION_LABELS)
    assert {k: v for k, v in full.labels.items() if k in SELECTION_LABELS} == slim.labels
    assert slim.model_dump(exclude={"labels"}) == full.model_dump(exclude={"labels"})
    assert slim == slim_pod_view(obj)  # unchanged pod, equal view: no re-plan
