"""Operator processes (controller, later node agents) running against a sandbox.

Each runs as a tagged daemon, so `sandbox down` stops it with everything
else; its log goes to the sandbox's log directory and its Prometheus metrics
can be read back for assertions.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .cluster import SandboxCluster, wait_for
from .processes import spawn_daemon, terminate

CONTROLLER_USER = "ambient-cni-controller"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Component:
    """One `ambient-cni <command>` process bound to loopback ports of its own."""

    def __init__(self, cluster: SandboxCluster, label: str, argv: Sequence[str]):
        self.cluster = cluster
        self.label = label
        self.argv = list(argv)
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
                f"--metrics-port={self.metrics_port}",
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


def controller(cluster: SandboxCluster, *extra_args: str) -> Component:
    """The controller, authenticated as its own user (so audit records tell its writes apart)."""
    kubeconfig = cluster.user_kubeconfig(CONTROLLER_USER, groups="system:masters")
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


def agent(cluster: SandboxCluster, node: str, *extra_args: str) -> Component:
    """The node agent of one sandbox node: its host is the node's netns."""
    kubeconfig = cluster.user_kubeconfig(AGENT_USER, groups="system:masters")
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


def start_ztunnel(cluster: SandboxCluster, node: str, namespace: str = "istio-system") -> str:
    """The ztunnel stand-in as a pod labelled app=ztunnel on `node`; returns the pod name."""
    name = f"ztunnel-{node}"
    cluster.create_pod(
        namespace,
        name,
        node=node,
        labels={"app": "ztunnel"},
        command=[
            sys.executable,
            "-m",
            "ambient_cni.sandbox.ztunnel",
            f"--socket={zds_socket(cluster, node)}",
            f"--log={ztunnel_log(cluster, node)}",
        ],
    )
    cluster.wait_running(namespace, name)
    return name
