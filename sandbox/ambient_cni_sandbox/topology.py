"""Names and addresses of a sandbox cluster: pure planning, no I/O.

Every kernel object a sandbox makes is named from its prefix `acni-<name>-`,
so `sandbox down` can find leftovers by prefix alone, even after a crash.
Sandbox names are lowercase alphanumerics with no dash, so no sandbox's prefix
is the start of another's.

Addressing (every sandbox has its own underlay namespace, so two sandboxes
on one machine may reuse the same ranges):
  underlay  172.18.0.0/16, node i at 172.18.0.(10+i)
            fd00:172:18::/64, node i at fd00:172:18::(10+i), the same digits (::11 for node 1)
  pods      10.244.0.0/16, node i owns 10.244.(4(i-1)).0/22, gateway .1
            fd00:10:244::/48, node i owns its /64 number i-1 (fd00:10:244:(i-1)::/64),
            gateway ::1

The IP family (`IpFamily`) picks which of them a sandbox has, as a cluster's
`ipFamilies` do: "ipv4" or "ipv6" alone, or "dual" (both, IPv4 first, so IPv4
is each list's first entry, as in a dual-stack cluster whose primary family is
IPv4). A node's single-value fields (`ip`, `pod_cidr`, `gateway`) are its first
family's; the tuples (`ips`, `pod_cidrs`, `gateways`) hold one entry per family,
in the same order.

The pod network is one of two CNI setups (`PodNetwork`):
  bridge    pods on the node bridge cbr0, which holds the gateway (the default)
  ptp       as kindnet: no bridge, each pod on its own veth, whose node end holds
            the gateway /32 (and /128), and one `<pod-ip> dev vethXXXX` route per pod
            address
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
MAX_NODES = 64
UNDERLAY_NET = ipaddress.IPv4Network("172.18.0.0/16")
UNDERLAY_NET6 = ipaddress.IPv6Network("fd00:172:18::/64")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
POD_PREFIXLEN = 22
POD_SUPERNET6 = ipaddress.IPv6Network("fd00:10:244::/48")
POD_PREFIXLEN6 = 64
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
# Where pods and nodes reach the API server, as a kubelet tells its pods in
# KUBERNETES_SERVICE_HOST/PORT (no kube-proxy here to serve the Service's address): the
# underlay's own address, where the sandbox's apiproxy relays to the loopback API server.
API_ENDPOINT_IPS = {4: "172.18.0.1", 6: "fd00:172:18::1"}
API_ENDPOINT_PORT = 443

NODE_BRIDGE = "cbr0"
NODE_UPLINK = "eth0"
POD_INTERFACE = "eth0"
UNDERLAY_BRIDGE = "br0"

PodNetwork = Literal["bridge", "ptp"]
POD_NETWORKS: tuple[PodNetwork, ...] = ("bridge", "ptp")

IpFamily = Literal["dual", "ipv4", "ipv6"]
IP_FAMILIES: tuple[IpFamily, ...] = ("dual", "ipv4", "ipv6")
DEFAULT_IP_FAMILY: IpFamily = "dual"
# An IP family's address versions, in the order a node lists its addresses.
IP_VERSIONS: dict[IpFamily, tuple[int, ...]] = {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}


class TopologyError(ValueError):
    """A sandbox name or size the sandbox cannot plan."""


class NodePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    netns: str
    underlay_link: str  # the node's veth end inside the underlay namespace
    ip: str  # the node's (first family's) address on the underlay: its InternalIP
    pod_cidr: str  # the first family's pod CIDR
    gateway: str  # first address of the pod CIDR: on the node bridge, or on each pod's veth
    # One per IP family, IPv4 first; the single values above are their first entries.
    ips: tuple[str, ...]
    pod_cidrs: tuple[str, ...]
    gateways: tuple[str, ...]

    @model_validator(mode="before")
    @classmethod
    def _single_family_record(cls, data: Any) -> Any:
        """A record written before dual-stack (no tuples) is its single values' family."""
        if isinstance(data, dict):
            pairs = (("ips", "ip"), ("pod_cidrs", "pod_cidr"), ("gateways", "gateway"))
            missing = {
                many: (data[one],) for many, one in pairs if many not in data and one in data
            }
            if missing:
                return {**data, **missing}
        return data

    @model_validator(mode="after")
    def _first_family_first(self) -> NodePlan:
        if (self.ips[:1], self.pod_cidrs[:1], self.gateways[:1]) != (
            (self.ip,),
            (self.pod_cidr,),
            (self.gateway,),
        ):
            raise ValueError(
                "ip, pod_cidr and gateway must be the first of ips, pod_cidrs, gateways"
            )
        if not len(self.ips) == len(self.pod_cidrs) == len(self.gateways):
            raise ValueError("ips, pod_cidrs and gateways must have one entry per family")
        return self

    @property
    def ip_versions(self) -> tuple[int, ...]:
        """The node's address versions (4, 6), in the order of its tuples."""
        return tuple(ipaddress.ip_address(ip).version for ip in self.ips)

    def ip_of(self, version: int) -> str | None:
        """The node's underlay address of this version (4 or 6), if it has that family."""
        return _of_version(self.ips, version)

    def pod_cidr_of(self, version: int) -> str | None:
        return _of_version(self.pod_cidrs, version)

    def gateway_of(self, version: int) -> str | None:
        return _of_version(self.gateways, version)


def _of_version(values: tuple[str, ...], version: int) -> str | None:
    for value in values:
        if ipaddress.ip_network(value, strict=False).version == version:
            return value
    return None


class Topology(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    prefix: str
    underlay_netns: str
    nodes: tuple[NodePlan, ...]
    pod_network: PodNetwork = "bridge"
    ip_family: IpFamily = "ipv4"  # what a state file written before dual-stack had

    @property
    def ip_versions(self) -> tuple[int, ...]:
        """(4,), (6,) or (4, 6): the address versions every node and pod has, in order."""
        return IP_VERSIONS[self.ip_family]

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in sandbox {self.name!r}")

    def pod_netns(self, pod_uid: str) -> str:
        return f"{self.prefix}pod-{pod_uid}"

    def is_pod_netns(self, netns: str) -> bool:
        return netns.startswith(f"{self.prefix}pod-")


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise TopologyError(
            f"invalid sandbox name {name!r}: use 1-12 lowercase letters and digits, "
            "starting with a letter (no dashes, so prefixes never overlap)"
        )
    return name


def prefix_for(name: str) -> str:
    return f"acni-{validate_name(name)}-"


def _node_pod_cidr(version: int, index: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Node `index`'s pod CIDR of this version: the (index-1)th subnet of the supernet."""
    if version == 4:
        size = 1 << (32 - POD_PREFIXLEN)
        return ipaddress.IPv4Network(
            (int(POD_SUPERNET.network_address) + (index - 1) * size, POD_PREFIXLEN)
        )
    size6 = 1 << (128 - POD_PREFIXLEN6)
    return ipaddress.IPv6Network(
        (int(POD_SUPERNET6.network_address) + (index - 1) * size6, POD_PREFIXLEN6)
    )


def _node_ip(version: int, index: int) -> str:
    """172.18.0.(10+i); in IPv6 the same digits, read as hex: fd00:172:18::11 for node 1,
    as the prefixes repeat 172.18 and 10.244."""
    if version == 4:
        return str(UNDERLAY_NET.network_address + 10 + index)
    return str(UNDERLAY_NET6.network_address + int(str(10 + index), 16))


def plan(
    name: str,
    node_count: int,
    pod_network: PodNetwork = "bridge",
    ip_family: IpFamily = DEFAULT_IP_FAMILY,
) -> Topology:
    prefix = prefix_for(name)
    if not 1 <= node_count <= MAX_NODES:
        raise TopologyError(f"a sandbox has 1 to {MAX_NODES} nodes, not {node_count}")
    if pod_network not in POD_NETWORKS:
        choices = ", ".join(POD_NETWORKS)
        raise TopologyError(f"a pod network is one of {choices}, not {pod_network!r}")
    if ip_family not in IP_FAMILIES:
        choices = ", ".join(IP_FAMILIES)
        raise TopologyError(f"an IP family is one of {choices}, not {ip_family!r}")
    versions = IP_VERSIONS[ip_family]
    nodes = []
    for index in range(1, node_count + 1):
        cidrs = tuple(_node_pod_cidr(version, index) for version in versions)
        ips = tuple(_node_ip(version, index) for version in versions)
        gateways = tuple(str(cidr.network_address + 1) for cidr in cidrs)
        nodes.append(
            NodePlan(
                index=index,
                name=f"node-{index}",
                netns=f"{prefix}node-{index}",
                underlay_link=f"node-{index}",
                ip=ips[0],
                pod_cidr=str(cidrs[0]),
                gateway=gateways[0],
                ips=ips,
                pod_cidrs=tuple(str(cidr) for cidr in cidrs),
                gateways=gateways,
            )
        )
    return Topology(
        name=name,
        prefix=prefix,
        underlay_netns=f"{prefix}underlay",
        nodes=tuple(nodes),
        pod_network=pod_network,
        ip_family=ip_family,
    )
