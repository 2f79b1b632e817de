"""The controller against the sandbox's real kube-apiserver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import CustomObjectsApi

from ambient_cni.api import names
from ambient_cni.kube import as_body, raw
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, pod_ips, wait_for
from ambient_cni_sandbox.components import CONTROLLER_USER, Component, controller

REPO = Path(__file__).resolve().parents[2]
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture(scope="module")
def running_controller(sandbox: SandboxCluster) -> Iterator[Component]:
    sandbox.kubectl("apply", "-f", str(REPO / "crds"))
    sandbox.kubectl("wait", "--for=condition=established", f"crd/{names.CRD_NAME}")
    if sandbox.namespace(names.DEFAULT_SYSTEM_NAMESPACE) is None:
        sandbox.create_namespace(names.DEFAULT_SYSTEM_NAMESPACE)
    component = controller(sandbox)
    component.start()
    try:
        yield component
    finally:
        component.stop()


def anc(sandbox: SandboxCluster, node: str) -> dict[str, Any] | None:
    custom = CustomObjectsApi(sandbox.api)
    try:
        return raw(
            custom.get_cluster_custom_object(
                names.GROUP, names.VERSION, names.PLURAL, node, _preload_content=False
            )
        )
    except Exception:
        return None


def workloads(
    sandbox: SandboxCluster, node: str, namespace: str | None = None
) -> list[dict[str, Any]]:
    obj = anc(sandbox, node) or {}
    entries = (obj.get("spec") or {}).get("workloads") or []
    return [w for w in entries if namespace is None or w["namespace"] == namespace]


def names_on(sandbox: SandboxCluster, node: str, namespace: str) -> set[str]:
    return {w["name"] for w in workloads(sandbox, node, namespace)}


def label_namespace(sandbox: SandboxCluster, namespace: str, value: str | None) -> None:
    sandbox.core.patch_namespace(
        namespace,
        as_body({"metadata": {"labels": {"istio.io/dataplane-mode": value}}}),
        _content_type="application/merge-patch+json",
    )


def test_one_object_per_node_with_printer_columns(
    sandbox: SandboxCluster, running_controller: Component
) -> None:
    wait_for(
        "an AmbientNodeConfig per node", lambda: all(anc(sandbox, n) for n in sandbox.node_names)
    )
    table = sandbox.kubectl("get", "anc").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "MODE",
        "ZTUNNEL",
        "ENROLLED",
        "SIDECARS",
        "PENDING",
        "FAILED",
        "READY",
        "AGE",
    ]
    assert sorted(line.split()[0] for line in table[1:]) == sandbox.node_names
    assert all(line.split()[1] == "inpod" for line in table[1:])
    node = anc(sandbox, "node-1")
    assert node is not None
    assert node["metadata"]["ownerReferences"][0]["kind"] == "Node"
    assert node["spec"]["nodeName"] == "node-1"
    # The category works too.
    assert "node-1" in sandbox.kubectl("get", "ambient").stdout


def test_labelling_a_namespace_enrols_exactly_its_eligible_pods(
    sandbox: SandboxCluster, running_controller: Component, namespace: str
) -> None:
    sandbox.create_pod(namespace, "a", node="node-1", command=["sleep", "3600"])
    sandbox.create_pod(namespace, "b", node="node-2", command=["sleep", "3600"])
    sandbox.create_pod(
        namespace,
        "opted-out",
        node="node-1",
        command=["sleep", "3600"],
        labels={"istio.io/dataplane-mode": "none"},
    )
    sandbox.create_pod(
        namespace, "host", node="node-1", command=["sleep", "3600"], host_network=True
    )
    sandbox.create_pod(
        namespace,
        "sidecar",
        node="node-2",
        command=["sleep", "3600"],
        annotations={"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'},
    )
    sandbox.create_pod(
        "kube-system",
        f"{namespace[:40]}-sys",
        node="node-1",
        command=["sleep", "3600"],
        labels=AMBIENT,
    )
    try:
        pods = {
            name: sandbox.wait_running(namespace, name)
            for name in ("a", "b", "opted-out", "host", "sidecar")
        }
        sandbox.wait_running("kube-system", f"{namespace[:40]}-sys")
        assert names_on(sandbox, "node-1", namespace) == set()

        label_namespace(sandbox, namespace, "ambient")
        wait_for(
            "a and b in their nodes' specs",
            lambda: (
                names_on(sandbox, "node-1", namespace) == {"a"}
                and names_on(sandbox, "node-2", namespace) == {"b"}
            ),
        )
        [entry] = workloads(sandbox, "node-1", namespace)
        assert entry == {
            "uid": pods["a"]["metadata"]["uid"],
            "name": "a",
            "namespace": namespace,
            "serviceAccount": "default",
            "ips": pod_ips(pods["a"]),  # both families, IPv4 first
        }
        assert len(entry["ips"]) == 2
        assert workloads(sandbox, "node-1", "kube-system") == []

        label_namespace(sandbox, namespace, None)
        wait_for(
            "the namespace's pods to leave the specs",
            lambda: (
                not workloads(sandbox, "node-1", namespace)
                and not workloads(sandbox, "node-2", namespace)
            ),
        )
    finally:
        sandbox.delete_pod("kube-system", f"{namespace[:40]}-sys", grace=0)


def test_pod_label_enrols_in_an_unlabelled_namespace_and_deletion_removes_it(
    sandbox: SandboxCluster, running_controller: Component, namespace: str
) -> None:
    sandbox.create_pod(namespace, "solo", node="node-2", command=["sleep", "3600"], labels=AMBIENT)
    sandbox.create_pod(namespace, "other", node="node-2", command=["sleep", "3600"])
    sandbox.wait_running(namespace, "solo")
    sandbox.wait_running(namespace, "other")
    wait_for("solo enrolled", lambda: names_on(sandbox, "node-2", namespace) == {"solo"})
    sandbox.delete_pod(namespace, "solo", grace=0)
    wait_for("solo gone from the spec", lambda: names_on(sandbox, "node-2", namespace) == set())


def test_deleting_a_node_deletes_its_object(
    sandbox: SandboxCluster, running_controller: Component
) -> None:
    sandbox.core.create_node(as_body({"metadata": {"name": "node-extra"}}))
    try:
        wait_for("an object for the new node", lambda: anc(sandbox, "node-extra"))
    finally:
        sandbox.core.delete_node("node-extra")
    wait_for(
        "garbage collection of its object", lambda: anc(sandbox, "node-extra") is None, timeout=60
    )


def test_a_burst_of_200_pods_costs_a_handful_of_patches(
    sandbox: SandboxCluster, running_controller: Component, namespace: str
) -> None:
    label_namespace(sandbox, namespace, "ambient")
    patches = 'ambient_cni_controller_spec_writes_total{operation="patch"}'
    before = running_controller.metric(patches)
    for number in range(200):
        sandbox.create_pod(namespace, f"burst-{number}", command=["sleep", "3600"])
    wait_for(
        "all 200 pods in the specs",
        lambda: sum(len(workloads(sandbox, n, namespace)) for n in sandbox.node_names) == 200,
        timeout=180,
    )
    written = running_controller.metric(patches) - before
    print(f"200 pods on {len(sandbox.node_names)} nodes: {written:.0f} patches")
    assert 2 <= written <= 12 * len(sandbox.node_names)
    assert running_controller.metric("ambient_cni_controller_coalesced_events_total") > 200


def test_a_restart_writes_nothing_when_nothing_changed(
    sandbox: SandboxCluster, running_controller: Component, namespace: str
) -> None:
    label_namespace(sandbox, namespace, "ambient")
    sandbox.create_pod(namespace, "steady", node="node-1", command=["sleep", "3600"])
    sandbox.wait_running(namespace, "steady")
    wait_for("steady enrolled", lambda: names_on(sandbox, "node-1", namespace) == {"steady"})
    # Earlier tests' pods may still be leaving the specs (1 s per-node write interval):
    # "nothing changed" needs every spec final before the restart.
    wait_for(
        "steady the only workload left",
        lambda: (
            sum(
                len(((anc(sandbox, n) or {}).get("spec") or {}).get("workloads") or [])
                for n in sandbox.node_names
            )
            == 1
        ),
    )
    versions = {
        n: (anc(sandbox, n) or {})["metadata"]["resourceVersion"] for n in sandbox.node_names
    }

    running_controller.restart()
    # Every node is reconciled once after priming; then the counts are final.
    wait_for(
        "one reconcile per node",
        lambda: (
            running_controller.metric("ambient_cni_controller_reconcile_seconds_count")
            >= len(sandbox.node_names)
        ),
    )
    metrics = running_controller.metrics()
    writes = sum(
        v for k, v in metrics.items() if k.startswith("ambient_cni_controller_spec_writes_total")
    )
    assert writes == 0
    assert {
        n: (anc(sandbox, n) or {})["metadata"]["resourceVersion"] for n in sandbox.node_names
    } == versions


def test_a_hand_written_bad_object_is_refused_with_a_clear_message(
    sandbox: SandboxCluster, running_controller: Component
) -> None:
    bad: dict[str, Any] = {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": "node-bad"},
        "spec": {
            "nodeName": "node-bad",
            "redirectMode": "sideways",
            "workloads": [{"uid": "u", "name": "n", "namespace": "ns", "ips": ["10.0.0.300"]}],
        },
    }
    result = sandbox.kubectl("apply", "-f", "-", check=False, input_text=json.dumps(bad))
    assert result.returncode != 0
    assert 'spec.redirectMode: Unsupported value: "sideways"' in result.stderr
    bad["spec"]["redirectMode"] = "inpod"
    result = sandbox.kubectl("apply", "-f", "-", check=False, input_text=json.dumps(bad))
    assert "spec.workloads[0].ips[0]" in result.stderr
    assert "must be an IPv4 or IPv6 address" in result.stderr


def test_each_node_names_its_ztunnel(
    sandbox: SandboxCluster, running_controller: Component
) -> None:
    system = names.DEFAULT_SYSTEM_NAMESPACE
    sandbox.create_pod(system, "ztunnel-test", node="node-2", labels={"app": "ztunnel"}, port=15021)
    try:
        pod = sandbox.wait_running(system, "ztunnel-test")

        def ztunnel() -> dict[str, Any] | None:
            spec = (anc(sandbox, "node-2") or {}).get("spec") or {}
            found: dict[str, Any] | None = spec.get("ztunnel")
            return found if found and found.get("ready") else None

        assert wait_for("node-2's ztunnel", ztunnel) == {
            "name": "ztunnel-test",
            "namespace": system,
            "uid": pod["metadata"]["uid"],
            "ip": pod_ip(pod),
            "ready": True,
        }
        assert "ztunnel" not in (anc(sandbox, "node-1") or {})["spec"]
        assert workloads(sandbox, "node-2", system) == []
    finally:
        sandbox.delete_pod(system, "ztunnel-test", grace=0)
    wait_for(
        "the ztunnel to leave the spec",
        lambda: "ztunnel" not in (anc(sandbox, "node-2") or {})["spec"],
    )


def test_odd_annotations_are_ignored_with_a_reason_in_the_log(
    sandbox: SandboxCluster, running_controller: Component, namespace: str
) -> None:
    sandbox.create_pod(
        namespace,
        "odd",
        node="node-1",
        command=["sleep", "3600"],
        labels=AMBIENT,
        annotations={
            "ambient.istio.io/dns-capture": "maybe",
            "istio.io/reroute-virtual-interfaces": "tun0,not/an/interface",
        },
    )
    sandbox.wait_running(namespace, "odd")
    [entry] = wait_for("odd enrolled", lambda: workloads(sandbox, "node-1", namespace))
    # One bad name drops the whole value: nothing half-applied.
    assert "rerouteVirtualInterfaces" not in entry
    assert "dnsCapture" not in entry
    log = running_controller.log_path
    wait_for(
        "a warning naming the pod and the annotation",
        lambda: (
            f"pod {namespace}/odd: ambient.istio.io/dns-capture='maybe' ignored" in log.read_text()
        ),
    )


def test_only_the_lease_holder_writes_and_a_standby_takes_over(
    sandbox: SandboxCluster, running_controller: Component, namespace: str
) -> None:
    writes = 'ambient_cni_controller_spec_writes_total{operation="patch"}'
    standby = controller(sandbox)
    standby.label = "controller-standby"
    standby.log_path = standby.log_path.with_name("controller-standby.log")
    standby.start()
    try:
        label_namespace(sandbox, namespace, "ambient")
        sandbox.create_pod(namespace, "first", node="node-1", command=["sleep", "3600"])
        wait_for(
            "first enrolled by the leader",
            lambda: names_on(sandbox, "node-1", namespace) == {"first"},
        )
        assert standby.metric(writes) == 0
        assert "waiting for lease" in standby.log_path.read_text()

        running_controller.stop()  # a clean stop releases the Lease
        sandbox.create_pod(namespace, "second", node="node-1", command=["sleep", "3600"])
        wait_for(
            "second enrolled by the standby",
            lambda: names_on(sandbox, "node-1", namespace) == {"first", "second"},
        )
        assert standby.metric(writes) >= 1
    finally:
        standby.stop()
        if running_controller.pid is None:
            running_controller.start()


def test_a_missing_lease_namespace_is_named_in_the_log(
    sandbox: SandboxCluster,
    running_controller: Component,  # the CRD is installed
) -> None:
    lost = controller(sandbox, "--lease-namespace=no-such-namespace")
    lost.label = "controller-lost"
    lost.log_path = lost.log_path.with_name("controller-lost.log")
    lost.start()
    try:
        wait_for(
            "the error naming the namespace",
            lambda: "namespace no-such-namespace does not exist" in lost.log_path.read_text(),
        )
        assert lost.metric('ambient_cni_controller_spec_writes_total{operation="patch"}') == 0
    finally:
        lost.stop()


# Last in the module: it checks everything the controller did above.
def test_the_controller_never_writes_pods_namespaces_or_nodes(
    sandbox: SandboxCluster, running_controller: Component
) -> None:
    audit = Path(sandbox.state.state_dir) / "logs" / "audit.log"
    writes = []
    for line in audit.read_text().splitlines():
        record = json.loads(line)
        if record.get("user", {}).get("username") != CONTROLLER_USER:
            continue
        resource = (record.get("objectRef") or {}).get("resource")
        if record["verb"] in ("create", "update", "patch", "delete") and resource in (
            "pods",
            "namespaces",
            "nodes",
        ):
            writes.append((record["verb"], resource, record["objectRef"].get("name")))
    assert writes == []
    for kind in ("pods", "namespaces", "nodes"):
        items = json.loads(sandbox.kubectl("get", kind, "-A", "-o", "json").stdout)["items"]
        for item in items:
            meta = item["metadata"]
            assert not [f for f in meta.get("finalizers") or [] if "kopf" in f], meta["name"]
            assert not [a for a in meta.get("annotations") or {} if "kopf" in a], meta["name"]
