"""`kubectl ambient`, run as a kubectl plugin: the sandbox's real kubectl finds
`kubectl-ambient` on PATH, and it answers from the real API server. Each selection reason is
set up for real and named; `status` exits 0 on a healthy cluster and 1 with a broken node;
`pods -A` agrees with the counts in status; the agent's Events tell the story in
`kubectl describe anc`."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni_sandbox.cluster import SandboxCluster, wait_for
from ambient_cni_sandbox.components import Mesh, start_ztunnel

LABEL = names.DATAPLANE_MODE_LABEL
REDIRECTION = names.REDIRECTION_ANNOTATION
SYSTEM = names.DEFAULT_SYSTEM_NAMESPACE


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster) -> Iterator[Mesh]:
    # The backend pinned: "auto" follows what earlier tests left on the nodes.
    running = Mesh(sandbox, "--drift-interval=1", "--backend=iptables-nft")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def kubectl_ambient(cluster: SandboxCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl ambient ARGS` through the sandbox's kubectl, the plugin found on PATH."""
    scripts = Path(sys.executable).parent  # where pip put the console script
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KUBECONFIG", None)
    return subprocess.run(
        [
            str(Path(cluster.state.bin_dir) / "kubectl"),
            "ambient",
            *args,
            f"--kubeconfig={cluster.kubeconfig}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def why(cluster: SandboxCluster, namespace: str, pod: str) -> dict[str, Any]:
    done = kubectl_ambient(cluster, "why", f"{namespace}/{pod}", "-o", "json")
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] == (done.returncode == 0)
    return report


def enabled(cluster: SandboxCluster, namespace: str, *pods: str) -> None:
    wait_for(
        f"{', '.join(pods)} enabled",
        lambda: all(cluster.pod_annotation(namespace, p, REDIRECTION) == "enabled" for p in pods),
    )


def test_why_names_the_reason_for_each_kind_of_pod(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    plain = f"{namespace}-plain"
    sandbox.create_namespace(plain)
    # Pods outside the test's namespaces, removed whatever happens.
    outside = [("kube-system", "excluded"), (SYSTEM, "agent-pod"), (namespace, "unbound")]
    try:
        sandbox.label_namespace(namespace, LABEL, "ambient")
        sandbox.create_pod(namespace, "member", node="node-1")
        sandbox.create_pod(namespace, "opted-out", node="node-1", labels={LABEL: "none"})
        sandbox.create_pod(
            namespace, "disabled", node="node-1", annotations={REDIRECTION: "disabled"}
        )
        sandbox.create_pod(namespace, "host", node="node-1", host_network=True)
        sandbox.create_pod(namespace, "with-sidecar", node="node-2", sidecar={})
        sandbox.create_pod(
            namespace, "finished", node="node-2", command=["true"], restart_policy="Never"
        )
        # Bound to a node no kubelet runs: it never gets an address.
        sandbox.create_pod(namespace, "unbound", node="node-9")
        sandbox.create_pod(namespace, "unplaceable", node_selector={"example.com/none": "x"})
        sandbox.create_pod(plain, "picked", node="node-2", labels={LABEL: "ambient"})
        sandbox.create_pod(plain, "plain", node="node-2")
        sandbox.create_pod("kube-system", "excluded", node="node-1", labels={LABEL: "ambient"})
        sandbox.create_pod(SYSTEM, "agent-pod", node="node-1", labels={"k8s-app": "istio-cni-node"})
        enabled(sandbox, namespace, "member")
        enabled(sandbox, plain, "picked")
        sandbox.wait_pod(
            namespace, "finished", lambda p: p["status"].get("phase") == "Succeeded", "to finish"
        )
        for ns, pod in [(namespace, "host"), (namespace, "with-sidecar"), (plain, "plain")]:
            sandbox.wait_running(ns, pod)

        expected = {
            (namespace, "member"): ("NamespaceLabel", "Redirected"),
            (plain, "picked"): ("PodLabel", "Redirected"),
            (plain, "plain"): ("NotSelected", "NotRedirected"),
            (namespace, "opted-out"): ("OptedOut", "NotRedirected"),
            (namespace, "disabled"): ("RedirectionDisabled", "NotRedirected"),
            (namespace, "host"): ("HostNetwork", "NotRedirected"),
            (namespace, "with-sidecar"): ("SidecarPod", "NotRedirected"),
            (namespace, "finished"): ("Terminal", "NotRedirected"),
            (namespace, "unbound"): ("NoPodIP", "NotRedirected"),
            (namespace, "unplaceable"): ("NotScheduled", "NotRedirected"),
            ("kube-system", "excluded"): ("ExcludedNamespace", "NotRedirected"),
            (SYSTEM, "agent-pod"): ("NodeAgentPod", "NotRedirected"),
            (SYSTEM, "ztunnel-node-1"): ("ZtunnelPod", "NotRedirected"),
        }

        def ask() -> dict[tuple[str, str], dict[str, Any]]:
            # Each answer is its own kubectl and plugin process: asked a few at a time.
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                found = pool.map(lambda key: why(sandbox, *key), expected)
                return dict(zip(expected, found, strict=True))

        def settled() -> dict[tuple[str, str], dict[str, Any]] | None:
            # A pod that just finished is Pending until its node's agent reports it gone.
            answers = ask()
            said = {k: (a["reason"], a["verdict"]) for k, a in answers.items()}
            return answers if said == expected else None

        try:
            answers = wait_for("every pod's answer", settled, timeout=30)
        except AssertionError:
            answers = ask()
        assert {k: (a["reason"], a["verdict"]) for k, a in answers.items()} == expected
        member = answers[(namespace, "member")]
        assert (member["listedInSpec"], member["status"]["state"]) == (True, "Enrolled")
        assert (member["annotation"], member["findings"]) == ("enabled", [])

        # The human form, with the namespace given as kubectl users give it.
        done = kubectl_ambient(sandbox, "why", "member", "-n", namespace)
        assert done.returncode == 0, done.stderr
        assert "Verdict:    Redirected (in the mesh" in done.stdout
        assert f"namespace {namespace} is labelled {LABEL}=ambient" in done.stdout
        assert "Selection, spec, status and annotation agree." in done.stdout
        missing = kubectl_ambient(sandbox, "why", "nobody", "-n", namespace)
        assert missing.returncode == 2
        assert f'error: pod "nobody" not found in namespace {namespace}' in missing.stderr
    finally:
        for ns, pod in outside:
            sandbox.delete_pod(ns, pod, grace=0)
        sandbox.delete_namespace(plain)
        wait_for(f"namespace {plain} gone", lambda: sandbox.namespace(plain) is None, timeout=60)


def status(cluster: SandboxCluster) -> subprocess.CompletedProcess[str]:
    return kubectl_ambient(cluster, "status")


def describe_events(cluster: SandboxCluster, node: str) -> str:
    described = cluster.kubectl("describe", "anc", node).stdout
    return described.partition("Events:")[2]


def test_status_exit_code_follows_the_nodes_and_describe_tells_the_story(
    sandbox: SandboxCluster, mesh: Mesh
) -> None:
    healthy = wait_for("status to be Ready", lambda: (s := status(sandbox)).returncode == 0 and s)
    assert "Status:       Ready" in healthy.stdout
    for node in sandbox.node_names:
        assert f"{node}   inpod   iptables-nft   {SYSTEM}/ztunnel-{node}" in healthy.stdout
    assert "Controller:   leading: " in healthy.stdout
    assert "version 0.1.0" in healthy.stdout

    sandbox.delete_pod(SYSTEM, "ztunnel-node-2", grace=0)
    try:
        # The spec changes first (no ztunnel): a moment of "not reported yet", then this.
        broken = wait_for(
            "status to fail on node-2's ztunnel",
            lambda: (
                (s := status(sandbox)).returncode == 1 and "ztunnel not connected" in s.stdout and s
            ),
        )
        assert "node-2   inpod   iptables-nft   no " in broken.stdout
        assert "Status:       Not ready" in broken.stdout
        assert "  - node node-2: ztunnel not connected" in broken.stdout
        wait_for(
            "a ZtunnelDisconnected Event on node-2's AmbientNodeConfig",
            lambda: "ZtunnelDisconnected" in describe_events(sandbox, "node-2"),
        )
    finally:
        start_ztunnel(sandbox, "node-2")
    wait_for("status Ready again", lambda: status(sandbox).returncode == 0)
    wait_for(
        "a ZtunnelConnected Event",
        lambda: "ZtunnelConnected" in describe_events(sandbox, "node-2"),
    )


def test_pods_agrees_with_the_counts_and_failures_reach_status_and_events(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    for pod, node in [("a", "node-1"), ("b", "node-1"), ("c", "node-2"), ("lost", "node-2")]:
        sandbox.create_pod(namespace, pod, node=node)
    lost = sandbox.wait_running(namespace, "lost")
    # Its process keeps its namespace, but nothing can find it any more: it will fail.
    subprocess.run(["ip", "netns", "delete", sandbox.pod_netns(lost)], check=True)
    sandbox.label_namespace(namespace, LABEL, "ambient")
    enabled(sandbox, namespace, "a", "b", "c")

    def listed() -> list[dict[str, Any]] | None:
        done = kubectl_ambient(sandbox, "pods", "-A", "-o", "json")
        assert done.returncode == 0, done.stderr
        items: list[dict[str, Any]] = json.loads(done.stdout)["items"]
        mine = {i["name"]: i["state"] for i in items if i["namespace"] == namespace}
        return (
            items
            if mine == {"a": "Enrolled", "b": "Enrolled", "c": "Enrolled", "lost": "Failed"}
            else None
        )

    items = wait_for("pods -A to show the namespace's pods", listed)
    counted = Counter((i["node"], i["state"]) for i in items)
    for node in sandbox.node_names:
        status_of = (mesh.anc(node) or {})["status"]
        assert counted[(node, "Enrolled")] == status_of["enrolled"]
        assert counted[(node, "Failed")] == status_of["failed"]

    table = kubectl_ambient(sandbox, "pods", "-n", namespace)
    assert table.stdout.splitlines()[0].split() == [
        "NAME",
        "NODE",
        "MODE",
        "STATE",
        "REASON",
        "SINCE",
    ]
    assert [line.split()[:5] for line in table.stdout.splitlines()[1:]] == [
        ["a", "node-1", "inpod", "Enrolled", "Enrolled"],
        ["b", "node-1", "inpod", "Enrolled", "Enrolled"],
        ["c", "node-2", "inpod", "Enrolled", "Enrolled"],
        ["lost", "node-2", "inpod", "Failed", "NetnsNotFound"],
    ]
    failed = kubectl_ambient(sandbox, "why", f"{namespace}/lost")
    assert failed.returncode == 1
    assert "Status:     Failed (NetnsNotFound)" in failed.stdout
    broken = status(sandbox)
    assert broken.returncode == 1
    assert "  1 Failed NetnsNotFound: " in broken.stdout
    assert f"      {namespace}/lost" in broken.stdout
    wait_for(
        "a NetnsNotFound Event naming the pod",
        lambda: f"{namespace}/lost" in describe_events(sandbox, "node-2"),
    )


def repair_events(cluster: SandboxCluster, node: str, pod: str) -> list[dict[str, Any]]:
    listed = cluster.kubectl(
        "get",
        "events",
        "-n",
        names.CLUSTER_EVENTS_NAMESPACE,
        f"--field-selector=involvedObject.name={node},reason=DriftRepaired",
        "-o",
        "json",
    )
    items: list[dict[str, Any]] = json.loads(listed.stdout)["items"]
    return [e for e in items if e["message"].startswith(f"pod {pod}: ")]


def test_a_repair_again_is_one_event_with_a_count(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    sandbox.create_pod(namespace, "drifty", node="node-1")
    drifty = sandbox.wait_running(namespace, "drifty")
    sandbox.label_namespace(namespace, LABEL, "ambient")
    enabled(sandbox, namespace, "drifty")
    flush = ["ip", "netns", "exec", sandbox.pod_netns(drifty), "iptables", "-t", "nat"]
    mine = f"{namespace}/drifty"

    def counted(count: int) -> list[dict[str, Any]]:
        return [e for e in repair_events(sandbox, "node-1", mine) if e["count"] == count]

    for count in (1, 2):
        subprocess.run([*flush, "-F", "ISTIO_OUTPUT"], check=True)
        found = wait_for(f"the repair Event counted {count}", functools.partial(counted, count))
    assert len(repair_events(sandbox, "node-1", mine)) == 1
    assert "IPv4 nat: 6 of our rules missing" in found[0]["message"]
    assert found[0]["involvedObject"]["kind"] == "AmbientNodeConfig"
