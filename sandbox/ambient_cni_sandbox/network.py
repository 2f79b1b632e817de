"""The sandbox's network: an underlay namespace joining node namespaces, pods on node bridges.

    [underlay netns]  br0 ── node-1 ══ eth0 [node-1 netns] cbr0 ── vethXXXX ══ eth0 [pod netns]
                          └─ node-2 ══ eth0 [node-2 netns] cbr0 ── ...

With the ptp pod network there is no cbr0: each pod's veth ends in the node
namespace itself, holding the gateway /32, and the node routes the pod's /32
to it (the ptp plugin makes both).

Each node routes the other nodes' pod CIDRs via their underlay address, so
pod-to-pod traffic crosses nodes without NAT. With IPv6 (the "dual" and "ipv6"
families) each family has its own addresses and routes, side by side: the
uplink and cbr0 get their IPv6 addresses without duplicate address detection
(IFA_F_NODAD), usable at once as a node's configured addresses are, and the
node forwards IPv6 but accepts no router advertisements (there are none; its
routes are static). Namespaces are made with
`ip netns` (it sets up the shared /run/netns mount); links, addresses and
routes go through netlink on threads that have entered the namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ambient_cni.netns import list_named_netns, netns_path, pids_in_netns, run_in_netns

from .processes import terminate
from .topology import (
    API_ENDPOINT_IPS,
    NODE_BRIDGE,
    NODE_UPLINK,
    UNDERLAY_BRIDGE,
    UNDERLAY_NET,
    UNDERLAY_NET6,
    NodePlan,
    Topology,
)

IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection for this address


class NetworkError(RuntimeError):
    """A namespace, link or route could not be made; the message names which."""


def create_netns(name: str) -> None:
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetworkError(f"ip netns add {name}: {proc.stderr.strip()}")


def delete_netns(name: str) -> None:
    """Kill what still runs inside, then remove the namespace. Absent is fine."""
    terminate(pids_in_netns(name), grace=2.0)
    if not netns_path(name).exists():
        return
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0 and netns_path(name).exists():
        raise NetworkError(f"ip netns del {name}: {proc.stderr.strip()}")


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetworkError(f"no link {ifname}")
    return int(found[0])


def _delete_link_if_present(ipr: IPRoute, ifname: str) -> None:
    for index in ipr.link_lookup(ifname=ifname):
        with contextlib.suppress(NetlinkError):  # gone meanwhile, e.g. with its peer's netns
            ipr.link("del", index=index)


def _loopback_up(ipr: IPRoute) -> None:
    ipr.link("set", index=_index(ipr, "lo"), state="up")


def _write_sysctl(key: str, value: str) -> None:
    # /proc/sys/net resolves against the netns of the thread that opens it.
    Path("/proc/sys", *key.split(".")).write_text(value)


def _write_ipv6_sysctls(settings: dict[str, str]) -> None:
    """net.ipv6.conf.{all,default}.KEY = VALUE for each, in the calling thread's netns."""
    if not Path("/proc/sys/net/ipv6").is_dir():
        raise NetworkError("IPv6 is disabled on this machine (no /proc/sys/net/ipv6)")
    for key, value in settings.items():
        for scope in ("all", "default"):
            _write_sysctl(f"net.ipv6.conf.{scope}.{key}", value)


# A node's IPv6 settings: IPv6 on; a router (forwarding) that takes no router advertisements,
# so no address or route of its own ever comes from one; and no duplicate address detection,
# as the pod network's node-side addresses (each pod's gateway on a ptp veth) must be usable
# at once, like the uplink's and cbr0's, which are added IFA_F_NODAD.
NODE_IPV6_SYSCTLS = {"disable_ipv6": "0", "accept_ra": "0", "accept_dad": "0", "forwarding": "1"}
# What the runtime sets in a new pod namespace before its CNI ADD. Otherwise the plugins wait
# for the pod's IPv6 addresses to leave their tentative state (ptp's ADD took 1.3-1.9 s; the
# bridge plugin turns detection off on the pod's eth0 itself); a pod's address is unique by
# its IPAM, so detection would only delay it.
POD_IPV6_SYSCTLS = {"disable_ipv6": "0", "accept_dad": "0"}


def prepare_pod_netns(netns: str) -> None:
    """Before a pod's CNI ADD, as the runtime does: IPv6 on, no duplicate address detection."""
    run_in_netns(netns, lambda: _write_ipv6_sysctls(POD_IPV6_SYSCTLS))


def create_underlay(topology: Topology) -> None:
    """The underlay: a bridge joining the nodes, holding the API endpoint's address (the
    apiproxy listens there) and a route to each node's pods (added with the node)."""
    create_netns(topology.underlay_netns)
    versions = sorted({v for node in topology.nodes for v in node.ip_versions})
    if 6 in versions:
        run_in_netns(topology.underlay_netns, lambda: _write_ipv6_sysctls(NODE_IPV6_SYSCTLS))

    def setup() -> None:
        with IPRoute() as ipr:
            _loopback_up(ipr)
            ipr.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge")
            bridge = _index(ipr, UNDERLAY_BRIDGE)
            for version in versions:
                net = UNDERLAY_NET if version == 4 else UNDERLAY_NET6
                _add_address(ipr, bridge, API_ENDPOINT_IPS[version], net.prefixlen)
            ipr.link("set", index=bridge, state="up")

    run_in_netns(topology.underlay_netns, setup)


def create_node(topology: Topology, node: NodePlan) -> None:
    """The node namespace, its uplink into the underlay, its pod bridge (none with the
    ptp pod network, whose plugin gives each pod its own veth) and routes."""
    create_netns(node.netns)
    if 6 in node.ip_versions:  # before its first link, which takes the namespace's defaults
        run_in_netns(node.netns, lambda: _write_ipv6_sysctls(NODE_IPV6_SYSCTLS))
    node_fd = os.open(netns_path(node.netns), os.O_RDONLY | os.O_CLOEXEC)
    try:

        def plug_into_underlay() -> None:
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=node.underlay_link,
                    kind="veth",
                    peer={"ifname": NODE_UPLINK, "net_ns_fd": node_fd},
                )
                ipr.link(
                    "set",
                    index=_index(ipr, node.underlay_link),
                    master=_index(ipr, UNDERLAY_BRIDGE),
                    state="up",
                )

        run_in_netns(topology.underlay_netns, plug_into_underlay)
    finally:
        os.close(node_fd)

    def route_to_pods() -> None:  # the API endpoint's answers to pods go back via their node
        with IPRoute() as ipr:
            for cidr, via in zip(node.pod_cidrs, node.ips, strict=True):
                ipr.route("add", dst=cidr, gateway=via)

    run_in_netns(topology.underlay_netns, route_to_pods)

    def setup_node() -> None:
        with IPRoute() as ipr:
            _loopback_up(ipr)
            uplink = _index(ipr, NODE_UPLINK)
            for ip in node.ips:
                underlay = UNDERLAY_NET if ipaddress.ip_address(ip).version == 4 else UNDERLAY_NET6
                _add_address(ipr, uplink, ip, underlay.prefixlen)
            ipr.link("set", index=uplink, state="up")
            if topology.pod_network == "bridge":
                _create_bridge(ipr, node)
            for other in topology.nodes:
                if other.name != node.name:
                    # One route per family: the pod CIDR via the node's address of its family.
                    for cidr, via in zip(other.pod_cidrs, other.ips, strict=True):
                        ipr.route("add", dst=cidr, gateway=via)
        _write_sysctl("net.ipv4.ip_forward", "1")

    run_in_netns(node.netns, setup_node)


def _create_bridge(ipr: IPRoute, node: NodePlan) -> None:
    ipr.link("add", ifname=NODE_BRIDGE, kind="bridge")
    bridge = _index(ipr, NODE_BRIDGE)
    # A fixed MAC, as a CNI bridge has: one borrowed from its lowest port
    # changes as pods come and go, and each change flushes the ARP cache.
    ipr.link("set", index=bridge, address=_bridge_mac(node.gateway))
    for gateway, cidr in zip(node.gateways, node.pod_cidrs, strict=True):
        _add_address(ipr, bridge, gateway, ipaddress.ip_network(cidr).prefixlen)
    ipr.link("set", index=bridge, state="up")


def _add_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    """An address on a link; an IPv6 one without duplicate address detection, so it is
    usable at once rather than tentative for a second or two."""
    if ipaddress.ip_address(address).version == 4:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    else:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)


def _bridge_mac(gateway: str) -> str:
    """A locally administered unicast MAC derived from the bridge's (first) address: an
    IPv4 one's four bytes; of an IPv6 one, the pod CIDR's subnet number and the last two."""
    packed = ipaddress.ip_address(gateway).packed
    octets = packed if len(packed) == 4 else packed[6:8] + packed[14:16]
    return "02:ac:" + ":".join(f"{b:02x}" for b in octets)


def forget_neighbours(node: NodePlan, ips: Iterable[str]) -> None:
    """In the node's namespace: drop its ARP (IPv4) and NDP (IPv6) entries on the node bridge
    for the addresses a new pod now has. (Only the bridge network needs it: with ptp each
    pod's veth is new, and neighbour entries go with the link they were learnt on.)"""

    def forget() -> None:
        with IPRoute() as ipr:
            for ip in ips:
                _forget_neighbour(ipr, ip)

    run_in_netns(node.netns, forget)


def _forget_neighbour(ipr: IPRoute, ip: str) -> None:
    """Drop the node's neighbour entry for a reused pod address.

    Without it the node keeps sending to the previous pod's MAC until the
    entry ages out (up to ~30 s): the new pod sends no gratuitous ARP.
    """
    family = socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6
    with contextlib.suppress(NetlinkError):
        ipr.neigh("del", family=family, dst=ip, ifindex=_index(ipr, NODE_BRIDGE))


def sandbox_netns(prefix: str) -> list[str]:
    return list_named_netns(prefix)


def delete_all(prefix: str) -> list[str]:
    """Remove every namespace with this prefix: pods first, then nodes, then the underlay."""
    names = sandbox_netns(prefix)

    def order(name: str) -> int:
        rest = name[len(prefix) :]
        return 0 if rest.startswith("pod-") else 1 if rest.startswith("node-") else 2

    for name in sorted(names, key=order):
        delete_netns(name)
    return names
