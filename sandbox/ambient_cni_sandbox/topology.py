"""Names and addresses of a sandbox cluster: pure planning, no I/O.

Every kernel object a sandbox makes is named from its prefix `acni-<name>-`,
so `sandbox down` can find leftovers by prefix alone, even after a crash.
Sandbox names are lowercase alphanumerics with no dash, so no sandbox's prefix
is the start of another's.

Addressing (every sandbox has its own underlay namespace, so two sandboxes
on one machine may reuse the same ranges):
  underlay  172.18.0.0/16, node i at 172.18.0.(10+i)
  pods      10.244.0.0/16, node i owns 10.244.(4(i-1)).0/22, gateway .1

The pod network is one of two CNI setups (`PodNetwork`):
  bridge    pods on the node bridge cbr0, which holds the gateway (the default)
  ptp       as kindnet: no bridge, each pod on its own veth, whose node end holds
            the gateway /32, and one `<pod-ip> dev vethXXXX scope host` route per pod
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
MAX_NODES = 64
UNDERLAY_NET = ipaddress.IPv4Network("172.18.0.0/16")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
POD_PREFIXLEN = 22
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"

NODE_BRIDGE = "cbr0"
NODE_UPLINK = "eth0"
POD_INTERFACE = "eth0"
UNDERLAY_BRIDGE = "br0"

PodNetwork = Literal["bridge", "ptp"]
POD_NETWORKS: tuple[PodNetwork, ...] = ("bridge", "ptp")


class TopologyError(ValueError):
    """A sandbox name or size the sandbox cannot plan."""


class NodePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    netns: str
    underlay_link: str  # the node's veth end inside the underlay namespace
    ip: str  # the node's address on the underlay: its InternalIP
    pod_cidr: str
    gateway: str  # first address of the pod CIDR: on the node bridge, or on each pod's veth


class Topology(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    prefix: str
    underlay_netns: str
    nodes: tuple[NodePlan, ...]
    pod_network: PodNetwork = "bridge"

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


def plan(name: str, node_count: int, pod_network: PodNetwork = "bridge") -> Topology:
    prefix = prefix_for(name)
    if not 1 <= node_count <= MAX_NODES:
        raise TopologyError(f"a sandbox has 1 to {MAX_NODES} nodes, not {node_count}")
    if pod_network not in POD_NETWORKS:
        choices = ", ".join(POD_NETWORKS)
        raise TopologyError(f"a pod network is one of {choices}, not {pod_network!r}")
    pod_cidrs = list(POD_SUPERNET.subnets(new_prefix=POD_PREFIXLEN))
    nodes = []
    for index in range(1, node_count + 1):
        cidr = pod_cidrs[index - 1]
        nodes.append(
            NodePlan(
                index=index,
                name=f"node-{index}",
                netns=f"{prefix}node-{index}",
                underlay_link=f"node-{index}",
                ip=str(UNDERLAY_NET.network_address + 10 + index),
                pod_cidr=str(cidr),
                gateway=str(cidr.network_address + 1),
            )
        )
    return Topology(
        name=name,
        prefix=prefix,
        underlay_netns=f"{prefix}underlay",
        nodes=tuple(nodes),
        pod_network=pod_network,
    )
