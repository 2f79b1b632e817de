"""Pydantic models of AmbientNodeConfig: the single source of truth for the CRD schema.

Field names are snake_case in Python and camelCase on the wire (aliases).
Serialise with `to_wire()`; it omits unset optional fields, so a spec
compares equal to what the API server returns for it.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel


def _check_ip(value: str) -> str:
    ipaddress.ip_address(value)
    return value


# An IPv4 or IPv6 address in its text form; the API server checks it with CEL.
IP = Annotated[
    str,
    AfterValidator(_check_ip),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 45,
            "x-kubernetes-validations": [
                {"rule": "isIP(self)", "message": "must be an IPv4 or IPv6 address"}
            ],
        }
    ),
]
Name = Annotated[str, Field(min_length=1, max_length=253)]


def is_cidr(value: str) -> bool:
    """An address/bits prefix as Go's netip.ParsePrefix takes it: a plain address (no zone),
    decimal bits without a leading zero, within the family's length; host bits allowed
    (Istio renders the text as written)."""
    address, slash, bits = value.partition("/")
    if not slash or not bits.isascii() or not bits.isdigit() or len(value) > 49:
        return False
    if len(bits) > 1 and bits.startswith("0"):
        return False
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return "%" not in address and int(bits) <= parsed.max_prefixlen


def _check_cidr(value: str) -> str:
    if not is_cidr(value):
        raise ValueError(f"{value!r} is not a CIDR (address/bits)")
    return value


Cidr = Annotated[
    str,
    AfterValidator(_check_cidr),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 49,
            "x-kubernetes-validations": [
                {"rule": "isCIDR(self)", "message": "must be an IPv4 or IPv6 CIDR"}
            ],
        }
    ),
]
Port = Annotated[int, Field(ge=0, le=65535)]

# A network interface name this project will put into a rule: what the kernel allows
# (at most 15 bytes, IFNAMSIZ) narrowed to what cannot be read as anything but a name by
# iptables or nft: ASCII letters, digits, "_", "." and "-", never first "-" or ".", so no
# whitespace, quotes, "/", ":", "!", "+" (an iptables wildcard), "." or "..".
INTERFACE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$"
_INTERFACE_NAME = re.compile(INTERFACE_NAME_PATTERN)
InterfaceName = Annotated[str, Field(min_length=1, max_length=15, pattern=INTERFACE_NAME_PATTERN)]


def is_interface_name(value: str) -> bool:
    """Whether `value` is an InterfaceName (fullmatch: `$` would let a trailing newline in)."""
    return _INTERFACE_NAME.fullmatch(value) is not None


Time = Annotated[datetime.datetime, WithJsonSchema({"type": "string", "format": "date-time"})]

MAX_VIRTUAL_INTERFACES = 16
MAX_CAPTURE_ITEMS = 64  # ports or ranges per option of a sidecar's capture
# Far above any node's pod capacity; the bound lets the API server cost its CEL rules.
MAX_WORKLOADS = 1024

RedirectMode = Literal["inpod", "node"]
# Only the backends that exist; dataplane/factory.py builds each.
Backend = Literal["iptables-nft", "iptables-legacy", "nftables"]
WorkloadState = Literal["Enrolled", "Pending", "Failed", "Removing"]
InterceptionMode = Literal["REDIRECT", "TPROXY"]
ConditionStatus = Literal["True", "False", "Unknown"]
ConditionType = Literal[
    "Ready",
    "ZtunnelConnected",
    "HostRulesReady",
    "InSync",
    "CniPluginInstalled",
    "TunnelsReady",  # node mode
    "ZtunnelRulesReady",  # node mode
]


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data


# -- spec: written by the controller ------------------------------------------------


class ZtunnelRef(Wire):
    """The ztunnel pod that serves the node."""

    name: Name
    namespace: Name
    uid: Name
    ip: IP | None = None
    ready: bool = False


def _items(default: list[Any] | None = None, alias: str | None = None) -> Any:
    return Field(
        default_factory=lambda: list(default or []), max_length=MAX_CAPTURE_ITEMS, alias=alias
    )


class SidecarCapture(Wire):
    """How an injected sidecar's traffic is captured in its pod, from the pod's
    `traffic.sidecar.istio.io/*` annotations and its istio-proxy container (reference
    sidecar-interception.md section 2), validated; defaults are Istio's."""

    interception_mode: InterceptionMode = "REDIRECT"
    capture_all_inbound: bool = True  # includeInboundPorts "*"
    include_inbound_ports: list[Port] = _items()
    # The user's excludeInboundPorts with the proxy's own 15020, 15021, 15090 appended.
    exclude_inbound_ports: list[Port] = _items([15020, 15021, 15090])
    capture_all_outbound: bool = True  # includeOutboundIPRanges "*"
    include_outbound_ip_ranges: list[Cidr] = _items(alias="includeOutboundIPRanges")
    exclude_outbound_ip_ranges: list[Cidr] = _items(alias="excludeOutboundIPRanges")
    include_outbound_ports: list[Port] = _items()
    exclude_outbound_ports: list[Port] = _items([15020])
    exclude_interfaces: list[InterfaceName] = _items()
    reroute_virtual_interfaces: list[InterfaceName] = _items()
    dns_capture: bool = False  # ISTIO_META_DNS_CAPTURE on istio-proxy
    dual_stack: bool = False  # ISTIO_DUAL_STACK on istio-proxy
    invalid_drop: bool = False  # INVALID_DROP on istio-proxy
    proxy_uid: int = Field(default=1337, ge=1, le=2**31 - 1)
    proxy_gid: int = Field(default=1337, ge=1, le=2**31 - 1)


class Workload(Wire):
    """A pod on the node whose traffic the agent redirects, and its per-pod knobs: to
    ztunnel (ambient), or, with `sidecar`, to the pod's own injected proxy."""

    uid: Name
    name: Name
    namespace: Name
    service_account: Name = "default"
    ips: list[IP] = Field(min_length=1, max_length=2)
    dns_capture: bool | None = Field(
        default=None, description="Overrides spec.dnsCapture for this pod (annotation)."
    )
    bypass_inbound_capture: bool | None = Field(
        default=None, description="Leaves inbound traffic unredirected (ingress mode)."
    )
    reroute_virtual_interfaces: list[InterfaceName] = Field(
        default_factory=list, max_length=MAX_VIRTUAL_INTERFACES
    )
    sidecar: SidecarCapture | None = Field(
        default=None,
        description="Present for a pod with an injected sidecar: its capture, applied in "
        "its netns instead of ambient redirection (never both).",
    )

    def to_wire(self) -> dict[str, Any]:
        data = super().to_wire()
        if not data["rerouteVirtualInterfaces"]:
            del data["rerouteVirtualInterfaces"]
        return data


class AmbientNodeConfigSpec(Wire):
    node_name: Name
    redirect_mode: RedirectMode = "inpod"
    dns_capture: bool = True
    ztunnel: ZtunnelRef | None = None
    workloads: list[Workload] = Field(
        default_factory=list,
        max_length=MAX_WORKLOADS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"]},
    )

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nodeName": self.node_name,
            "redirectMode": self.redirect_mode,
            "dnsCapture": self.dns_capture,
            "workloads": [w.to_wire() for w in self.workloads],
        }
        if self.ztunnel is not None:
            data["ztunnel"] = self.ztunnel.to_wire()
        return data


# -- status: written by the node agent --------------------------------------------


class ZtunnelStatus(Wire):
    connected: bool = False
    pod: str | None = None
    since: Time | None = None


class Repair(Wire):
    """The last time the agent found a workload's redirection changed behind its back."""

    time: Time
    reason: Name
    message: str = Field(default="", max_length=4096)
    # Repairs of this workload since the agent last enrolled it: two within one second of
    # `time` are still two, for the Events and for a person reading status. No default in
    # the schema (the API server would add it to what an agent from before counts wrote,
    # which would then never find its status the server's): absent means one.
    count: int | None = Field(default=None, ge=1)

    @property
    def times(self) -> int:
        return self.count or 1


class WorkloadStatus(Wire):
    uid: Name
    name: Name
    namespace: Name
    state: WorkloadState
    reason: str | None = None
    message: str | None = None
    since: Time | None = None
    last_repair: Repair | None = None
    # A sidecar pod's capture in effect, in words ("REDIRECT; inbound: all ports but ...").
    capture: str | None = Field(default=None, max_length=4096)


class Condition(Wire):
    """A KEP-1623 condition."""

    type: ConditionType
    status: ConditionStatus
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field(default="", max_length=32768)
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: Time


class AmbientNodeConfigStatus(Wire):
    observed_generation: int | None = Field(default=None, ge=0)
    mode: RedirectMode | None = None
    backend: Backend | None = None
    ztunnel: ZtunnelStatus | None = None
    enrolled: int = Field(default=0, ge=0)
    sidecars: int = Field(default=0, ge=0, description="Sidecar pods whose capture is in place.")
    pending: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    workloads: list[WorkloadStatus] = Field(
        default_factory=list,
        max_length=MAX_WORKLOADS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"]},
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    last_sync_time: Time | None = None
    agent_version: str | None = Field(
        default=None, max_length=128, description="The version of the node agent that wrote this."
    )
