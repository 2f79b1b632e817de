"""Which user kubelet runs as: the nftables probe rule matches its UID (nft has no
`--socket-exists`), found as Istio's agent finds it, by a scan of the host's /proc."""

from __future__ import annotations

import os
from pathlib import Path

# Process names (comm) of kubelet: itself, MicroK8s' kubelite, k3s' all-in-one binary.
KUBELET_NAMES = ("kubelet", "kubelite", "k3s")


def kubelet_uid(proc: Path = Path("/proc")) -> int:
    """The real UID of the first kubelet process found; LookupError when there is none."""
    for entry in sorted(os.scandir(proc), key=lambda e: e.name):
        if not entry.name.isdigit():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            if comm not in KUBELET_NAMES:
                continue
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if comm != "k3s" and not any(b"kubelet" in arg for arg in argv):
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    raise LookupError(f"no kubelet process in {proc}: pass --kubelet-uid")
