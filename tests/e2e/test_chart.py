"""The Helm chart on the sandbox's real API server, driven by pyhelm3.

The sandbox's kubelet runs commands, not images, so the chart is installed
with no controller replica and an agent node selector that matches no node;
the controller and the agents then run as sandbox processes with the bearer
tokens of the chart's own ServiceAccounts. That proves the chart's RBAC, not
admin's, does the whole job.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
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
from pyhelm3 import Client

from ambient_cni.api import names
from ambient_cni.kube import MERGE_PATCH, as_body, new_api_client
from ambient_cni_sandbox import components
from ambient_cni_sandbox.binaries import PLUGIN_BINARY
from ambient_cni_sandbox.cluster import SandboxCluster, pod_ip, wait_for
from ambient_cni_sandbox.cni import PRIMARY_CONFIG
from ambient_cni_sandbox.components import Mesh

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "istio-cni"
RELEASE = "ambient"
NAMESPACE = names.DEFAULT_SYSTEM_NAMESPACE
CONTROLLER_SA = "ambient-cni-controller"
AGENT_SA = "ambient-cni-node"
SANDBOX_VALUES: dict[str, Any] = {
    "controller": {"replicas": 0},
    "agent": {"nodeSelector": {"ambient-cni.dev/runs-images": "true"}, "driftInterval": 2},
}


# The README's commands, run verbatim here (helm and kubectl from the sandbox, its kubeconfig).
README_STATUS = "kubectl get ambientnodeconfigs"
README_WAIT = (
    "kubectl wait --for=condition=Ready ambientnodeconfigs -l '!cni.ambient.dev/orphaned' "
    "--timeout=60s"
)
README_UPGRADE = "helm upgrade ambient charts/istio-cni -n istio-system --reuse-values"
README_UNINSTALL = "helm uninstall ambient -n istio-system"


def run_readme(sandbox: SandboxCluster, command: str) -> subprocess.CompletedProcess[str]:
    tool, *args = shlex.split(command)
    return subprocess.run(
        [str(Path(sandbox.state.bin_dir) / tool), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)},
    )


def test_the_readme_shows_the_commands_these_tests_run() -> None:
    readme = (REPO / "README.md").read_text()
    for command in (README_STATUS, README_WAIT, README_UPGRADE, README_UNINSTALL):
        assert command in readme, command


def helm(sandbox: SandboxCluster) -> Client:
    return Client(
        executable=str(Path(sandbox.state.bin_dir) / "helm"), kubeconfig=sandbox.kubeconfig
    )


def install(sandbox: SandboxCluster, values: dict[str, Any]) -> None:
    client = helm(sandbox)

    async def go() -> None:
        chart = await client.get_chart(CHART)
        # take_ownership: earlier tests applied crds/ with kubectl.
        await client.install_or_upgrade_release(
            RELEASE, chart, values, namespace=NAMESPACE, take_ownership=True, wait=False
        )

    asyncio.run(go())


def run_helm(sandbox: SandboxCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sandbox.state.bin_dir) / "helm"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


class Installed:
    def __init__(self, sandbox: SandboxCluster):
        self.sandbox = sandbox
        self.mesh: Mesh | None = None


@pytest.fixture(scope="module")
def installed(sandbox: SandboxCluster) -> Iterator[Installed]:
    install(sandbox, SANDBOX_VALUES)
    state = Installed(sandbox)
    state.mesh = Mesh(
        sandbox,
        "--drift-interval=2",
        f"--daemonset={NAMESPACE}/{AGENT_SA}",
        controller_kubeconfig=sandbox.service_account_kubeconfig(NAMESPACE, CONTROLLER_SA),
        # Tokens bound to a pod on each node, as the DaemonSet's pods get them.
        agent_kubeconfig=components.agent_pods(sandbox, NAMESPACE, AGENT_SA),
        install_crds=False,
        cni=True,  # install-cni too, with the same tokens and --daemonset
    )
    state.mesh.start()
    try:
        yield state
    finally:
        state.mesh.stop()
        components.remove_agent_pods(sandbox, NAMESPACE, AGENT_SA)
        run_readme(sandbox, README_UNINSTALL)


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


def test_install_is_accepted_by_the_api_server(
    sandbox: SandboxCluster, installed: Installed
) -> None:
    for kind, name in [
        ("daemonset", AGENT_SA),
        ("deployment", CONTROLLER_SA),
        ("serviceaccount", AGENT_SA),
        ("serviceaccount", CONTROLLER_SA),
        ("role", AGENT_SA),
        ("role", CONTROLLER_SA),
    ]:
        assert sandbox.kubectl("get", kind, name, "-n", NAMESPACE, check=False).returncode == 0, (
            kind,
            name,
        )
    for kind, name in [
        ("clusterrole", AGENT_SA),
        ("clusterrole", CONTROLLER_SA),
        ("crd", names.CRD_NAME),
    ]:
        assert sandbox.kubectl("get", kind, name, check=False).returncode == 0, (kind, name)


def test_the_charts_service_accounts_do_the_whole_job(
    sandbox: SandboxCluster, installed: Installed, namespace: str
) -> None:
    mesh = installed.mesh
    assert mesh is not None
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2")
    client, server = (
        sandbox.wait_running(namespace, "client"),
        sandbox.wait_running(namespace, "server"),
    )
    sandbox.core.patch_namespace(
        namespace,
        as_body({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}),
        _content_type=MERGE_PATCH,
    )

    def enabled(name: str) -> bool:
        pod = sandbox.pod(namespace, name) or {}
        return (pod["metadata"].get("annotations") or {}).get(
            names.REDIRECTION_ANNOTATION
        ) == "enabled"

    wait_for("both enabled", lambda: enabled("client") and enabled("server"))
    seen = len(mesh.connections("node-1"))
    assert sandbox.http_get(client, pod_ip(server), 8080).json()["pod"] == "server"
    wait_for("node-1's ztunnel relayed it", lambda: len(mesh.connections("node-1")) > seen)

    waited = run_readme(sandbox, README_WAIT)
    assert waited.returncode == 0, waited.stderr
    table = run_readme(sandbox, README_STATUS).stdout.splitlines()
    assert table[0].split()[:7] == [
        "NAME",
        "MODE",
        "ZTUNNEL",
        "ENROLLED",
        "SIDECARS",
        "PENDING",
        "FAILED",
    ]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["node-1"][1:8] == ["inpod", "true", "1", "0", "0", "0", "True"]
    assert rows["node-2"][1:8] == ["inpod", "true", "1", "0", "0", "0", "True"]

    # The helm test hook's command, with the hook pod's ServiceAccount.
    ready = subprocess.run(
        [
            sys.executable,
            "-m",
            "ambient_cni.cli",
            "check-ready",
            "--timeout=60",
            f"--kubeconfig={sandbox.service_account_kubeconfig(NAMESPACE, CONTROLLER_SA)}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "Ready" in ready.stdout


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
    installed: Installed,
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
    sandbox: SandboxCluster, installed: Installed, namespace: str
) -> None:
    tokens = components.agent_pods(sandbox, NAMESPACE, AGENT_SA)
    pods_1 = CoreV1Api(new_api_client(tokens["node-1"]))
    ancs_1 = CustomObjectsApi(new_api_client(tokens["node-1"]))
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


def test_upgrade_restarts_agents_without_interrupting_traffic(
    sandbox: SandboxCluster, installed: Installed, namespace: str
) -> None:
    mesh = installed.mesh
    assert mesh is not None
    sandbox.core.patch_namespace(
        namespace,
        as_body({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}),
        _content_type=MERGE_PATCH,
    )
    sandbox.create_pod(namespace, "client", node="node-1")
    sandbox.create_pod(namespace, "server", node="node-2")
    client, server = (
        sandbox.wait_running(namespace, "client"),
        sandbox.wait_running(namespace, "server"),
    )
    wait_for(
        "both enabled",
        lambda: all(
            ((sandbox.pod(namespace, n) or {})["metadata"].get("annotations") or {}).get(
                names.REDIRECTION_ANNOTATION
            )
            == "enabled"
            for n in ("client", "server")
        ),
    )
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                if (
                    sandbox.http_get(client, pod_ip(server), 8080, timeout=2).json()["pod"]
                    != "server"
                ):
                    failures.append("wrong answer")
            except Exception as exc:
                failures.append(repr(exc))
            calls[0] += 1

    caller = threading.Thread(target=keep_calling, daemon=True)
    caller.start()
    try:
        upgraded = run_readme(sandbox, README_UPGRADE)
        assert upgraded.returncode == 0, upgraded.stderr
        for agent in mesh.agents.values():  # the DaemonSet's rolling update, one node at a time
            agent.restart()
        start = calls[0]
        wait_for("more calls after the restarts", lambda: calls[0] > start + 20)
    finally:
        stop.set()
        caller.join(timeout=10)
    assert failures == []
    revision = run_helm(
        sandbox, "status", RELEASE, "-n", NAMESPACE, "--kubeconfig", str(sandbox.kubeconfig)
    )
    assert "REVISION: 2" in revision.stdout


def test_uninstall_removes_host_rules_and_ipsets_and_keeps_the_crd(
    sandbox: SandboxCluster, installed: Installed
) -> None:
    mesh = installed.mesh
    assert mesh is not None
    result = run_readme(sandbox, README_UNINSTALL)
    assert result.returncode == 0, result.stderr
    wait_for(
        "the DaemonSet gone",
        lambda: (
            sandbox.kubectl("get", "ds", AGENT_SA, "-n", NAMESPACE, check=False).returncode != 0
        ),
    )
    for node, agent in mesh.agents.items():
        # What the DaemonSet's deletion does to its pods' containers. By SIGTERM their Role
        # is gone too: they must have watched the deletion.
        agent.stop()
        assert "its deletion was watched" in agent.log_path.read_text()
        installer = mesh.installers[node]
        installer.stop()
        assert "its deletion was watched" in installer.log_path.read_text()
        # Nothing of istio-cni is left on the node: no binary, no entry in its chain.
        node_cni = mesh.node_cni[node]
        assert not (node_cni.bin_dir / PLUGIN_BINARY).exists()
        conflist = json.loads((node_cni.conf_dir / PRIMARY_CONFIG).read_text())
        assert [p["type"] for p in conflist["plugins"]] == ["bridge"]
    for node in sandbox.node_names:
        netns = sandbox.state.topology.node(node).netns
        saved = subprocess.run(
            ["ip", "netns", "exec", netns, "iptables-save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "ISTIO_POSTRT" not in saved
        sets = subprocess.run(
            ["ip", "netns", "exec", netns, "ipset", "list", "-n"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "istio-inpod-probes" not in sets
    assert sandbox.kubectl("get", "crd", names.CRD_NAME, check=False).returncode == 0  # kept
