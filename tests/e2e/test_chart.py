"""The README's Helm install path, run as it says on the sandbox: the image built from the
Dockerfile, `helm upgrade --install` with default values (a controller replica, the agent
DaemonSet with install-cni on every node), the chart's pods run from that image by the
sandbox's kubelets as real containers (podman with runc) with the chart's securityContext,
volumes, projected tokens and probes. No operator process is started by these tests: the
redirection, the plugin in each node's CNI chain and the node's rules are the pods' doing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from ambient_cni.api import names
from ambient_cni.kube import MERGE_PATCH, as_body, new_api_client, raw
from ambient_cni_sandbox import components, container_runtime, images
from ambient_cni_sandbox.binaries import PLUGIN_BINARY
from ambient_cni_sandbox.cluster import SandboxCluster, is_ready, pod_ip, wait_for
from ambient_cni_sandbox.cni import PRIMARY_CONFIG, agent_run_dir
from ambient_cni_sandbox.state import paths_for

from .kernel import istio_rules, probe_members

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "istio-cni"
RELEASE = "ambient"
NAMESPACE = names.DEFAULT_SYSTEM_NAMESPACE
CONTROLLER_SA = "ambient-cni-controller"
AGENT_SA = "ambient-cni-node"
AGENT_PODS = "k8s-app=istio-cni-node"
CHART_PODS = "app.kubernetes.io/name=ambient-cni"
CONTROLLER_PODS = "app=ambient-cni-controller"
NEXT_VERSION = "0.1.0.post1"  # the package version of the rebuilt image an upgrade brings

# The README's commands, run verbatim here: helm and kubectl are the sandbox's, with its
# kubeconfig; `ambient-cni` is this venv's, on the test's sandbox.
README_IMAGE = "make image"
README_INSTALL = (
    "helm upgrade --install ambient charts/istio-cni -n istio-system --create-namespace \\\n"
    "    --set image.repository=localhost/ambient-cni --set image.tag=dev"
)
README_ZTUNNEL = "ambient-cni sandbox ztunnel"
README_WAIT = (
    "kubectl wait --for=condition=Ready ambientnodeconfigs -l '!cni.ambient.dev/orphaned' "
    "--timeout=60s"
)
README_STATUS = "kubectl get ambientnodeconfigs"
README_TEST = "helm test ambient -n istio-system"
README_NEXT_IMAGE = "ambient-cni sandbox image --tag localhost/ambient-cni:next"
README_UPGRADE = (
    "helm upgrade ambient charts/istio-cni -n istio-system --reuse-values --set image.tag=next"
)
README_UNINSTALL = "helm uninstall ambient -n istio-system"


def run_readme(sandbox: SandboxCluster, command: str) -> subprocess.CompletedProcess[str]:
    tool, *args = shlex.split(command.replace("\\\n", " "))  # a shell's line continuation
    if tool == "ambient-cni":
        executable = str(Path(sys.executable).parent / tool)
        if args[:2] == ["sandbox", "ztunnel"]:
            args.append(f"--name={sandbox.name}")
    else:
        executable = str(Path(sandbox.state.bin_dir) / tool)
    return subprocess.run(
        [executable, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)},
        timeout=300,
    )


def test_the_readme_shows_the_commands_these_tests_run() -> None:
    readme = (REPO / "README.md").read_text()
    for command in (
        README_IMAGE,
        README_INSTALL,
        README_ZTUNNEL,
        README_WAIT,
        README_STATUS,
        README_TEST,
        README_NEXT_IMAGE,
        README_UPGRADE,
        README_UNINSTALL,
    ):
        assert command in readme, command
    # What `make image` runs is what the `installed` fixture runs (images.build).
    assert "image: setup\n\t$(BIN)/ambient-cni sandbox image\n" in (REPO / "Makefile").read_text()


def run_helm(sandbox: SandboxCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sandbox.state.bin_dir) / "helm"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def raw_pods(sandbox: SandboxCluster, selector: str) -> list[dict[str, Any]]:
    listed = sandbox.core.list_namespaced_pod(
        NAMESPACE, label_selector=selector, _preload_content=False
    )
    return list(raw(listed)["items"])


def agent_pods(sandbox: SandboxCluster) -> dict[str, str]:
    """The DaemonSet's pods that run: node -> pod name."""
    return {
        pod["spec"]["nodeName"]: pod["metadata"]["name"]
        for pod in raw_pods(sandbox, AGENT_PODS)
        if "deletionTimestamp" not in pod["metadata"] and is_ready(pod)
    }


def remove_from_nodes(sandbox: SandboxCluster) -> None:
    """What the chart's uninstall should have done, done again: so that a failed test leaves
    no istio-cni in a node's chain for later modules' pods (a no-op when all went well)."""
    for node in sandbox.node_names:
        components.uninstall_cni(sandbox, node)


@pytest.fixture(scope="module")
def installed(sandbox: SandboxCluster) -> Iterator[None]:
    """The README's install, on the sandbox: image, chart, ztunnel, Ready."""
    images.build(REPO)
    # Earlier modules applied crds/ with kubectl; the chart installs the CRD as its own.
    sandbox.kubectl("delete", "crd", names.CRD_NAME, "--ignore-not-found", "--wait=true")
    try:
        for command in (README_INSTALL, README_ZTUNNEL, README_TEST):
            done = run_readme(sandbox, command)
            assert done.returncode == 0, f"{command}:\n{done.stdout}{done.stderr}"
        yield
    finally:
        run_readme(sandbox, README_UNINSTALL)
        # A failed test hook's pod is the one thing an uninstall leaves.
        sandbox.kubectl("delete", "pods", "-n", NAMESPACE, "-l", CHART_PODS, "--wait=false")
        wait_for("the chart's pods gone", lambda: not sandbox_pods(sandbox), timeout=90)
        for node in sandbox.node_names:
            sandbox.delete_pod(NAMESPACE, f"ztunnel-{node}", grace=0)
        remove_from_nodes(sandbox)


def sandbox_pods(sandbox: SandboxCluster) -> list[str]:
    """The chart's pods (the test hook's included), by name."""
    return [p["metadata"]["name"] for p in raw_pods(sandbox, CHART_PODS)]


def test_helm_lint(sandbox: SandboxCluster) -> None:
    result = run_helm(sandbox, "lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_schema_accepts_every_documented_option(sandbox: SandboxCluster) -> None:
    flags = [
        "redirectMode=node",
        "backend=iptables-legacy",
        "dnsCapture=false",
        "excludeNamespaces={kube-system,monitoring}",
        "systemNamespace=ztunnel",
        "logLevel=debug",
        "image.repository=registry.example/ambient-cni",
        "image.tag=0.9.1",
        "controller.resources.limits.memory=1Gi",
        "agent.nodeSelector.pool=mesh",
        "agent.tolerations[0].key=dedicated",
        "agent.tolerations[0].operator=Exists",
        "cni.enabled=true",
        "cni.binDir=/var/lib/cni/bin",
        "cni.confDir=/etc/cni/conf.d",
        "cni.runDir=/run/istio-cni",
        "cni.excludeNamespaces={kube-system,batch}",
        "cni.chained=false",
        "cni.healthPort=9010",
        "taint.enabled=true",
        "taint.key=example.com/mesh-not-ready",
    ]
    result = run_helm(
        sandbox, "template", RELEASE, str(CHART), *(a for f in flags for a in ("--set", f))
    )
    assert result.returncode == 0, result.stderr
    for rendered in (
        "--redirect-mode=node",
        "--backend=iptables-legacy",
        "--no-dns-capture",
        "--exclude-namespaces=kube-system,monitoring",
        "--system-namespace=ztunnel",
        "--log-level=debug",
        "registry.example/ambient-cni:0.9.1",
        "pool: mesh",
        "key: dedicated",
        "- install-cni",
        "--bin-dir=/host/var/lib/cni/bin",
        "--conf-dir=/host/etc/cni/conf.d",
        "--agent-run-dir=/run/istio-cni",
        "--cni-run-dir=/run/istio-cni",
        "--exclude-namespaces=kube-system,batch",
        "--no-chained",
        "--health-port=9010",
        "--untaint-nodes",
        "--taint-key=example.com/mesh-not-ready",
    ):
        assert rendered in result.stdout, rendered


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("redirectMode=sideways", "redirectMode"),
        ("logLevel=loud", "logLevel"),
        ("backend=ebpf", "backend"),
        ("controller.replicas=-1", "replicas"),
        ("agent.zdsSocketDir=relative/dir", "zdsSocketDir"),
        ("agent.driftInterval=0", "driftInterval"),
        ("excludeNamespaces[0]=Not_A_Namespace", "excludeNamespaces"),
        ("cni.binDir=opt/cni/bin", "binDir"),
        ("cni.enabled=maybe", "enabled"),
        ("taint.key=not a key", "key"),
        ("colour=blue", "colour"),
    ],
)
def test_values_schema_refuses_bad_values_by_name(
    sandbox: SandboxCluster, flag: str, message: str
) -> None:
    result = run_helm(sandbox, "template", RELEASE, str(CHART), "--set", flag)
    assert result.returncode != 0
    assert message in result.stderr


def test_default_values_render(sandbox: SandboxCluster) -> None:
    result = run_helm(sandbox, "template", RELEASE, str(CHART), "-n", NAMESPACE)
    assert result.returncode == 0, result.stderr
    assert "kind: DaemonSet" in result.stdout
    assert "system-node-critical" in result.stdout
    assert "- install-cni" in result.stdout  # on by default
    assert "--absent" not in result.stdout
    off = run_helm(sandbox, "template", RELEASE, str(CHART), "--set", "cni.enabled=false")
    # Off, install-cni keeps istio-cni out of the node's chain, and the agent serves none.
    assert "--absent" in off.stdout
    assert "--cni-run-dir" not in off.stdout
    agent_role = next(
        doc
        for doc in yaml.safe_load_all(off.stdout)
        if doc and doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == AGENT_SA
    )
    # Without the plugin the agent has no reason to read namespaces.
    assert all("namespaces" not in rule["resources"] for rule in agent_role["rules"])


def rendered(sandbox: SandboxCluster, *flags: str) -> list[dict[str, Any]]:
    sets = [a for f in flags for a in ("--set", f)]
    result = run_helm(sandbox, "template", RELEASE, str(CHART), "-n", NAMESPACE, *sets)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_only_with_taint_enabled_may_the_controller_patch_nodes_and_it_tolerates_the_taint(
    sandbox: SandboxCluster,
) -> None:
    def controller(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == CONTROLLER_SA)

    def node_verbs(docs: list[dict[str, Any]]) -> set[str]:
        rules = controller(docs, "ClusterRole")["rules"]
        return {v for r in rules if "nodes" in r["resources"] for v in r["verbs"]}

    default = rendered(sandbox)
    assert node_verbs(default) == {"get", "list", "watch"}
    pod = controller(default, "Deployment")["spec"]["template"]["spec"]
    assert "--untaint-nodes" not in pod["containers"][0]["args"]
    assert not pod.get("tolerations")

    enabled = rendered(sandbox, "taint.enabled=true")
    assert node_verbs(enabled) == {"get", "list", "watch", "patch"}
    pod = controller(enabled, "Deployment")["spec"]["template"]["spec"]
    assert "--untaint-nodes" in pod["containers"][0]["args"]
    assert pod["tolerations"] == [{"key": names.NOT_READY_TAINT_KEY, "operator": "Exists"}]
    # The agent must run on a tainted node even when told to tolerate little else.
    narrow = rendered(
        sandbox,
        "taint.enabled=true",
        "agent.tolerations[0].key=dedicated",
        "agent.tolerations[0].operator=Exists",
    )
    agent = next(d for d in narrow if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert agent["tolerations"] == [
        {"key": "dedicated", "operator": "Exists"},
        {"key": names.NOT_READY_TAINT_KEY, "operator": "Exists"},
    ]


def main_process(sandbox: SandboxCluster, pod_uid: str, container: str) -> dict[str, str]:
    """/proc/<pid>/status of a container's first process, as the kernel sees it."""
    for cid in container_runtime.containers_of(sandbox=sandbox.name, pod_uid=pod_uid):
        shown = images.run_tool(
            "podman",
            "inspect",
            "--format",
            '{{.State.Pid}} {{index .Config.Labels "io.kubernetes.container.name"}}',
            cid,
        ).stdout
        pid, name = shown.split()
        if name == container:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            return dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    raise AssertionError(f"no container {container} of pod {pod_uid}")


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_NET_RAW = 12, 21, 13


def test_the_charts_pods_run_from_the_image_as_the_chart_says(
    sandbox: SandboxCluster, installed: None
) -> None:
    agents = raw_pods(sandbox, AGENT_PODS)
    assert sorted(p["spec"]["nodeName"] for p in agents) == sorted(sandbox.node_names)
    (controller,) = raw_pods(sandbox, CONTROLLER_PODS)
    for pod in [*agents, controller]:
        assert is_ready(pod), pod["status"]
        for status in pod["status"]["containerStatuses"]:
            assert status["image"] == images.IMAGE
    # The kernel's view of the containers' processes: the chart's users and capabilities.
    agent = main_process(sandbox, agents[0]["metadata"]["uid"], "agent")
    caps = int(agent["CapEff"], 16)
    assert agent["Uid"].split()[0] == "0"
    assert all(caps >> bit & 1 for bit in (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_NET_RAW)), hex(caps)
    installer = main_process(sandbox, agents[0]["metadata"]["uid"], "install-cni")
    assert int(installer["CapEff"], 16) == 0  # root, no capability
    ctrl = main_process(sandbox, controller["metadata"]["uid"], "controller")
    assert ctrl["Uid"].split()[0] == "65532"
    assert int(ctrl["CapEff"], 16) == 0
    assert ctrl["NoNewPrivs"].strip() == "1"  # allowPrivilegeEscalation: false
    # Their output, as `kubectl logs` shows it.
    logs = subprocess.run(
        [
            str(Path(sys.executable).parent / "ambient-cni"),
            "sandbox",
            "logs",
            f"--name={sandbox.name}",
            "-n",
            NAMESPACE,
            agents[0]["metadata"]["name"],
            "-c",
            "agent",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"agent for node {agents[0]['spec']['nodeName']}" in logs.stdout, logs.stderr
    # install-cni in each agent pod chained istio-cni into that node's own CNI config.
    for node in sandbox.node_names:
        node_cni = paths_for(sandbox.name).node_cni(node)
        conflist = json.loads((node_cni.conf_dir / PRIMARY_CONFIG).read_text())
        assert [p["type"] for p in conflist["plugins"]] == ["bridge", "istio-cni"]
        assert (node_cni.bin_dir / PLUGIN_BINARY).is_file()
        assert (agent_run_dir(node_cni) / "pluginevent.sock").exists()


def enabled(sandbox: SandboxCluster, namespace: str, name: str) -> bool:
    pod = sandbox.pod(namespace, name) or {}
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return annotations.get(names.REDIRECTION_ANNOTATION) == "enabled"


def relayed(sandbox: SandboxCluster, node: str) -> int:
    path = components.ztunnel_log(sandbox, node)
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_the_headline_scenario_with_the_charts_pods(
    sandbox: SandboxCluster, installed: None, namespace: str
) -> None:
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2")
    outside = {names.DATAPLANE_MODE_LABEL: "none"}
    sandbox.create_pod(namespace, "plain-1", node="node-1", labels=outside)
    sandbox.create_pod(namespace, "plain-2", node="node-2", labels=outside)
    client, server, plain_1, plain_2 = (
        sandbox.wait_running(namespace, name, timeout=60)
        for name in ("client", "server", "plain-1", "plain-2")
    )
    # Through the plugin in each node's chain: the rules were there before the app started.
    assert istio_rules(sandbox.pod_netns(client))
    assert istio_rules(sandbox.pod_netns(server))
    assert not istio_rules(sandbox.pod_netns(plain_1))
    wait_for(
        "both annotated", lambda: all(enabled(sandbox, namespace, n) for n in ("client", "server"))
    )

    seen = {node: relayed(sandbox, node) for node in sandbox.node_names}
    assert sandbox.http_get(client, pod_ip(server), 8080).json()["pod"] == "server"
    wait_for(
        "both nodes' ztunnels relayed it",
        lambda: all(relayed(sandbox, node) > seen[node] for node in sandbox.node_names),
    )
    seen = {node: relayed(sandbox, node) for node in sandbox.node_names}
    assert sandbox.http_get(plain_1, pod_ip(plain_2), 8080).json()["pod"] == "plain-2"
    assert {node: relayed(sandbox, node) for node in sandbox.node_names} == seen

    waited = run_readme(sandbox, README_WAIT)
    assert waited.returncode == 0, waited.stderr
    table = run_readme(sandbox, README_STATUS).stdout.splitlines()
    assert table[0].split()[:8] == [
        "NAME",
        "MODE",
        "ZTUNNEL",
        "ENROLLED",
        "SIDECARS",
        "PENDING",
        "FAILED",
        "READY",
    ]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    for node in sandbox.node_names:
        assert rows[node][1:8] == ["inpod", "true", "1", "0", "0", "0", "True"], rows[node]

    # The controller's side too: each node's spec lists its pod (the plugin alone would not).
    def in_spec(node: str) -> list[str]:
        anc = json.loads(sandbox.kubectl("get", "anc", node, "-o", "json").stdout)
        return [w["name"] for w in anc["spec"].get("workloads") or []]

    wait_for(
        "the specs list the pods",
        lambda: (in_spec("node-1"), in_spec("node-2")) == (["client"], ["server"]),
    )

    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, None)
    wait_for(
        "the rules out of both pods",
        lambda: (
            not istio_rules(sandbox.pod_netns(client))
            and not istio_rules(sandbox.pod_netns(server))
        ),
    )
    wait_for(
        "the annotations gone",
        lambda: not any(enabled(sandbox, namespace, n) for n in ("client", "server")),
    )
    seen = {node: relayed(sandbox, node) for node in sandbox.node_names}
    assert sandbox.http_get(client, pod_ip(server), 8080).json()["pod"] == "server"
    assert {node: relayed(sandbox, node) for node in sandbox.node_names} == seen


def test_helm_test_passes(sandbox: SandboxCluster, installed: None) -> None:
    tested = run_readme(sandbox, README_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert re.search(r"Phase:\s+Succeeded", tested.stdout), tested.stdout


@pytest.mark.parametrize(
    ("account", "verb", "resource", "allowed"),
    [
        (AGENT_SA, "patch", "ambientnodeconfigs", False),  # another node's spec, or its own
        (AGENT_SA, "patch", "ambientnodeconfigs/status", True),
        (AGENT_SA, "patch", "pods", False),
        (AGENT_SA, "patch", "pods/status", True),
        (AGENT_SA, "delete", "pods", False),
        (AGENT_SA, "list", "secrets", False),
        (CONTROLLER_SA, "patch", "pods", False),
        (CONTROLLER_SA, "update", "nodes", False),
        (CONTROLLER_SA, "patch", "nodes", False),  # only with taint.enabled
        (CONTROLLER_SA, "patch", "namespaces", False),
        # RBAC allows it; the admission policy holds it to orphans (tested below).
        (CONTROLLER_SA, "patch", "ambientnodeconfigs/status", True),
        (CONTROLLER_SA, "patch", "ambientnodeconfigs", True),
        (CONTROLLER_SA, "delete", "ambientnodeconfigs", True),  # orphans, after a grace period
        (CONTROLLER_SA, "delete", "pods", False),
        (CONTROLLER_SA, "create", "events", True),
    ],
)
def test_the_charts_roles_allow_no_more(
    sandbox: SandboxCluster,
    installed: None,
    account: str,
    verb: str,
    resource: str,
    allowed: bool,
) -> None:
    kind, _, subresource = resource.partition("/")
    args = [
        "auth",
        "can-i",
        verb,
        kind,
        "--all-namespaces",
        f"--as=system:serviceaccount:{NAMESPACE}:{account}",
    ]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = sandbox.kubectl(*args, check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr


def refusal(call: Callable[[], Any]) -> str:
    """The API server's message for a request it must refuse (403), with a real token."""
    with pytest.raises(ApiException) as caught:
        call()
    assert caught.value.status == 403, caught.value.body
    return str(json.loads(caught.value.body or "{}").get("message", ""))


def test_each_agent_writes_only_its_own_node_and_only_the_redirection_annotation(
    sandbox: SandboxCluster, installed: None, namespace: str
) -> None:
    # A token bound to the DaemonSet's own pod on node-1, as its kubelet hands it.
    node_1 = sandbox.pod_bound_kubeconfig(NAMESPACE, AGENT_SA, agent_pods(sandbox)["node-1"])
    pods_1 = CoreV1Api(new_api_client(node_1))
    ancs_1 = CustomObjectsApi(new_api_client(node_1))
    sandbox.create_pod(namespace, "mine", node="node-1")
    sandbox.create_pod(namespace, "theirs", node="node-2")
    sandbox.wait_running(namespace, "mine")
    sandbox.wait_running(namespace, "theirs")
    key = names.REDIRECTION_ANNOTATION

    def pod_status(api: CoreV1Api, pod: str, patch: dict[str, Any]) -> None:
        api.patch_namespaced_pod_status(
            pod, namespace, as_body(patch), _content_type=MERGE_PATCH, _preload_content=False
        )

    def anc_status(api: CustomObjectsApi, node: str) -> None:
        api.patch_cluster_custom_object_status(
            names.GROUP,
            names.VERSION,
            names.PLURAL,
            node,
            as_body({"status": {"lastSyncTime": "2026-01-01T00:00:00Z"}}),
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )

    enabled = {"metadata": {"annotations": {key: "enabled"}}}
    assert "may write pods on its own node only; theirs is on node-2" in refusal(
        lambda: pod_status(pods_1, "theirs", enabled)
    )
    for patch in (
        {"metadata": {"annotations": {"example.com/other": "x"}}},
        {"metadata": {"labels": {names.DATAPLANE_MODE_LABEL: "none"}}},
        {"status": {"podIP": "10.9.9.9"}},
    ):
        assert "only the ambient.istio.io/redirection annotation" in refusal(
            lambda patch=patch: pod_status(pods_1, "mine", patch)  # type: ignore[misc]
        )
    assert "enabled or pending only" in refusal(
        lambda: pod_status(pods_1, "mine", {"metadata": {"annotations": {key: "disabled"}}})
    )
    pod_status(pods_1, "mine", enabled)  # its own node, its one annotation: allowed
    pod_status(pods_1, "mine", {"metadata": {"annotations": {key: None}}})
    assert "its own node's AmbientNodeConfig only, not of node-2" in refusal(
        lambda: anc_status(ancs_1, "node-2")
    )
    anc_status(ancs_1, "node-1")
    # A token of the agent's account not bound to a pod on a node says nothing of its node.
    unbound = CoreV1Api(new_api_client(sandbox.service_account_kubeconfig(NAMESPACE, AGENT_SA)))
    assert "not bound to a pod on a node" in refusal(lambda: pod_status(unbound, "mine", enabled))
    # The controller writes status only to mark an orphan.
    controller = CustomObjectsApi(
        new_api_client(sandbox.service_account_kubeconfig(NAMESPACE, CONTROLLER_SA))
    )
    assert "only to mark it orphaned" in refusal(lambda: anc_status(controller, "node-1"))


def next_image_tree(tmp_path: Path) -> Path:
    """This repository's build context with the package version moved on: what a release
    of a changed tree brings, so the upgraded pods can be told apart by what they report."""
    tree = tmp_path / "next"
    tree.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    for name in ("operator", "cni-plugin"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = tree / "pyproject.toml"
    text, count = re.subn(
        r'^version = "[^"]+"$', f'version = "{NEXT_VERSION}"', pyproject.read_text(), flags=re.M
    )
    assert count == 1
    pyproject.write_text(text)
    return tree


def rollout_snapshot(sandbox: SandboxCluster) -> dict[str, str | None]:
    """Per node: the image of its Ready agent pod, None while it has none."""
    ready: dict[str, str | None] = dict.fromkeys(sandbox.node_names)
    for pod in raw_pods(sandbox, AGENT_PODS):
        if pod["metadata"].get("deletionTimestamp") is None and is_ready(pod):
            ready[pod["spec"]["nodeName"]] = pod["spec"]["containers"][0]["image"]
    return ready


def test_upgrade_to_a_rebuilt_image_rolls_the_agents_one_node_at_a_time(
    sandbox: SandboxCluster, installed: None, namespace: str, tmp_path: Path
) -> None:
    # README_NEXT_IMAGE, on a tree whose version moved on (same function, same Dockerfile).
    next_image = README_NEXT_IMAGE.split("--tag ")[1]
    images.build(next_image_tree(tmp_path), tag=next_image)
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2")
    client = sandbox.wait_running(namespace, "client", timeout=60)
    server = sandbox.wait_running(namespace, "server", timeout=60)
    wait_for(
        "both annotated", lambda: all(enabled(sandbox, namespace, n) for n in ("client", "server"))
    )

    failures: list[str] = []
    calls = [0]
    snapshots: list[dict[str, str | None]] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                answer = sandbox.http_get(client, pod_ip(server), 8080, timeout=2).json()
                if answer["pod"] != "server":
                    failures.append(f"wrong answer {answer}")
            except Exception as exc:
                failures.append(repr(exc))
            calls[0] += 1

    def watch_rollout() -> None:
        while not stop.is_set():
            snapshots.append(rollout_snapshot(sandbox))
            stop.wait(0.1)

    threads = [threading.Thread(target=f, daemon=True) for f in (keep_calling, watch_rollout)]
    for thread in threads:
        thread.start()
    try:
        upgraded = run_readme(sandbox, README_UPGRADE)
        assert upgraded.returncode == 0, upgraded.stderr
        wait_for(
            "every node's agent from the new image",
            lambda: set(rollout_snapshot(sandbox).values()) == {next_image},
            timeout=180,
        )
        start = calls[0]
        wait_for("calls after the rollout", lambda: calls[0] > start + 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert failures == [], failures[:5]
    # One node at a time: never a moment with no Ready agent on two nodes.
    assert all(sum(v is None for v in s.values()) <= 1 for s in snapshots), snapshots
    assert any(None in s.values() for s in snapshots)  # the watch saw the rollout itself

    # What runs is the new image's code: the agents and the controller say its version.
    def agent_versions() -> set[str]:
        listed = json.loads(sandbox.kubectl("get", "anc", "-o", "json").stdout)["items"]
        return {str(anc.get("status", {}).get("agentVersion")) for anc in listed}

    def controller_version() -> str | None:
        lease = sandbox.kubectl(
            "get", "lease", names.CONTROLLER_LEASE, "-n", NAMESPACE, "-o", "json"
        )
        annotations = json.loads(lease.stdout)["metadata"].get("annotations") or {}
        return annotations.get(names.CONTROLLER_VERSION_ANNOTATION)

    wait_for("the agents report the new version", lambda: agent_versions() == {NEXT_VERSION})
    wait_for("the controller's Lease says it", lambda: controller_version() == NEXT_VERSION)
    waited = run_readme(sandbox, README_WAIT)
    assert waited.returncode == 0, waited.stderr
    # The pods' rules were left in place throughout: still enrolled, no restart needed.
    assert istio_rules(sandbox.pod_netns(client))


def test_uninstall_leaves_nothing_on_the_nodes_and_keeps_the_crd(
    sandbox: SandboxCluster, installed: None
) -> None:
    chart_pods = [p["metadata"]["uid"] for p in raw_pods(sandbox, CHART_PODS)]
    assert chart_pods
    result = run_readme(sandbox, README_UNINSTALL)
    assert result.returncode == 0, result.stderr
    assert "kept due to the resource policy" in result.stdout
    wait_for("the chart's pods gone", lambda: not sandbox_pods(sandbox), timeout=90)
    for uid in chart_pods:
        assert container_runtime.containers_of(sandbox=sandbox.name, pod_uid=uid) == []
    for node in sandbox.node_names:
        node_cni = paths_for(sandbox.name).node_cni(node)
        # Nothing of istio-cni: no binary, no entry in the chain, nothing in its run dir.
        assert not (node_cni.bin_dir / PLUGIN_BINARY).exists()
        conflist = json.loads((node_cni.conf_dir / PRIMARY_CONFIG).read_text())
        assert [p["type"] for p in conflist["plugins"]] == ["bridge"]
        assert list(agent_run_dir(node_cni).iterdir()) == []
        # Nor of the agent's node side: its rules, nft tables and probe sets.
        netns = sandbox.state.topology.node(node).netns
        assert istio_rules(netns) == []
        assert probe_members(sandbox, node) == []
        sets = subprocess.run(
            ["ip", "netns", "exec", netns, "ipset", "list", "-n"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "istio" not in sets
    assert sandbox.kubectl("get", "crd", names.CRD_NAME, check=False).returncode == 0  # kept
