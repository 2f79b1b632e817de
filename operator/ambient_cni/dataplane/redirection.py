"""What decides a pod's redirection, per IP family, from its spec entry: pure."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict

from ambient_cni.api.models import InterfaceName, Workload

from .constants import Family


class PodRedirect(BaseModel):
    """What decides a pod's ruleset for one IP family."""

    model_config = ConfigDict(frozen=True)

    family: Family = 4
    dns_capture: bool = True
    bypass_inbound: bool = False
    virtual_interfaces: tuple[InterfaceName, ...] = ()


def family_of(ip: str) -> Family:
    return 4 if ipaddress.ip_address(ip).version == 4 else 6


def pod_redirect(workload: Workload, family: Family, dns_default: bool) -> PodRedirect:
    """A spec entry's knobs, with the node-wide DNS default where the pod does not say."""
    return PodRedirect(
        family=family,
        dns_capture=dns_default if workload.dns_capture is None else workload.dns_capture,
        bypass_inbound=bool(workload.bypass_inbound_capture),
        virtual_interfaces=tuple(workload.reroute_virtual_interfaces),
    )


def pod_redirects(workload: Workload, dns_default: bool) -> list[PodRedirect]:
    """One PodRedirect per IP family the pod has, IPv4 first."""
    families: list[Family] = sorted({family_of(ip) for ip in workload.ips})
    return [pod_redirect(workload, family, dns_default) for family in families]
