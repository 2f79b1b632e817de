"""Which pods get sidecar capture, and the capture their annotations ask for."""

from __future__ import annotations

from typing import Any

import pytest

from ambient_cni.api.models import SidecarCapture
from ambient_cni.sidecar import decide_sidecar, describe, proxy_facts

STATUS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
TRAFFIC = "traffic.sidecar.istio.io/"
NO_PROXY = {"metadata": {"annotations": STATUS}, "spec": {"containers": [{"name": "app"}]}}
DISABLED = {"env": [{"name": "DISABLE_ENVOY", "value": "true"}]}


def pod(
    annotations: dict[str, str] | None = None,
    *,
    labels: dict[str, str] | None = None,
    proxy: dict[str, Any] | None = None,
    init: list[str] = (),  # type: ignore[assignment]
    native: bool = False,
) -> dict[str, Any]:
    container = {"name": "istio-proxy", "args": ["proxy", "sidecar"], **(proxy or {})}
    spec: dict[str, Any] = {
        "containers": [{"name": "app"}, *([] if native else [container])],
        "initContainers": [{"name": n} for n in init] + ([container] if native else []),
    }
    return {
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "labels": labels or {},
            "annotations": {**STATUS, **(annotations or {})},
        },
        "spec": spec,
    }


def decided(obj: dict[str, Any]) -> tuple[bool, str]:
    found = decide_sidecar(proxy_facts(obj))
    return found.captured, found.reason


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (pod(), (True, "SidecarInjected")),
        (pod(native=True), (True, "SidecarInjected")),  # a native sidecar (initContainers)
        (pod(init=["istio-init"]), (False, "IstioInitContainer")),
        (
            pod(proxy={"env": [{"name": "DISABLE_ENVOY", "value": "true"}]}),
            (False, "EnvoyDisabled"),
        ),
        (pod(proxy={"args": ["proxy", "router"]}), (False, "NotASidecarProxy")),
        (pod(proxy={"args": ["proxy"]}), (True, "SidecarInjected")),  # too few: a sidecar
        (pod(labels={"sidecar.istio.io/inject": "false"}), (False, "InjectionDisabled")),
        # The label wins over the annotation; an unparseable value is ignored.
        (
            pod({"sidecar.istio.io/inject": "false"}, labels={"sidecar.istio.io/inject": "true"}),
            (True, "SidecarInjected"),
        ),
        (pod({"sidecar.istio.io/inject": "nope"}), (True, "SidecarInjected")),
        (
            {"metadata": {"annotations": STATUS}, "spec": {"containers": [{"name": "app"}]}},
            (False, "NoSidecarProxy"),
        ),
        (
            {"metadata": {}, "spec": {"containers": [{"name": "istio-proxy"}]}},
            (False, "NotInjected"),
        ),
    ],
)
def test_who_gets_sidecar_capture_in_istios_order(
    obj: dict[str, Any], expected: tuple[bool, str]
) -> None:
    assert decided(obj) == expected


def capture(annotations: dict[str, str], **proxy: Any) -> SidecarCapture:
    found = decide_sidecar(proxy_facts(pod(annotations, proxy=proxy)))
    assert found.capture is not None, found.error
    return found.capture


def test_defaults_are_istios() -> None:
    assert capture({}) == SidecarCapture()


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"sidecar.istio.io/interceptionMode": "TPROXY"}, {"interception_mode": "TPROXY"}),
        (
            {"traffic.sidecar.istio.io/excludeInboundPorts": "3306"},
            {"exclude_inbound_ports": [3306, 15020, 15021, 15090]},
        ),
        (
            {"traffic.sidecar.istio.io/excludeInboundPorts": ""},
            {"exclude_inbound_ports": [15020, 15021, 15090]},
        ),
        (
            {"traffic.sidecar.istio.io/excludeInboundPorts": " 15021, 80 "},
            {"exclude_inbound_ports": [15021, 80, 15020, 15090]},
        ),
        ({"traffic.sidecar.istio.io/includeInboundPorts": ""}, {"capture_all_inbound": False}),
        (
            {"traffic.sidecar.istio.io/includeInboundPorts": "8080,9090"},
            {"capture_all_inbound": False, "include_inbound_ports": [8080, 9090]},
        ),
        (
            {"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::1/8"},
            {
                "capture_all_outbound": False,
                "include_outbound_ip_ranges": ["10.0.0.0/8", "fd00::1/8"],
            },
        ),
        ({"traffic.sidecar.istio.io/includeOutboundIPRanges": ""}, {"capture_all_outbound": False}),
        (
            {"traffic.sidecar.istio.io/excludeOutboundPorts": "5555"},
            {"exclude_outbound_ports": [5555]},
        ),
        (
            {"traffic.sidecar.istio.io/kubevirtInterfaces": "net1"},
            {"reroute_virtual_interfaces": ["net1"]},
        ),
        (
            {
                "traffic.sidecar.istio.io/kubevirtInterfaces": "net1",
                "istio.io/reroute-virtual-interfaces": "tun0, tun1",
            },
            {"reroute_virtual_interfaces": ["tun0", "tun1"]},
        ),
        ({"traffic.sidecar.istio.io/excludeInterfaces": "eth1"}, {"exclude_interfaces": ["eth1"]}),
    ],
)
def test_annotations(annotations: dict[str, str], expected: dict[str, Any]) -> None:
    assert capture(annotations) == SidecarCapture(**expected)


def test_the_proxy_containers_env_and_ids() -> None:
    env = [
        {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
        {"name": "ISTIO_DUAL_STACK", "value": "1"},
        {"name": "INVALID_DROP", "value": "maybe"},  # does not parse: false, as in Istio
    ]
    found = capture({}, env=env, securityContext={"runAsUser": 0, "runAsGroup": 2000})
    assert (found.dns_capture, found.dual_stack, found.invalid_drop) == (True, True, False)
    assert (found.proxy_uid, found.proxy_gid) == (1337, 2000)  # 0 means the default


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("sidecar.istio.io/interceptionMode", "NONE", "must be REDIRECT or TPROXY"),
        ("sidecar.istio.io/interceptionMode", "redirect", "must be REDIRECT or TPROXY"),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/8, 11.0.0.0/8",
            "not a CIDR",
        ),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.1", "not a CIDR"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8,", "not a CIDR"),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "not a CIDR"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "99999", "out of range 0-65535"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "80,", "not a port number"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "*", "not a port number"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "http", "not a port number"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0;reboot", "not an interface name"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "a-very-long-interface", "not an interface"),
        ("traffic.sidecar.istio.io/excludeInterfaces", " ", "not an interface name"),
        ("traffic.sidecar.istio.io/includeInboundPorts", " * ", "not a port number"),
        (TRAFFIC + "includeOutboundIPRanges", "10.0.0.0/255.0.0.0", "not a CIDR"),
        (TRAFFIC + "includeOutboundIPRanges", "10.0.0.0/08", "not a CIDR"),
        (TRAFFIC + "includeOutboundIPRanges", "fe80::1%eth0/64", "not a CIDR"),
        (TRAFFIC + "includeOutboundIPRanges", 'fe80::1%"x/64', "not a CIDR"),
        (TRAFFIC + "excludeOutboundPorts", ",".join(["1"] * 65), "more than 64 items"),
        (TRAFFIC + "excludeInboundPorts", ",".join(str(p) for p in range(62)), "more than 64"),
    ],
)
def test_a_malformed_annotation_is_an_error_naming_it_and_its_value(
    key: str, value: str, why: str
) -> None:
    found = decide_sidecar(proxy_facts(pod({key: value})))
    assert (found.captured, found.reason, found.capture) == (False, "InvalidAnnotation", None)
    assert found.error is not None
    assert found.error.startswith(f"annotation {key}={value!r}: ")
    assert why in found.error


def test_described_for_status() -> None:
    assert describe(SidecarCapture()) == (
        "REDIRECT; inbound: all ports but 15020,15021,15090; outbound: all; "
        "never ports 15020; proxy uid 1337 gid 1337"
    )
