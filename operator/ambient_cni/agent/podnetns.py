"""Finding a pod's network namespace (reference section 2.5).

In order: a path the CNI plugin reported; a /proc scan for the pod UID in a
process's cgroup (the oldest such process, outside the host netns); a scan
of the named namespaces (/run/netns) for the one that holds the pod's IP.
Whatever is found must hold one of the pod's IPs.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.rtnetlink import addresses
from ambient_cni.netns import NetnsError, NetnsWorkers

from .interfaces import NetnsNotFoundError

# kubepods.slice/.../kubepods-besteffort-pod<uid with _>.slice, or /kubepods/besteffort/pod<uid>/...
_POD_UID = re.compile(
    r"pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})"
)


# Seconds one /proc scan (or named-netns scan) serves a burst of lookups without reading
# again; a pod missed is retried after a second.
PROC_SCAN_TTL = 0.5


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in /proc/<pid>/cgroup text, with dashes, or None."""
    match = _POD_UID.search(text)
    return match.group(1).replace("_", "-").lower() if match else None


# Failures of a namespace's address listing that mean "not this one".
NOT_FOUND = (NetnsError, OSError, DataplaneError)


class PodNetnsResolver:
    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        netns_dir: Path = Path("/run/netns"),
        netns_prefix: str = "",
        workers: NetnsWorkers | None = None,
    ):
        """`workers` enter namespaces to list their addresses (by default, two of its own)."""
        self.workers = workers or NetnsWorkers(2, name="netns-lookup")
        self.proc = proc
        self.netns_dir = netns_dir
        self.netns_prefix = netns_prefix  # only named namespaces starting with it (sandbox nodes)
        self.host_inode = os.stat("/proc/self/ns/net").st_ino
        self.reported: dict[str, Path] = {}  # pod uid -> path the CNI plugin gave
        self._by_ip: dict[str, Path] = {}
        self._proc_lock = threading.Lock()
        self._named_lock = threading.Lock()
        self._named_scans = 0
        self._proc_cache: dict[str, list[Path]] = {}
        self._proc_scanned_at = -PROC_SCAN_TTL
        self._named_scanned_at = -PROC_SCAN_TTL

    def report(self, uid: str, netns: Path) -> None:
        self.reported[uid] = netns

    def forget(self, uid: str) -> None:
        self.reported.pop(uid, None)

    def resolve(self, uid: str, ips: Iterable[str]) -> Path:
        wanted = set(ips)
        for candidate in self._candidates(uid):
            if self._addresses(candidate) & wanted:
                return candidate
        fresh = time.monotonic() - self._named_scanned_at < PROC_SCAN_TTL
        for ip in wanted:  # the cache first (read again unless just scanned), then a new scan
            cached = self._by_ip.get(ip)
            if cached is not None and (fresh or ip in self._addresses(cached)):
                return cached
        scans_before = self._named_scans
        with self._named_lock:
            # Pods that miss together share one scan: one made while we waited will do,
            # unless it did not find us either.
            if scans_before == self._named_scans or not wanted & set(self._by_ip):
                self._scan_named()
                self._named_scans += 1
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
        return self._proc_index().get(uid, [])

    def _proc_index(self) -> dict[str, list[Path]]:
        """Pod UID -> its network namespaces, oldest process first, from one /proc scan.

        A burst of pods shares one scan (reused for PROC_SCAN_TTL): a scan reads every
        process's cgroup file, so one per pod would cost O(pods x processes).
        """
        with self._proc_lock:
            if time.monotonic() - self._proc_scanned_at < PROC_SCAN_TTL:
                return self._proc_cache
            matches: dict[str, list[tuple[float, int, Path]]] = {}
            for entry in os.scandir(self.proc):
                if not entry.name.isdigit():
                    continue
                try:
                    uid = pod_uid_from_cgroup(Path(entry.path, "cgroup").read_text())
                    if uid is None:
                        continue
                    ns = Path(entry.path, "ns", "net")
                    inode = os.stat(ns).st_ino
                    started = os.stat(entry.path).st_ctime
                except OSError:
                    continue
                if inode != self.host_inode:
                    matches.setdefault(uid, []).append((started, inode, ns))
            index: dict[str, list[Path]] = {}
            for uid, found in matches.items():
                seen: set[int] = set()
                for _, inode, ns in sorted(found):  # the oldest process first
                    if inode not in seen:
                        seen.add(inode)
                        index.setdefault(uid, []).append(ns)
            self._proc_cache, self._proc_scanned_at = index, time.monotonic()
            return index

    def _scan_named(self) -> None:
        self._named_scanned_at = time.monotonic()
        self._by_ip.clear()
        try:
            names = sorted(n for n in os.listdir(self.netns_dir) if n.startswith(self.netns_prefix))
        except OSError:
            return
        paths = [self.netns_dir / name for name in names]
        for path, found in zip(paths, self.workers.run_each(paths, addresses), strict=True):
            if isinstance(found, NOT_FOUND):
                continue  # gone meanwhile, or not a namespace
            if isinstance(found, Exception):
                raise found
            for ip in found:
                self._by_ip.setdefault(ip, path)

    def _addresses(self, path: Path) -> set[str]:
        try:
            return self.workers.run(path, addresses)
        except NOT_FOUND:
            return set()


class HeldNetns:
    """An open fd on each enrolled pod's network namespace (Istio's agent keeps them too).

    The path handed out, /proc/<agent pid>/fd/<fd>, reaches the namespace for as long as it
    is held, even after its bind mount is gone, and other processes may open it too (an
    iptables lock file). Released when the pod is fully out.
    """

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, int]] = {}  # uid -> (fd, inode)
        self._lock = threading.Lock()

    @staticmethod
    def _path(fd: int) -> Path:
        return Path(f"/proc/{os.getpid()}/fd/{fd}")

    def hold(self, uid: str, netns: Path) -> Path:
        inode = os.stat(netns).st_ino
        with self._lock:
            known = self._fds.get(uid)
        if known is not None and known[1] == inode:
            return self._path(known[0])
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            old = self._fds.get(uid)
            self._fds[uid] = (fd, inode)
        if old is not None:
            os.close(old[0])
        return self._path(fd)

    def held(self, uid: str) -> Path | None:
        with self._lock:
            known = self._fds.get(uid)
        return None if known is None else self._path(known[0])

    def release(self, uid: str) -> None:
        with self._lock:
            known = self._fds.pop(uid, None)
        if known is not None:
            os.close(known[0])
