"""Where a sandbox keeps its files, and the record `sandbox up` leaves for the others.

/run/ambient-cni/<name>/            state dir (removed by `down`)
    state.json                      this record
    kubeconfig                      admin kubeconfig
    pki/ logs/ pods/<node>/         certificates, component logs, pod records and logs
    cni/<node>/                     the node's CNI conf dir, bin dir, result cache, IPAM state
/dev/shm/ambient-cni-<name>-etcd/   etcd data, on tmpfs when /dev/shm is one
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from .cni import NodeCni
from .controlplane import Ports
from .topology import Topology, validate_name

STATE_ROOT = Path(os.environ.get("AMBIENT_CNI_SANDBOX_ROOT", "/run/ambient-cni"))
SHM = Path("/dev/shm")  # noqa: S108 - a root-owned 0700 subdirectory, for etcd on tmpfs


@dataclass(frozen=True)
class SandboxPaths:
    name: str
    state_dir: Path
    etcd_dir: Path

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def pods_dir(self, node: str) -> Path:
        return self.state_dir / "pods" / node

    def node_cni(self, node: str) -> NodeCni:
        return NodeCni(self.state_dir / "cni" / node)


def _is_tmpfs_mount(path: Path) -> bool:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(
        len(fields) > 2 and fields[1] == str(path) and fields[2] == "tmpfs"
        for fields in (line.split() for line in mounts)
    )


def tmpfs_etcd_dir(name: str) -> Path:
    return SHM / f"ambient-cni-{name}-etcd"


def paths_for(name: str) -> SandboxPaths:
    validate_name(name)
    state_dir = STATE_ROOT / name
    tmpfs_dir = tmpfs_etcd_dir(name)
    etcd_dir = tmpfs_dir if _is_tmpfs_mount(tmpfs_dir.parent) else state_dir / "etcd"
    return SandboxPaths(name=name, state_dir=state_dir, etcd_dir=etcd_dir)


class SandboxState(BaseModel):
    name: str
    topology: Topology
    ports: dict[str, int]
    bin_dir: str
    cni_bin_dir: str = ""  # the built CNI plugins and cni-run
    state_dir: str
    etcd_dir: str
    kubeconfig: str
    created: str

    @property
    def apiserver_port(self) -> int:
        return self.ports["apiserver"]

    def control_plane_ports(self) -> Ports:
        return Ports(**self.ports)

    def save(self) -> None:
        path = Path(self.state_dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)


def load_state(name: str) -> SandboxState | None:
    path = paths_for(name).state_file
    try:
        return SandboxState.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
