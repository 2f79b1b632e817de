"""Trust: what an attacker or a clumsy operator tried, each as a test (issue 12).

Real API server, real network namespaces, real rules. The node-bound writes
(the admission policy, with the agents' real pod-bound tokens) are proven in
test_chart.py, where the chart that ships the policy is installed.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ambient_cni.api import names
from ambient_cni.kube import raw
from ambient_cni.netns import pids_in_netns
from ambient_cni_sandbox.cluster import SandboxCluster, wait_for
from ambient_cni_sandbox.components import Mesh
from tests.e2e.conftest import agent_args
from tests.e2e.kernel import our_nft_tables

INJECTION = (
    "eth0 -p tcp -j RETURN\n-A ISTIO_OUTPUT -p tcp --dport 1234 -j DNAT --to-destination "
    "6.6.6.6:80\n-A ISTIO_PRERT -i eth0"
)


@pytest.fixture(scope="module")
def mesh(sandbox: SandboxCluster, backend: str) -> Iterator[Mesh]:
    running = Mesh(
        sandbox, "--drift-interval=1", *agent_args(backend), controller_args=["--orphan-grace=4"]
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def istio_rules(prefix: list[str]) -> list[str]:
    """Our chains and tables, whichever backend wrote them, through a command prefix that
    enters the netns (`ip netns exec NAME`, or nsenter through the pod's process)."""

    def run(*argv: str) -> str:
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False).stdout

    rules = [line for line in run("iptables-save").splitlines() if "ISTIO" in line]
    return rules + our_nft_tables(run("nft", "list", "ruleset"))


def in_process_netns(cluster: SandboxCluster, pod: dict[str, Any]) -> list[str]:
    """A command prefix entering the pod's netns through its process: it still works once
    the named netns is unmounted."""
    pid = pids_in_netns(cluster.pod_netns(pod))[0]
    return ["nsenter", f"--net=/proc/{pid}/ns/net"]


def holds_for(what: str, check: Callable[[], bool], seconds: float) -> None:
    """Poll `check` for `seconds`: it must hold at every look (something must NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), f"{what} did not hold"
        time.sleep(0.1)


def enrolled_pod(cluster: SandboxCluster, namespace: str, name: str, node: str) -> dict[str, Any]:
    cluster.create_pod(namespace, name, node=node)
    pod = cluster.wait_running(namespace, name)
    cluster.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, names.DATAPLANE_MODE_AMBIENT)
    wait_for(
        f"{name} enabled",
        lambda: cluster.pod_annotation(namespace, name, names.REDIRECTION_ANNOTATION) == "enabled",
    )
    return pod


# -- 1. input that cannot become a rule --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (INJECTION, "Too long"),
        ("e\n-jDROP", "should match"),
        ("-jDROP", "should match"),
        ("eth0+", "should match"),
        ('a"b', "should match"),
        ("!", "should match"),
    ],
)
def test_the_api_server_refuses_a_spec_that_could_become_a_rule(
    sandbox: SandboxCluster, mesh: Mesh, value: str, why: str
) -> None:
    entry = {
        "uid": "u-1",
        "name": "victim",
        "namespace": "default",
        "ips": ["10.244.0.99"],
        "rerouteVirtualInterfaces": [value],
    }
    patch = [{"op": "add", "path": "/spec/workloads/-", "value": entry}]
    result = sandbox.kubectl(
        "patch", "anc", "node-1", "--type=json", "-p", json.dumps(patch), check=False
    )
    assert result.returncode != 0
    assert "spec.workloads[0].rerouteVirtualInterfaces[0]" in result.stderr
    assert why in result.stderr


def test_a_hostile_annotation_is_dropped_once_with_an_event_and_never_reaches_a_rule(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    key = names.REROUTE_VIRTUAL_INTERFACES_ANNOTATION
    log = mesh.controller.log_path
    seen = len(log.read_text().splitlines())
    sandbox.create_pod(namespace, "odd", node="node-1", annotations={key: INJECTION})
    sandbox.create_pod(namespace, "plain", node="node-1")
    odd = sandbox.wait_running(namespace, "odd")
    plain = sandbox.wait_running(namespace, "plain")
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, names.DATAPLANE_MODE_AMBIENT)

    # The pod enrols without its bad value: exactly the rules of a pod with no annotation.
    def enabled(name: str) -> bool:
        return sandbox.pod_annotation(namespace, name, names.REDIRECTION_ANNOTATION) == "enabled"

    wait_for("odd and plain enabled", lambda: enabled("odd") and enabled("plain"))
    rules = istio_rules(["ip", "netns", "exec", sandbox.pod_netns(odd)])
    assert rules
    assert rules == istio_rules(["ip", "netns", "exec", sandbox.pod_netns(plain)])
    assert not [r for r in rules if "DNAT" in r or "6.6.6.6" in r]

    def events() -> list[dict[str, Any]]:
        listing = raw(
            sandbox.core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=odd", _preload_content=False
            )
        )
        return [e for e in listing["items"] if e["reason"] == "AnnotationIgnored"]

    found = wait_for("the Event on the pod", events)
    assert found[0]["type"] == "Warning"
    assert key in found[0]["message"]
    assert "eth0 -p tcp -j RETURN" in found[0]["message"]
    # The pod changed since (the agent's annotation): still one warning, one Event.
    warnings = [
        line
        for line in log.read_text().splitlines()[seen:]
        if f"{namespace}/odd" in line and key in line
    ]
    assert len(warnings) == 1
    assert len(events()) == 1


# -- 3. status that tells the truth --------------------------------------------------------------


def test_status_edited_by_hand_is_rewritten_within_a_pass(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    enrolled_pod(sandbox, namespace, "counted", "node-2")

    def only_counted() -> bool:
        status = (mesh.anc("node-2") or {}).get("status") or {}
        names_in = [w["name"] for w in status.get("workloads") or []]
        return names_in == ["counted"] and status.get("enrolled") == 1

    # Settled first: nothing else on the node is changing that would rewrite status anyway.
    wait_for("only this pod in node-2's status", only_counted, timeout=60)
    sandbox.kubectl(
        "patch",
        "anc",
        "node-2",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"failed":0,"enrolled":42,"workloads":null}}',
    )
    wait_for("status true again", only_counted, timeout=10)


# -- 4. a missing object is not an empty spec ----------------------------------------------------


def test_a_deleted_object_takes_nothing_out(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    pod = enrolled_pod(sandbox, namespace, "kept", "node-1")
    before = istio_rules(["ip", "netns", "exec", sandbox.pod_netns(pod)])
    agent = mesh.agents["node-1"]
    removed = 'ambient_cni_agent_pod_reconciles_total{state="Removed"}'
    removed_before = agent.metric(removed)
    mesh.controller.stop()  # nobody re-creates it: the agent waits as long as it takes
    try:
        sandbox.kubectl("delete", "anc", "node-1")
        wait_for("the agent to notice", lambda: agent.metric("ambient_cni_agent_object_missing"))
        # An un-enrolment takes milliseconds; three drift passes (1 s apart here) see none.
        holds_for(
            "the pod kept as it was",
            lambda: (
                sandbox.pod_annotation(namespace, "kept", names.REDIRECTION_ANNOTATION) == "enabled"
                and istio_rules(["ip", "netns", "exec", sandbox.pod_netns(pod)]) == before
                and agent.metric(removed) == removed_before
            ),
            seconds=3.0,
        )
    finally:
        mesh.controller.start()
    wait_for("the object back", lambda: mesh.anc("node-1"))
    wait_for("counted again", lambda: mesh.workload("node-1", "kept"))
    assert agent.metric("ambient_cni_agent_object_missing") == 0
    assert agent.metric("ambient_cni_agent_object_missing_seconds_total") > 0
    assert istio_rules(["ip", "netns", "exec", sandbox.pod_netns(pod)]) == before
    assert "AmbientNodeConfig node-1 is gone" in agent.log_path.read_text()


# -- 5. un-enrolment only when the kernel says so ----------------------------------------------


def test_rules_come_out_of_a_netns_that_was_unmounted_while_its_pod_lives(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    pod = enrolled_pod(sandbox, namespace, "hidden", "node-2")
    netns, real = sandbox.pod_netns(pod), in_process_netns(sandbox, pod)
    assert istio_rules(real)
    subprocess.run(["ip", "netns", "delete", netns], check=True)  # unmounted; the process lives
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)
    wait_for(
        "the annotation removed",
        lambda: sandbox.pod_annotation(namespace, "hidden", names.REDIRECTION_ANNOTATION) is None,
    )
    assert istio_rules(real) == []  # out of the pod's real netns, not just said to be
    wait_for("gone from status", lambda: mesh.workload("node-2", "hidden") is None)


def test_a_pod_the_agent_cannot_find_stays_removing_and_redirected_until_it_is_gone(
    sandbox: SandboxCluster, mesh: Mesh, namespace: str
) -> None:
    pod = enrolled_pod(sandbox, namespace, "lost", "node-2")
    netns, real = sandbox.pod_netns(pod), in_process_netns(sandbox, pod)
    rules = istio_rules(real)
    agent = mesh.agents["node-2"]
    agent.kill()  # a restarted agent holds no handle on it
    subprocess.run(["ip", "netns", "delete", netns], check=True)
    agent.start(timeout=60)
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)
    wait_for(
        "Removing with NetnsNotFound",
        lambda: (
            (e := mesh.workload("node-2", "lost"))
            and (e["state"], e["reason"]) == ("Removing", "NetnsNotFound")
        ),
    )
    assert (
        sandbox.pod_annotation(namespace, "lost", names.REDIRECTION_ANNOTATION) == "enabled"
    )  # it still is redirected
    assert istio_rules(real) == rules
    sandbox.delete_pod(namespace, "lost", grace=0)
    sandbox.wait_pod_gone(namespace, "lost")
    wait_for("gone from status", lambda: mesh.workload("node-2", "lost") is None, timeout=60)


# -- orphans -------------------------------------------------------------------------------------


def test_an_object_without_a_node_is_marked_then_deleted(
    sandbox: SandboxCluster, mesh: Mesh
) -> None:
    orphan = {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": "node-9"},
        "spec": {"nodeName": "node-9"},
    }
    sandbox.kubectl("apply", "-f", "-", input_text=json.dumps(orphan))

    def marked() -> dict[str, Any] | None:
        found = mesh.anc("node-9") or {}
        labelled = (found.get("metadata", {}).get("labels") or {}).get(names.ORPHANED_LABEL)
        conditions = (found.get("status") or {}).get("conditions") or []
        ready = [c for c in conditions if c["type"] == "Ready"]
        return ready[0] if labelled == "true" and ready else None

    ready = wait_for("the orphan marked", marked)
    assert (ready["status"], ready["reason"]) == ("False", "NodeNotFound")
    assert "Node node-9 does not exist" in ready["message"]
    # The README's wait leaves it out; the others are Ready.
    waited = sandbox.kubectl(
        "wait",
        "--for=condition=Ready",
        "ambientnodeconfigs",
        "-l",
        f"!{names.ORPHANED_LABEL}",
        "--timeout=30s",
        check=False,
    )
    assert waited.returncode == 0, waited.stderr
    assert "node-9" not in waited.stdout
    wait_for("the orphan deleted", lambda: mesh.anc("node-9") is None, timeout=30)
