"""Finding a pod's network namespace (reference section 2.5).

In order: a path the CNI plugin reported; a /proc scan for the pod UID in a
process's cgroup (the oldest such process, outside the host netns); a scan
of the named namespaces (/run/netns) for the one that holds the pod's IP.
Whatever is found must hold one of the pod's IPs.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute

from ambient_cni.netns import NetnsError, run_in_netns

# kubepods.slice/.../kubepods-besteffort-pod<uid with _>.slice, or /kubepods/besteffort/pod<uid>/...
_POD_UID = re.compile(
    r"pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})"
)


class NetnsNotFoundError(LookupError):
    pass


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in /proc/<pid>/cgroup text, with dashes, or None."""
    match = _POD_UID.search(text)
    return match.group(1).replace("_", "-").lower() if match else None


def _addresses() -> set[str]:
    with IPRoute() as ipr:
        found: set[str] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for addr in ipr.get_addr(family=family):
                value = addr.get_attr("IFA_ADDRESS")
                if value:
                    found.add(str(value))
        return found


def netns_addresses(path: Path) -> set[str]:
    try:
        return run_in_netns(path, _addresses)
    except (NetnsError, OSError):
        return set()


class PodNetnsResolver:
    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        netns_dir: Path = Path("/run/netns"),
        netns_prefix: str = "",
    ):
        self.proc = proc
        self.netns_dir = netns_dir
        self.netns_prefix = netns_prefix  # only named namespaces starting with it (sandbox nodes)
        self.host_inode = os.stat("/proc/self/ns/net").st_ino
        self.reported: dict[str, Path] = {}  # pod uid -> path the CNI plugin gave
        self._by_ip: dict[str, Path] = {}

    def resolve(self, uid: str, ips: Iterable[str]) -> Path:
        wanted = set(ips)
        for candidate in self._candidates(uid):
            if netns_addresses(candidate) & wanted:
                return candidate
        for ip in wanted:  # the cache first, then a fresh scan
            cached = self._by_ip.get(ip)
            if cached is not None and ip in netns_addresses(cached):
                return cached
        self._scan_named()
        for ip in wanted:
            if ip in self._by_ip:
                return self._by_ip[ip]
        raise NetnsNotFoundError(f"no network namespace holds {', '.join(sorted(wanted))}")

    def _candidates(self, uid: str) -> list[Path]:
        found = []
        if uid in self.reported:
            found.append(self.reported[uid])
        found += self._proc_scan(uid)
        return found

    def _proc_scan(self, uid: str) -> list[Path]:
        matches: list[tuple[float, Path]] = []
        seen: set[int] = {self.host_inode}
        for entry in os.scandir(self.proc):
            if not entry.name.isdigit():
                continue
            try:
                cgroup = Path(entry.path, "cgroup").read_text()
                if pod_uid_from_cgroup(cgroup) != uid:
                    continue
                ns = Path(entry.path, "ns", "net")
                inode = os.stat(ns).st_ino
                started = os.stat(entry.path).st_ctime
            except OSError:
                continue
            if inode in seen:
                continue
            seen.add(inode)
            matches.append((started, ns))
        return [path for _, path in sorted(matches)]  # the oldest process first

    def _scan_named(self) -> None:
        self._by_ip.clear()
        try:
            names = sorted(n for n in os.listdir(self.netns_dir) if n.startswith(self.netns_prefix))
        except OSError:
            return
        for name in names:
            path = self.netns_dir / name
            for ip in netns_addresses(path):
                self._by_ip.setdefault(ip, path)
