"""The sandbox kubelet runs each node's CNI chain as a container runtime does: a plugin
that fails ADD keeps the pod ContainerCreating with a FailedCreatePodSandBox Event in
the plugin's words, and the kubelet retries until the chain lets it through."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient_cni_sandbox.binaries import PLUGIN_BINARY, cni_binaries_dir
from ambient_cni_sandbox.cluster import SandboxCluster, wait_for
from ambient_cni_sandbox.cni import PRIMARY_CONFIG
from ambient_cni_sandbox.state import paths_for


@pytest.fixture
def chain_with_istio_cni(sandbox: SandboxCluster, tmp_path: Path) -> Iterator[Path]:
    """node-1's conflist with istio-cni chained last, pointing at an agent that is not
    there; the node's original conflist is put back afterwards, whatever happens."""
    cni = paths_for(sandbox.name).node_cni("node-1")
    conflist = cni.conf_dir / PRIMARY_CONFIG
    original = conflist.read_text()
    plugin = cni.bin_dir / PLUGIN_BINARY
    shutil.copy(cni_binaries_dir(build=False) / PLUGIN_BINARY, plugin)
    config = json.loads(original)
    config["plugins"].append(
        {"type": PLUGIN_BINARY, "cni_agent_run_dir": str(tmp_path), "agent_timeout_seconds": 1}
    )
    conflist.write_text(json.dumps(config))
    try:
        yield conflist
    finally:
        conflist.write_text(original)
        plugin.unlink(missing_ok=True)


def sandbox_failures(sandbox: SandboxCluster, namespace: str, pod: str) -> list[dict[str, Any]]:
    return sandbox.pod_events(namespace, pod, "FailedCreatePodSandBox")


def test_a_failing_plugin_holds_the_pod_until_the_chain_lets_it_through(
    sandbox: SandboxCluster, namespace: str, chain_with_istio_cni: Path
) -> None:
    sandbox.create_pod(namespace, "web", node="node-1")

    failures = wait_for(
        "a FailedCreatePodSandBox event", lambda: sandbox_failures(sandbox, namespace, "web")
    )
    assert "the node agent did not answer" in failures[0]["message"]
    assert f"{namespace}/web" in failures[0]["message"]
    pod = sandbox.pod(namespace, "web") or {}
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ContainerCreating"
    assert not pod["status"].get("podIP")
    wait_for(
        "the kubelet to retry",
        lambda: len(sandbox_failures(sandbox, namespace, "web")) >= 2,
        timeout=15,
    )

    # The chain without the failing plugin: the next try starts the pod.
    config = json.loads(chain_with_istio_cni.read_text())
    config["plugins"] = [p for p in config["plugins"] if p["type"] != PLUGIN_BINARY]
    chain_with_istio_cni.write_text(json.dumps(config))
    started = sandbox.wait_running(namespace, "web", timeout=30)
    # Every failed try gave its address back: the pod holds exactly one lease.
    uid = started["metadata"]["uid"]
    leases = paths_for(sandbox.name).node_cni("node-1").ipam_dir.rglob("10.*")
    assert [p.name for p in leases if p.read_text().startswith(uid)] == [started["status"]["podIP"]]
