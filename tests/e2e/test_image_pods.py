"""The sandbox kubelet runs a pod whose image the local store holds as real containers
(podman with runc), as a kubelet with a CRI runtime would: every container, in the pod's
network namespace or the node's, with its securityContext, env and fieldRefs, volumes
(configMap, secret, emptyDir, hostPath rooted per node, the projected service-account
token), its probes, and its logs."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from kubernetes.client import CoreV1Api

from ambient_cni.kube import as_body
from ambient_cni_sandbox import container_runtime, images
from ambient_cni_sandbox.cluster import SandboxCluster, is_ready, wait_for
from ambient_cni_sandbox.state import paths_for

REPO = Path(__file__).resolve().parents[2]
IMAGE = images.IMAGE

# In-cluster, as a pod's client finds the API server: KUBERNETES_SERVICE_HOST/PORT, the
# projected token and CA. The API server says who it takes the caller for.
WHOAMI = """
from kubernetes import client, config
config.load_incluster_config()
review = client.AuthenticationV1Api().create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
)
user = review.status.user_info
print("WHOAMI", user.username, *(user.extra or {}).get("authentication.kubernetes.io/node-name"))
"""

# What the main container reports, then serves its readiness on.
REPORT = (
    f"WHOAMI = {WHOAMI!r}\n"
    + """
import json, os, pathlib, subprocess, http.server
def attempt(path):
    try:
        pathlib.Path(path).write_text("x")
        return "written"
    except OSError as exc:
        return type(exc).__name__
sa = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
report = {
    "ids": [os.getuid(), os.getgid()],
    "node": os.environ.get("MY_NODE"),
    "ip": os.environ.get("MY_IP"),
    "config": pathlib.Path("/cfg/greeting").read_text(),
    "secret": pathlib.Path("/sec/password").read_text(),
    "token": (sa / "token").read_text(),
    "namespace": (sa / "namespace").read_text(),
    "ca": (sa / "ca.crt").read_text().startswith("-----BEGIN CERTIFICATE"),
    "root": attempt("/etc/written"),
    "scratch": attempt("/scratch/written"),
    "addresses": subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout,
    "whoami": subprocess.run(["python", "-c", WHOAMI], capture_output=True, text=True).stdout,
}
print("REPORT " + json.dumps(report), flush=True)
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("", 8080), Ready).serve_forever()
"""
)


def create(cluster: SandboxCluster, namespace: str, body: dict[str, Any]) -> None:
    CoreV1Api(cluster.api).create_namespaced_pod(namespace, as_body(body), _preload_content=False)


def test_a_pod_of_a_local_image_runs_as_containers_with_what_its_spec_says(
    sandbox: SandboxCluster, namespace: str
) -> None:
    images.build(REPO)
    core = CoreV1Api(sandbox.api)
    core.create_namespaced_config_map(
        namespace,
        as_body({"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}}),
        _preload_content=False,
    )
    secret = base64.b64encode(b"s3cret").decode()
    core.create_namespaced_secret(
        namespace,
        as_body({"metadata": {"name": "sec"}, "data": {"password": secret}}),
        _preload_content=False,
    )
    field = {"fieldRef": {"fieldPath": "spec.nodeName"}}
    create(
        sandbox,
        namespace,
        {
            "metadata": {"name": "app"},
            "spec": {
                "nodeName": "node-1",
                "terminationGracePeriodSeconds": 2,
                "securityContext": {"runAsUser": 1000, "runAsGroup": 3000},
                "containers": [
                    {
                        "name": "main",
                        "image": IMAGE,
                        "command": ["python", "-c", REPORT],
                        "env": [
                            {"name": "MY_NODE", "valueFrom": field},
                            {
                                "name": "MY_IP",
                                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                            },
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/ready", "port": "http"},
                            "periodSeconds": 1,
                        },
                        "securityContext": {
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "cfg", "mountPath": "/cfg", "readOnly": True},
                            {"name": "sec", "mountPath": "/sec", "readOnly": True},
                            {"name": "scratch", "mountPath": "/scratch"},
                        ],
                    },
                    {
                        # Alive while /tmp/alive exists: removing it gets it restarted.
                        "name": "second",
                        "image": IMAGE,
                        "command": ["sh", "-c", "touch /tmp/alive && exec sleep 3600"],
                        "livenessProbe": {
                            "exec": {"command": ["test", "-f", "/tmp/alive"]},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    },
                ],
                "volumes": [
                    {"name": "cfg", "configMap": {"name": "cfg"}},
                    {"name": "sec", "secret": {"secretName": "sec"}},
                    {"name": "scratch", "emptyDir": {}},
                ],
            },
        },
    )
    pod = sandbox.wait_pod(
        namespace, "app", is_ready, "to be Ready (its readiness probe)", timeout=60
    )
    statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert sorted(statuses) == ["main", "second"]
    assert all(c["ready"] and c["containerID"].startswith("podman://") for c in statuses.values())

    line = wait_for(
        "the report in main's log",
        lambda: next(
            (x for x in sandbox.container_log(pod, "main") if x.startswith("REPORT ")), None
        ),
    )
    report = json.loads(line.removeprefix("REPORT "))
    pod_ip = pod["status"]["podIP"]
    assert report["ids"] == [1000, 3000]
    assert (report["node"], report["ip"]) == ("node-1", pod_ip)
    assert (report["config"], report["secret"]) == ("hello", "s3cret")
    assert (report["root"], report["scratch"]) == ("OSError", "written")
    assert f"inet {pod_ip}/" in report["addresses"]  # the pod's own network namespace
    assert report["namespace"] == namespace
    assert report["whoami"].split() == [
        "WHOAMI",
        f"system:serviceaccount:{namespace}:default",
        "node-1",
    ]
    assert report["ca"] is True
    claims = json.loads(base64.urlsafe_b64decode(report["token"].split(".")[1] + "=="))
    bound = claims["kubernetes.io"]
    assert (bound["pod"]["name"], bound["node"]["name"]) == ("app", "node-1")

    # Liveness: the second container loses its file, fails, and is started again.
    second = statuses["second"]["containerID"].removeprefix("podman://")
    assert container_runtime.execute(second, ["rm", "/tmp/alive"], timeout=10) == 0
    wait_for(
        "second to be restarted by its liveness probe",
        lambda: any(
            c["name"] == "second" and c["restartCount"] >= 1 and c["ready"]
            for c in (sandbox.pod(namespace, "app") or {})
            .get("status", {})
            .get("containerStatuses", [])
        ),
        timeout=30,
    )

    uid = pod["metadata"]["uid"]
    sandbox.delete_pod(namespace, "app")
    sandbox.wait_pod_gone(namespace, "app", timeout=60)
    wait_for(
        "its containers to be removed",
        lambda: container_runtime.containers_of(sandbox=sandbox.name, pod_uid=uid) == [],
    )
    assert not (paths_for(sandbox.name).pods_dir("node-1") / uid).exists()


def test_a_host_network_pod_runs_in_the_nodes_namespace_and_its_host_path_is_the_nodes(
    sandbox: SandboxCluster, namespace: str
) -> None:
    images.build(REPO)
    create(
        sandbox,
        namespace,
        {
            "metadata": {"name": "on-node"},
            "spec": {
                "nodeName": "node-2",
                "hostNetwork": True,
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": IMAGE,
                        "command": [
                            "sh",
                            "-c",
                            'ip -o addr && echo here > /data/marker && python -c "$WHOAMI"',
                        ],
                        "env": [{"name": "WHOAMI", "value": WHOAMI}],
                        "securityContext": {"runAsUser": 0},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
                "volumes": [
                    {
                        "name": "data",
                        "hostPath": {"path": "/var/lib/acni-e2e", "type": "DirectoryOrCreate"},
                    }
                ],
            },
        },
    )
    pod = sandbox.wait_pod(
        namespace,
        "on-node",
        lambda p: p.get("status", {}).get("phase") == "Succeeded",
        "to succeed",
        timeout=60,
    )
    node_ip = pod["status"]["hostIP"]
    # From the node's namespace too, the API server answers, and names the pod's node (the
    # log's last line may land just after the exit is seen: read until it is there).
    said = f"WHOAMI system:serviceaccount:{namespace}:default node-2"

    def logged() -> list[str] | None:
        lines = sandbox.container_log(pod, "main")
        return lines if said in lines else None

    try:
        lines = wait_for("main's whole log", logged)
    except AssertionError:
        lines = sandbox.container_log(pod, "main")
        container = pod["status"]["containerStatuses"][0]["state"]["terminated"]["containerID"]
        shown = images.run_tool("podman", "logs", container.removeprefix("podman://"), check=False)
        lines.append(f"(podman logs says: {shown.stdout!r} {shown.stderr!r})")
    assert said in lines
    assert any(f"inet {node_ip}/" in line for line in lines)
    # The node's own /var/lib: under its root in the sandbox, not the machine's, not node-1's.
    nodes = Path(sandbox.state.state_dir) / "nodes"
    assert (nodes / "node-2" / "root/var/lib/acni-e2e/marker").read_text() == "here\n"
    assert not (nodes / "node-1" / "root/var/lib/acni-e2e").exists()
    assert not Path("/var/lib/acni-e2e").exists()
