"""Which pods get sidecar capture, and how: pure functions over a Pod's API JSON.

Implements sections 1 and 2 of reference/sidecar-interception.md: a pod with an
injected `istio-proxy` container (and no `istio-init` of its own) has its
traffic captured for that proxy in its netns, following its
`traffic.sidecar.istio.io/*` and `sidecar.istio.io/interceptionMode`
annotations. A malformed annotation is an error naming the annotation and the
value, never a partial capture. Where this differs from Istio, it says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api import names
from .api.models import MAX_CAPTURE_ITEMS, InterceptionMode, SidecarCapture, is_cidr

Obj = Mapping[str, Any]

PROXY_CONTAINER = "istio-proxy"
INIT_CONTAINER = "istio-init"
INJECT = "sidecar.istio.io/inject"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
TRAFFIC = "traffic.sidecar.istio.io/"
INCLUDE_OUTBOUND_IP_RANGES = TRAFFIC + "includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = TRAFFIC + "excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = TRAFFIC + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = TRAFFIC + "excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = TRAFFIC + "includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = TRAFFIC + "excludeOutboundPorts"
EXCLUDE_INTERFACES = TRAFFIC + "excludeInterfaces"
KUBEVIRT_INTERFACES = TRAFFIC + "kubevirtInterfaces"  # deprecated; only without the next
REROUTE_VIRTUAL_INTERFACES = names.REROUTE_VIRTUAL_INTERFACES_ANNOTATION

# What the decision reads; kept so the controller's index holds no more of a pod.
ANNOTATIONS = (
    names.SIDECAR_STATUS_ANNOTATION,
    INJECT,
    INTERCEPTION_MODE,
    INCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INTERFACES,
    KUBEVIRT_INTERFACES,
    REROUTE_VIRTUAL_INTERFACES,
)
PROXY_ENV = ("DISABLE_ENVOY", "ISTIO_META_DNS_CAPTURE", "ISTIO_DUAL_STACK", "INVALID_DROP")
# Always kept out of inbound capture: the proxy's status, health and metrics ports.
PROXY_INBOUND_PORTS = (15020, 15021, 15090)
DEFAULT_PROXY_ID = 1337
DESCRIBED = 4096  # status.workloads[].capture's limit
MODES: dict[str, InterceptionMode] = {"REDIRECT": "REDIRECT", "TPROXY": "TPROXY"}
_INTERFACE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.\-]*")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class ProxyFacts(BaseModel):
    """What the decision needs of a pod with an `istio-proxy` container."""

    model_config = ConfigDict(frozen=True)

    has_istio_init: bool = False
    proxy_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)  # PROXY_ENV only, `value` fields only
    run_as_user: int | None = None
    run_as_group: int | None = None
    inject: str | None = None  # the label sidecar.istio.io/inject, else the annotation
    annotations: dict[str, str] = Field(default_factory=dict)  # ANNOTATIONS only


def proxy_facts(pod: Obj) -> ProxyFacts | None:
    """The facts of `pod`, or None if it has no `istio-proxy` container."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    # Native sidecars live in initContainers; Istio gathers those first.
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    proxy = next((c for c in containers if c.get("name") == PROXY_CONTAINER), None)
    if proxy is None:
        return None
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    security = proxy.get("securityContext") or {}
    return ProxyFacts(
        has_istio_init=any(c.get("name") == INIT_CONTAINER for c in containers),
        proxy_args=tuple(str(a) for a in proxy.get("args") or []),
        env={
            str(e["name"]): str(e.get("value") or "")
            for e in proxy.get("env") or []
            if e.get("name") in PROXY_ENV
        },
        run_as_user=security.get("runAsUser"),
        run_as_group=security.get("runAsGroup"),
        inject=labels.get(INJECT, annotations.get(INJECT)),
        annotations={k: str(v) for k, v in annotations.items() if k in ANNOTATIONS},
    )


class SidecarDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    captured: bool
    reason: str  # CamelCase: why the pod's traffic is (or is not) captured for its sidecar
    capture: SidecarCapture | None = None
    error: str | None = None  # with reason InvalidAnnotation: which annotation, which value


class InvalidAnnotation(ValueError):
    def __init__(self, key: str, value: str, why: str):
        shown = value if len(value) <= 200 else value[:200] + "..."
        super().__init__(f"annotation {key}={shown!r}: {why}")


def _bool(value: str | None) -> bool | None:
    """Go's strconv.ParseBool; None if it does not parse."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def decide_sidecar(facts: ProxyFacts | None) -> SidecarDecision:
    """Whether a pod gets sidecar capture, in Istio's order (section 1, from step 6; the
    caller has handled its own pods, excluded namespaces and ambient pods)."""
    if facts is None:
        return SidecarDecision(captured=False, reason="NoSidecarProxy")
    if facts.has_istio_init:
        return SidecarDecision(captured=False, reason="IstioInitContainer")
    if _bool(facts.env.get("DISABLE_ENVOY")):
        return SidecarDecision(captured=False, reason="EnvoyDisabled")
    args = facts.proxy_args
    if len(args) >= 2 and args[0] == "proxy" and args[1] != "sidecar":
        return SidecarDecision(captured=False, reason="NotASidecarProxy")
    if _bool(facts.inject) is False:
        return SidecarDecision(captured=False, reason="InjectionDisabled")
    if names.SIDECAR_STATUS_ANNOTATION not in facts.annotations:
        return SidecarDecision(captured=False, reason="NotInjected")
    try:
        capture = capture_of(facts)
    except InvalidAnnotation as exc:
        return SidecarDecision(captured=False, reason="InvalidAnnotation", error=str(exc))
    return SidecarDecision(captured=True, reason="SidecarInjected", capture=capture)


def capture_of(facts: ProxyFacts) -> SidecarCapture:
    """The capture the annotations and the proxy container ask for (section 2)."""
    found = facts.annotations

    def ports(key: str, default: list[int]) -> list[int]:
        return _ports(key, found[key]) if key in found else default

    def ranges(key: str) -> list[str]:
        return _ranges(key, found[key]) if key in found else []

    def interfaces(key: str) -> list[str]:
        return _interfaces(key, found[key]) if key in found else []

    mode = found.get(INTERCEPTION_MODE, "REDIRECT")
    if mode not in MODES:
        # Istio has no case for NONE either: its ADD fails the same way.
        raise InvalidAnnotation(INTERCEPTION_MODE, mode, "must be REDIRECT or TPROXY")
    all_outbound, include_ranges = (
        _ranges_or_all(INCLUDE_OUTBOUND_IP_RANGES, found[INCLUDE_OUTBOUND_IP_RANGES])
        if INCLUDE_OUTBOUND_IP_RANGES in found
        else (True, [])
    )
    all_inbound, include_inbound = (
        _ports_or_all(INCLUDE_INBOUND_PORTS, found[INCLUDE_INBOUND_PORTS])
        if INCLUDE_INBOUND_PORTS in found
        else (True, [])
    )
    virtual = (
        interfaces(REROUTE_VIRTUAL_INTERFACES)
        if REROUTE_VIRTUAL_INTERFACES in found
        else interfaces(KUBEVIRT_INTERFACES)
    )
    uid, gid = facts.run_as_user, facts.run_as_group
    excluded_inbound = _with_proxy_ports(ports(EXCLUDE_INBOUND_PORTS, [15020]))
    if len(excluded_inbound) > MAX_CAPTURE_ITEMS:
        raise InvalidAnnotation(
            EXCLUDE_INBOUND_PORTS, found[EXCLUDE_INBOUND_PORTS], f"more than {MAX_CAPTURE_ITEMS}"
        )
    try:
        return _capture(
            facts,
            mode=MODES[mode],
            all_inbound=all_inbound,
            include_inbound=include_inbound,
            excluded_inbound=excluded_inbound,
            all_outbound=all_outbound,
            include_ranges=include_ranges,
            exclude_ranges=ranges(EXCLUDE_OUTBOUND_IP_RANGES),
            include_outbound_ports=ports(INCLUDE_OUTBOUND_PORTS, []),
            exclude_outbound_ports=ports(EXCLUDE_OUTBOUND_PORTS, [15020]),
            exclude_interfaces=interfaces(EXCLUDE_INTERFACES),
            virtual=virtual,
            uid=uid,
            gid=gid,
        )
    except ValidationError as exc:  # each value was checked; this is the last safety net
        raise InvalidAnnotation("sidecar annotations", "", str(exc).splitlines()[0]) from None


def _capture(
    facts: ProxyFacts,
    *,
    mode: InterceptionMode,
    all_inbound: bool,
    include_inbound: list[int],
    excluded_inbound: list[int],
    all_outbound: bool,
    include_ranges: list[str],
    exclude_ranges: list[str],
    include_outbound_ports: list[int],
    exclude_outbound_ports: list[int],
    exclude_interfaces: list[str],
    virtual: list[str],
    uid: int | None,
    gid: int | None,
) -> SidecarCapture:
    return SidecarCapture(
        interception_mode=mode,
        capture_all_inbound=all_inbound,
        include_inbound_ports=include_inbound,
        exclude_inbound_ports=excluded_inbound,
        capture_all_outbound=all_outbound,
        include_outbound_ip_ranges=include_ranges,
        exclude_outbound_ip_ranges=exclude_ranges,
        include_outbound_ports=include_outbound_ports,
        exclude_outbound_ports=exclude_outbound_ports,
        exclude_interfaces=exclude_interfaces,
        reroute_virtual_interfaces=virtual,
        dns_capture=bool(_bool(facts.env.get("ISTIO_META_DNS_CAPTURE"))),
        dual_stack=bool(_bool(facts.env.get("ISTIO_DUAL_STACK"))),
        invalid_drop=bool(_bool(facts.env.get("INVALID_DROP"))),
        proxy_uid=uid if uid else DEFAULT_PROXY_ID,
        proxy_gid=gid if gid else DEFAULT_PROXY_ID,
    )


def _with_proxy_ports(ports: list[int]) -> list[int]:
    merged: list[int] = []
    for port in [*ports, *PROXY_INBOUND_PORTS]:
        if port not in merged:
            merged.append(port)
    return merged


def _ranges(key: str, value: str) -> list[str]:
    """Comma-separated CIDRs, split as Istio splits them (no trimming, no empty items)."""
    if value == "":
        return []
    ranges = value.split(",")
    for item in ranges:
        if not is_cidr(item):
            raise InvalidAnnotation(key, value, f"{item!r} is not a CIDR (address/bits)")
    _at_most(key, value, ranges)
    return ranges


def _ranges_or_all(key: str, value: str) -> tuple[bool, list[str]]:
    return (True, []) if value == "*" else (False, _ranges(key, value))


def _ports(key: str, value: str) -> list[int]:
    """Comma-separated ports, 0-65535. Istio lets `*` through here and iptables then
    refuses the rule; this refuses it at once, naming the annotation."""
    if value.strip() == "":
        return []
    ports = []
    for item in value.strip().split(","):
        text = item.strip()
        if not text.isascii() or not text.isdigit():
            raise InvalidAnnotation(key, value, f"{text!r} is not a port number")
        port = int(text)
        if port > 65535:
            raise InvalidAnnotation(key, value, f"port {port} is out of range 0-65535")
        ports.append(port)
    _at_most(key, value, ports)
    return ports


def _ports_or_all(key: str, value: str) -> tuple[bool, list[int]]:
    return (True, []) if value == "*" else (False, _ports(key, value))


def _at_most(key: str, value: str, items: list[Any]) -> None:
    if len(items) > MAX_CAPTURE_ITEMS:
        raise InvalidAnnotation(key, value, f"more than {MAX_CAPTURE_ITEMS} items")


def _interfaces(key: str, value: str) -> list[str]:
    if value == "":
        return []
    found = []
    for item in value.split(","):
        name = item.strip()
        if not name or len(name) > 15 or _INTERFACE.fullmatch(name) is None:
            raise InvalidAnnotation(key, value, f"{name!r} is not an interface name")
        found.append(name)
    _at_most(key, value, found)
    return found


def describe(capture: SidecarCapture) -> str:
    """The capture in effect, in a sentence for status."""

    def ports(values: list[int]) -> str:
        return ",".join(str(p) for p in values)

    if capture.capture_all_inbound:
        inbound = "all ports"
        if capture.exclude_inbound_ports:
            inbound += f" but {ports(capture.exclude_inbound_ports)}"
    elif capture.include_inbound_ports:
        inbound = f"ports {ports(capture.include_inbound_ports)}"
    else:
        inbound = "none"
    if capture.capture_all_outbound:
        outbound = "all"
    elif capture.include_outbound_ip_ranges:
        outbound = ",".join(capture.include_outbound_ip_ranges)
    else:
        outbound = "none"
    if capture.exclude_outbound_ip_ranges:
        outbound += f" but {','.join(capture.exclude_outbound_ip_ranges)}"
    if capture.include_outbound_ports:
        outbound += f"; also ports {ports(capture.include_outbound_ports)}"
    if capture.exclude_outbound_ports:
        outbound += f"; never ports {ports(capture.exclude_outbound_ports)}"
    parts = [
        capture.interception_mode,
        f"inbound: {inbound}",
        f"outbound: {outbound}",
        f"proxy uid {capture.proxy_uid} gid {capture.proxy_gid}",
    ]
    if capture.dns_capture:
        parts.append("DNS captured")
    if capture.exclude_interfaces:
        parts.append(f"interfaces not captured: {','.join(capture.exclude_interfaces)}")
    if capture.reroute_virtual_interfaces:
        parts.append(f"virtual interfaces: {','.join(capture.reroute_virtual_interfaces)}")
    said = "; ".join(parts)
    return said if len(said) <= DESCRIBED else said[: DESCRIBED - 3] + "..."
