"""Pod networking through a real CNI chain, as a container runtime sets it up.

Each node has what a real node has: a conf dir whose first config is the
primary network (the reference `bridge` plugin with `host-local` IPAM, or
`ptp` with `host-local` as kindnet writes it, as a CNI DaemonSet would write
it), a bin dir holding the plugins, and libcni's
result cache. The kubelet runs the node's network for a pod sandbox with
`cni-run` (libcni) from the node's namespace, the runtime's: `loopback` as a
network of its own as containerd does, then the node's conflist. A failed ADD
is the plugin's own message; DEL runs even after a failed ADD.

On a dual-stack (or IPv6) node, host-local has one range per family, as a
dual-stack node's CNI config has (IPv4 first), and a default route per family;
a pod gets one address of each. Before the ADD the runtime turns duplicate
address detection off in the pod's namespace (network.prepare_pod_netns), so
the plugins need not wait for the IPv6 address to leave its tentative state.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambient_cni.netns import netns_path, run_in_netns

from . import network
from .topology import NODE_BRIDGE, POD_INTERFACE, NodePlan, PodNetwork

PRIMARY_CONFIG = "10-simnet.conflist"
NETWORK_NAME = "simnet"
REFERENCE_PLUGINS = ("bridge", "ptp", "host-local", "loopback")
CNI_TIMEOUT_S = 30.0
DEFAULT_ROUTES = {4: "0.0.0.0/0", 6: "::/0"}


class CniError(RuntimeError):
    """A CNI operation failed; the message is the failing plugin's own."""


@dataclass(frozen=True)
class NodeCni:
    """One node's CNI directories, under the sandbox's state directory."""

    root: Path

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def loopback_dir(self) -> Path:
        return self.root / "lo.d"


def primary_conflist(
    node: NodePlan, ipam_dir: Path, pod_network: PodNetwork = "bridge"
) -> dict[str, Any]:
    """The node's primary network, addresses from its pod CIDRs (one range and one default
    route per family): pods on the node bridge, or (ptp, as kindnet) each pod on a veth of
    its own, routed by a /32 (/128) on the node."""
    ipam = {
        "type": "host-local",
        "ranges": [
            [{"subnet": cidr, "gateway": gateway}]
            for cidr, gateway in zip(node.pod_cidrs, node.gateways, strict=True)
        ],
        "routes": [{"dst": DEFAULT_ROUTES[version]} for version in node.ip_versions],
        "dataDir": str(ipam_dir),
    }
    # ipMasq off: nodes route each other's pod CIDRs, so there is no NAT between pods.
    plugin: dict[str, Any] = (
        {"type": "ptp", "ipMasq": False, "ipam": ipam}
        if pod_network == "ptp"
        else {
            "type": "bridge",
            "bridge": NODE_BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "ipam": ipam,
        }
    )
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": [plugin]}


def write_node_config(
    cni: NodeCni, node: NodePlan, binaries: Path, pod_network: PodNetwork = "bridge"
) -> None:
    """What a node's CNI DaemonSet would install: plugins in the bin dir, the primary
    network's conflist first in the conf dir, and the loopback network."""
    for directory in (cni.conf_dir, cni.bin_dir, cni.cache_dir, cni.ipam_dir, cni.loopback_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for plugin in REFERENCE_PLUGINS:
        link = cni.bin_dir / plugin
        link.unlink(missing_ok=True)
        link.symlink_to(binaries / plugin)
    _write(cni.conf_dir / PRIMARY_CONFIG, primary_conflist(node, cni.ipam_dir, pod_network))
    _write(
        cni.loopback_dir / "99-loopback.conf",
        {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"},
    )


def _write(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def result_addresses(result: dict[str, Any]) -> dict[int, str]:
    """Every address of a CNI result's `ips` (without its prefix length) by version, 4 or 6;
    the first of each version where there are more."""
    found: dict[int, str] = {}
    for entry in result.get("ips") or []:
        address = ipaddress.ip_interface(str(entry["address"])).ip
        found.setdefault(address.version, str(address))
    return found


@dataclass(frozen=True)
class SandboxPod:
    """What the runtime passes a CNI plugin about a pod sandbox."""

    namespace: str
    name: str
    uid: str
    netns: str  # a named namespace

    @property
    def container_id(self) -> str:
        return self.uid

    def cni_args(self) -> str:
        return ";".join(
            [
                "IgnoreUnknown=1",
                f"K8S_POD_NAMESPACE={self.namespace}",
                f"K8S_POD_NAME={self.name}",
                f"K8S_POD_INFRA_CONTAINER_ID={self.container_id}",
                f"K8S_POD_UID={self.uid}",
            ]
        )


# Binds each source onto its target, then runs the command: the arguments are
# SOURCE TARGET pairs, `--`, and the command.
_BIND_THEN_EXEC = (
    'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done; shift; exec "$@"'
)


def in_node_view(node_view: Mapping[str, Path], argv: Sequence[str]) -> list[str]:
    """`argv` run where the node's own paths are: in a private mount namespace, each path
    of a real node (`/var/run/istio-cni`) bind-mounted from where the sandbox keeps that
    node's, as a runtime on that node would see them. Nothing leaks to the machine."""
    if not node_view:
        return list(argv)
    pairs = [str(a) for path, source in sorted(node_view.items()) for a in (source, path)]
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "--",
        "sh",
        "-c",
        _BIND_THEN_EXEC,
        "sh",
        *pairs,
        "--",
        *argv,
    ]


class CniRuntime:
    """Runs a node's CNI networks for pod sandboxes, from the node's namespace."""

    def __init__(
        self,
        cni: NodeCni,
        node: NodePlan,
        cni_run: Path,
        node_view: Mapping[str, Path] | None = None,
    ):
        """`node_view`: paths a node's CNI config may name (install-cni in a pod writes
        `/var/run/istio-cni`) -> where the sandbox keeps this node's (see `in_node_view`)."""
        self.cni = cni
        self.node = node
        self.cni_run = cni_run
        self.node_view = dict(node_view or {})

    def add(self, pod: SandboxPod) -> tuple[str, ...]:
        """Set up the pod's networks; its addresses, one per family of the node in the
        node's order (IPv4 first). CniError on failure, after a DEL that takes out whatever
        the chain made before it failed."""
        if 6 in self.node.ip_versions:
            try:
                network.prepare_pod_netns(pod.netns)
            except (network.NetworkError, OSError) as exc:
                raise CniError(f"cannot prepare the pod's network namespace: {exc}") from exc
        try:
            self._run("add", pod, self.cni.loopback_dir)
            result = json.loads(self._run("add", pod, self.cni.conf_dir))
            addresses = result_addresses(result)
        except (CniError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.delete(pod)
            raise exc if isinstance(exc, CniError) else CniError(f"bad ADD result: {exc}") from exc
        missing = [f"IPv{v}" for v in self.node.ip_versions if v not in addresses]
        if missing:
            self.delete(pod)
            raise CniError(
                f"the network {NETWORK_NAME} gave {POD_INTERFACE} no {' or '.join(missing)} address"
            )
        return tuple(addresses[v] for v in self.node.ip_versions)

    def delete(self, pod: SandboxPod) -> list[str]:
        """Tear the pod's networks down, in reverse; best effort, as a runtime does it. The
        messages of what failed (empty when all went)."""
        failures = []
        for conf_dir in (self.cni.conf_dir, self.cni.loopback_dir):
            try:
                self._run("del", pod, conf_dir)
            except CniError as exc:
                failures.append(str(exc))
        return failures

    def _run(self, command: str, pod: SandboxPod, conf_dir: Path) -> str:
        for mount_point, source in self.node_view.items():
            # A node has these; the machine may not (removed again at `sandbox down`), nor
            # the node before anything is installed on it.
            Path(mount_point).mkdir(parents=True, exist_ok=True)
            source.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.cni_run),
            f"--conf-dir={conf_dir}",
            f"--bin-dir={self.cni.bin_dir}",
            f"--cache-dir={self.cni.cache_dir}",
            f"--netns={netns_path(pod.netns)}",
            f"--container-id={pod.container_id}",
            f"--ifname={POD_INTERFACE}",
            f"--args={pod.cni_args()}",
            command,
        ]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                in_node_view(self.node_view, argv),
                capture_output=True,
                text=True,
                env=env,
                timeout=CNI_TIMEOUT_S,
                check=False,
            )

        try:
            done = run_in_netns(self.node.netns, run)
        except subprocess.TimeoutExpired as exc:
            raise CniError(f"CNI {command} timed out after {CNI_TIMEOUT_S:.0f}s") from exc
        if done.returncode != 0:
            said = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
            raise CniError(said)
        return done.stdout


# -- istio-cni in a node's chain ---------------------------------------------------------------


# Where a real node's agent serves the plugin (Istio's path, the chart's default).
NODE_AGENT_RUN_DIR = "/var/run/istio-cni"


def agent_run_dir(cni: NodeCni) -> Path:
    """Where a node's agent serves the plugin (Istio's /var/run/istio-cni)."""
    return cni.root / "istio-cni"
