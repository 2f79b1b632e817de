"""Operator processes (controller, later node agents) running against a sandbox.

Each runs as a tagged daemon, so `sandbox down` stops it with everything
else; its log goes to the sandbox's log directory and its Prometheus metrics
can be read back for assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from ambient_cni.api import names
from ambient_cni.kube import Obj, raw

from . import cni as cni_chain
from .binaries import PLUGIN_BINARY
from .cluster import SandboxCluster, wait_for
from .ports import free_port
from .processes import is_running, spawn_daemon, terminate
from .state import paths_for

CONTROLLER_USER = "ambient-cni-controller"
# Namespaces istio-cni passes through in the sandbox: the system pods (ztunnel, the
# agent's stand-ins) must start whether or not the agent answers.
CNI_EXCLUDED = ("kube-system", names.DEFAULT_SYSTEM_NAMESPACE)


class Component:
    """One `ambient-cni <command>` process bound to loopback ports of its own."""

    def __init__(
        self, cluster: SandboxCluster, label: str, argv: Sequence[str], *, metrics: bool = True
    ):
        self.cluster = cluster
        self.label = label
        self.argv = list(argv)
        self.has_metrics = metrics
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_path = Path(cluster.state.state_dir) / "logs" / f"{label}.log"
        self.pid: int | None = None

    def start(self, *, timeout: float = 30.0) -> None:
        proc = spawn_daemon(
            [
                sys.executable,
                "-m",
                "ambient_cni.cli",
                *self.argv,
                "--listen-address=127.0.0.1",
                *([f"--metrics-port={self.metrics_port}"] if self.has_metrics else []),
                f"--health-port={self.health_port}",
            ],
            sandbox=self.cluster.name,
            log_path=self.log_path,
        )
        self.pid = proc.pid

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {proc.returncode}: see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
                ) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait_for(f"{self.label} to be healthy", healthy, timeout=timeout)

    def stop(self) -> None:
        if self.pid is not None:
            terminate([self.pid], grace=10.0)
            self.pid = None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node agent crashes or is OOM-killed."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            wait_for(f"{self.label} to die", lambda: not is_running(self.pid or 0))
            terminate([self.pid], grace=0)  # reap it
            self.pid = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics(self) -> dict[str, float]:
        """Every sample, keyed `name{label="value",...}` (labels sorted)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as reply:
            text = reply.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)


def controller(
    cluster: SandboxCluster, *extra_args: str, kubeconfig: Path | None = None
) -> Component:
    """The controller, authenticated as its own user (so audit records tell its writes apart);
    `kubeconfig` replaces that user (e.g. with the chart's ServiceAccount token)."""
    kubeconfig = kubeconfig or cluster.user_kubeconfig(CONTROLLER_USER, groups="system:masters")
    return Component(
        cluster,
        "controller",
        ["controller", f"--kubeconfig={kubeconfig}", *extra_args],
    )


AGENT_USER = "ambient-cni-agent"


def zds_socket(cluster: SandboxCluster, node: str) -> Path:
    return Path(cluster.state.state_dir) / "ztunnel" / node / "ztunnel.sock"


def ztunnel_log(cluster: SandboxCluster, node: str) -> Path:
    return Path(cluster.state.state_dir) / "logs" / f"ztunnel-{node}.connections.jsonl"


def agent(
    cluster: SandboxCluster, node: str, *extra_args: str, kubeconfig: Path | None = None
) -> Component:
    """The node agent of one sandbox node: its host is the node's netns."""
    kubeconfig = kubeconfig or cluster.user_kubeconfig(AGENT_USER, groups="system:masters")
    prefix = cluster.state.topology.prefix
    return Component(
        cluster,
        f"agent-{node}",
        [
            "agent",
            f"--node={node}",
            f"--kubeconfig={kubeconfig}",
            f"--zds-socket={zds_socket(cluster, node)}",
            f"--host-netns=/run/netns/{cluster.state.topology.node(node).netns}",
            "--netns-dir=/run/netns",
            f"--netns-prefix={prefix}pod-",
            *extra_args,
        ],
    )


def install_cni_args(cluster: SandboxCluster, node: str) -> list[str]:
    """install-cni for one sandbox node: its CNI dirs, the built plugin, its agent's socket."""
    node_cni = paths_for(cluster.name).node_cni(node)
    return [
        "install-cni",
        f"--bin-dir={node_cni.bin_dir}",
        f"--conf-dir={node_cni.conf_dir}",
        f"--plugin-binary={Path(cluster.state.cni_bin_dir) / PLUGIN_BINARY}",
        f"--agent-run-dir={cni_chain.agent_run_dir(node_cni)}",
        f"--exclude-namespaces={','.join(CNI_EXCLUDED)}",
    ]


def install_cni(cluster: SandboxCluster, node: str, *extra_args: str) -> Component:
    """install-cni as the agent DaemonSet's container runs it, on one sandbox node."""
    return Component(
        cluster,
        f"install-cni-{node}",
        [*install_cni_args(cluster, node), *extra_args],
        metrics=False,
    )


def uninstall_cni(cluster: SandboxCluster, node: str) -> None:
    """`install-cni --uninstall` on one node, as the chart's uninstall runs it."""
    subprocess.run(
        [sys.executable, "-m", "ambient_cni.cli", *install_cni_args(cluster, node), "--uninstall"],
        check=True,
        capture_output=True,
        timeout=30,
    )


def start_ztunnel(cluster: SandboxCluster, node: str, namespace: str = "istio-system") -> str:
    """The ztunnel stand-in as a pod labelled app=ztunnel on `node` (kept if it is there);
    returns the pod name once it runs."""
    name = f"ztunnel-{node}"
    if cluster.namespace(namespace) is None:
        cluster.create_namespace(namespace)
    if cluster.pod(namespace, name) is not None:
        cluster.wait_running(namespace, name)
        return name
    cluster.create_pod(
        namespace,
        name,
        node=node,
        labels={"app": "ztunnel"},
        command=[
            sys.executable,
            "-m",
            "ambient_cni_sandbox.ztunnel",
            f"--socket={zds_socket(cluster, node)}",
            f"--log={ztunnel_log(cluster, node)}",
        ],
    )
    cluster.wait_running(namespace, name)
    return name


def repo_crds() -> Path:
    # sandbox/ambient_cni_sandbox/components.py -> repository root
    return Path(__file__).resolve().parents[2] / "crds"


class Mesh:
    """The whole operator on a sandbox: CRD, controller, one agent and one ztunnel per node."""

    def __init__(
        self,
        cluster: SandboxCluster,
        *agent_args: str,
        controller_kubeconfig: Path | None = None,
        install_crds: bool = True,
        controller_args: Sequence[str] = (),
        cni: bool = False,
    ):
        """`cni`: install-cni on every node chaining istio-cni, each agent serving it."""
        self.cluster = cluster
        self.install_crds = install_crds
        self.cni = cni
        paths = paths_for(cluster.name)
        self.node_cni = {n: paths.node_cni(n) for n in cluster.node_names}
        self.controller = controller(cluster, *controller_args, kubeconfig=controller_kubeconfig)
        # install-cni runs in the agent's DaemonSet: the agent's credentials.
        agent_credentials = cluster.user_kubeconfig(AGENT_USER, groups="system:masters")
        self.installers = (
            {
                n: install_cni(cluster, n, f"--kubeconfig={agent_credentials}")
                for n in cluster.node_names
            }
            if cni
            else {}
        )

        def cni_args(node: str) -> list[str]:
            if not cni:
                return []
            return [f"--cni-run-dir={cni_chain.agent_run_dir(self.node_cni[node])}"]

        self.agents = {
            n: agent(cluster, n, *agent_args, *cni_args(n), kubeconfig=agent_credentials)
            for n in cluster.node_names
        }

    def start(self) -> None:
        if self.install_crds:
            self.cluster.kubectl("apply", "-f", str(repo_crds()))
        self.cluster.kubectl("wait", "--for=condition=established", f"crd/{names.CRD_NAME}")
        if self.cluster.namespace(names.DEFAULT_SYSTEM_NAMESPACE) is None:
            self.cluster.create_namespace(names.DEFAULT_SYSTEM_NAMESPACE)
        try:
            self.controller.start()
            wait_for(
                "an AmbientNodeConfig per node",
                lambda: all(self.anc(n) for n in self.cluster.node_names),
            )
            for node_agent in self.agents.values():
                node_agent.start(timeout=60)
            for installer in self.installers.values():
                installer.start()  # healthy once istio-cni is in the node's chain
            for node in self.cluster.node_names:
                start_ztunnel(self.cluster, node)
        except BaseException:
            # A half-started mesh would go on acting on later tests' pods.
            self.stop()
            raise

    def stop(self) -> None:
        for node, installer in self.installers.items():
            installer.stop()  # which leaves it installed, as on an upgrade
            uninstall_cni(self.cluster, node)
        for node_agent in self.agents.values():
            node_agent.stop()
        self.controller.stop()
        for node in self.cluster.node_names:
            self.cluster.delete_pod(names.DEFAULT_SYSTEM_NAMESPACE, f"ztunnel-{node}", grace=0)

    def anc(self, node: str) -> Obj | None:
        try:
            return raw(
                CustomObjectsApi(self.cluster.api).get_cluster_custom_object(
                    names.GROUP, names.VERSION, names.PLURAL, node, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def workload(self, node: str, name: str) -> dict[str, Any] | None:
        """A workload's entry in its node's status, by pod name."""
        status = (self.anc(node) or {}).get("status") or {}
        for entry in status.get("workloads") or []:
            if entry["name"] == name:
                return dict(entry)
        return None

    def connections(self, node: str) -> list[dict[str, Any]]:
        """What node's ztunnel stand-in relayed, one record per closed connection."""
        path = ztunnel_log(self.cluster, node)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
