"""Bringing a sandbox up and down.

`up` starts the control plane, builds the node network, then starts the
scheduler and one kubelet per node, and returns once every Node is Ready and
pods can be created. If anything fails on the way, it removes all it made.

`down` needs no state: it kills every process tagged with the sandbox's name,
removes every network namespace with its prefix, and deletes its files. So it
also cleans up after a `sandbox up` that was killed halfway.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from ambient_cni.kube import new_api_client, raw

from . import cni, container_runtime, network
from .binaries import binaries_dir, cni_binaries_dir
from .controlplane import ControlPlane, ControlPlaneError, Ports
from .processes import is_running, spawn_daemon, tagged_pids, tagged_sandboxes, terminate
from .scheduling import node_view
from .state import STATE_ROOT, SandboxState, load_state, paths_for, tmpfs_etcd_dir
from .topology import DEFAULT_IP_FAMILY, IpFamily, PodNetwork, plan, prefix_for

READY_TIMEOUT = 60.0
Say = Callable[[str], None]


class SandboxError(RuntimeError):
    """The sandbox could not be brought up (or fully down); the message says where."""


def _say(message: str) -> None:
    print(f"[sandbox] {message}", file=sys.stderr, flush=True)


def _quiet(_message: str) -> None:
    pass


def up(
    name: str,
    nodes: int = 2,
    *,
    pod_network: PodNetwork = "bridge",
    ip_family: IpFamily = DEFAULT_IP_FAMILY,
    say: Say = _say,
    apiserver_profiling: bool = False,
) -> SandboxState:
    """`pod_network`: "bridge" (pods on a node bridge) or "ptp" (a veth per pod, as kindnet);
    `ip_family`: "dual" (an IPv4 and an IPv6 address for every node and pod, IPv4 first),
    "ipv4" or "ipv6". Both are kept in the state's topology for the kubelets.
    `apiserver_profiling`: the API server serves /debug/pprof (benchmarks read where its
    time goes); off otherwise, as hardened clusters run it."""
    paths = paths_for(name)
    topology = plan(name, nodes, pod_network, ip_family)
    existing = load_state(name)
    if existing is not None and existing.topology == topology and is_healthy(existing):
        say(f"sandbox {name} is already up")
        return existing
    if not leftovers(name).empty:
        say(f"removing what an earlier sandbox {name} left behind")
        down(name, say=_quiet)

    bin_dir = binaries_dir()
    cni_bin_dir = cni_binaries_dir()
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    paths.state_dir.chmod(0o700)
    ports = Ports.pick()
    state = SandboxState(
        name=name,
        topology=topology,
        ports={
            "etcd_client": ports.etcd_client,
            "etcd_peer": ports.etcd_peer,
            "apiserver": ports.apiserver,
            "controller_manager": ports.controller_manager,
        },
        bin_dir=str(bin_dir),
        cni_bin_dir=str(cni_bin_dir),
        state_dir=str(paths.state_dir),
        etcd_dir=str(paths.etcd_dir),
        kubeconfig=str(paths.kubeconfig),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    state.save()
    started = time.monotonic()
    try:
        control_plane = ControlPlane(
            sandbox=name,
            state_dir=paths.state_dir,
            etcd_data_dir=paths.etcd_dir,
            bin_dir=bin_dir,
            apiserver_profiling=apiserver_profiling,
        )
        control_plane.write_credentials(ports)
        say(
            "starting etcd, kube-apiserver and kube-controller-manager "
            f"on 127.0.0.1:{ports.apiserver}"
        )
        control_plane.start(ports)
        say(
            f"creating {nodes} node network namespaces joined by an underlay "
            f"({pod_network} pod network, {ip_family})"
        )
        network.create_underlay(topology)
        for node in topology.nodes:
            network.create_node(topology, node)
            cni.write_node_config(paths.node_cni(node.name), node, cni_bin_dir, pod_network)
        helpers = {
            "scheduler": ["scheduler", "--name", name],
            "apiproxy": ["apiproxy", "--name", name],
        }
        for node in topology.nodes:
            helpers[f"kubelet-{node.name}"] = ["kubelet", "--name", name, "--node", node.name]
        procs = {
            label: spawn_daemon(
                [sys.executable, "-m", "ambient_cni_sandbox", *argv],
                sandbox=name,
                log_path=paths.log_dir / f"{label}.log",
            )
            for label, argv in helpers.items()
        }
        _wait_ready(state, procs, paths.log_dir)
    except BaseException:
        say("start failed; removing everything it made")
        down(name, say=_quiet)
        raise
    say(
        f"sandbox {name} is up in {time.monotonic() - started:.1f}s; kubeconfig: {paths.kubeconfig}"
    )
    return state


def _wait_ready(
    state: SandboxState, procs: dict[str, subprocess.Popen[bytes]], log_dir: Path
) -> None:
    """Every Node Ready and the default ServiceAccount present (pods can be created)."""
    core = CoreV1Api(new_api_client(Path(state.kubeconfig)))
    wanted = {n.name for n in state.topology.nodes}
    deadline = time.monotonic() + READY_TIMEOUT
    waiting_for = "nodes"
    while time.monotonic() < deadline:
        for label, proc in procs.items():
            code = proc.poll()
            if code is not None:
                raise SandboxError(
                    f"{label} exited with code {code} during start; "
                    f"see {log_dir / (label + '.log')}:\n{_tail(log_dir, label)}"
                )
        try:
            listing = raw(core.list_node(_preload_content=False))
            ready = {v.name for v in map(node_view, listing["items"]) if v.ready}
            if wanted <= ready:
                waiting_for = "the default ServiceAccount"
                core.read_namespaced_service_account("default", "default", _preload_content=False)
                return
        except ApiException as exc:
            if exc.status != 404:
                raise
        time.sleep(0.2)
    raise SandboxError(
        f"sandbox {state.name}: timed out after {READY_TIMEOUT:.0f}s waiting for {waiting_for}"
    )


def _tail(log_dir: Path, label: str, lines: int = 20) -> str:
    try:
        text = (log_dir / f"{label}.log").read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def is_healthy(state: SandboxState) -> bool:
    try:
        core = CoreV1Api(new_api_client(Path(state.kubeconfig)))
        listing = raw(core.list_node(_preload_content=False, _request_timeout=3))
    except Exception:
        return False
    ready = {v.name for v in map(node_view, listing["items"]) if v.ready}
    return {n.name for n in state.topology.nodes} <= ready and bool(tagged_pids(state.name))


@dataclass
class DownReport:
    processes: list[int] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)  # the kubelets' image pods'

    @property
    def empty(self) -> bool:
        return not (self.processes or self.netns or self.paths or self.containers)


def leftovers(name: str) -> DownReport:
    """What exists of sandbox `name`: processes, namespaces, files."""
    return DownReport(
        processes=tagged_pids(name),
        netns=network.sandbox_netns(prefix_for(name)),
        paths=[str(p) for p in _owned_paths(name) if p.exists()],
        containers=_containers(name),
    )


def _containers(name: str) -> list[str]:
    if shutil.which("podman") is None:  # no image was ever run here
        return []
    return container_runtime.containers_of(sandbox=name)


def _owned_paths(name: str) -> list[Path]:
    paths = paths_for(name)
    # Both places etcd may have used, whatever /dev/shm is now.
    candidates = [paths.state_dir, paths.etcd_dir, tmpfs_etcd_dir(name)]
    return list(dict.fromkeys(candidates))


def down(name: str, *, say: Say = _say) -> DownReport:
    found = leftovers(name)
    # Kubelets and the scheduler first, so nothing restarts pods while we remove them.
    helpers = [p for p in found.processes if _is_helper(p)]
    still = terminate(helpers, grace=5.0)
    if found.containers:  # after the kubelets, so none is started again meanwhile
        container_runtime.remove_all(name)
    still += terminate(tagged_pids(name), grace=5.0)
    network.delete_all(prefix_for(name))
    for path in _owned_paths(name):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the shared root, once no sandbox uses it
        STATE_ROOT.rmdir()
    with contextlib.suppress(OSError):  # the kubelets' mount point for a node's view, if empty
        Path(cni.NODE_AGENT_RUN_DIR).rmdir()
    remaining = leftovers(name)
    if not remaining.empty or still:
        raise SandboxError(f"sandbox {name}: could not remove everything: {remaining}")
    if found.empty:
        say(f"sandbox {name}: nothing to remove")
    else:
        say(
            f"sandbox {name} removed: {len(found.processes)} processes, "
            f"{len(found.netns)} network namespaces, {len(found.paths)} directories"
            + (f", {len(found.containers)} containers" if found.containers else "")
        )
    return found


HELPERS = (b"kubelet", b"scheduler")


def _is_helper(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # python -m ambient_cni_sandbox kubelet|scheduler ...
    module = b"ambient_cni_sandbox"
    if module not in cmdline[:-1]:
        return False
    return cmdline[cmdline.index(module) + 1] in HELPERS and is_running(pid)


def known_sandboxes() -> list[str]:
    """Names of every sandbox with anything left on this machine."""
    names = set()
    if STATE_ROOT.is_dir():
        names |= {p.name for p in STATE_ROOT.iterdir() if p.is_dir()}
    for netns in network.sandbox_netns("acni-"):
        names.add(netns.split("-")[1])
    names |= tagged_sandboxes()
    return sorted(names)


def require_state(name: str) -> SandboxState:
    state = load_state(name)
    if state is None:
        raise SandboxError(
            f"sandbox {name!r} is not up (no {paths_for(name).state_file}); "
            f"start it with: ambient-cni sandbox up --name {name}"
        )
    return state


__all__ = [
    "ControlPlaneError",
    "DownReport",
    "SandboxError",
    "down",
    "known_sandboxes",
    "leftovers",
    "require_state",
    "up",
]
