"""The sandbox kubelet's container runtime, the pure half: `podman run` from a pod spec."""

from __future__ import annotations

from typing import Any

import pytest

from ambient_cni_sandbox.cluster import cri_log_lines
from ambient_cni_sandbox.containerspec import (
    ContainerPlan,
    Probe,
    host_path,
    plan,
    probe,
    volume_kind,
)
from ambient_cni_sandbox.image_pods import ImagePods
from ambient_cni_sandbox.podspec import ContainerState, PodSpecError

AGENT = {
    "name": "agent",
    "image": "localhost/ambient-cni:dev",
    "args": ["agent", "--proc=/host/proc"],
    "env": [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "LEVEL", "value": "info"},
    ],
    "ports": [{"name": "health", "containerPort": 8000}],
    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 10},
    "securityContext": {
        "runAsUser": 0,
        "privileged": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]},
    },
    "volumeMounts": [
        {"name": "host-proc", "mountPath": "/host/proc", "readOnly": True},
        {"name": "netns", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
    ],
}


def pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "agent-x", "namespace": "istio-system", "uid": "u-1"},
        "spec": {"nodeName": "node-1", "containers": [container], **spec},
    }


def plan_of(container: dict[str, Any], image_user: str = "65532", **spec: Any) -> ContainerPlan:
    return plan(
        pod(container, **spec),
        container,
        name="k8s_agent",
        netns_path="/run/netns/node-1",
        pod_ips=("10.0.0.1",),
        host_ips=("172.18.0.11",),
        volume_dirs={"host-proc": "/proc", "netns": "/var/run/netns"},
        image_user=image_user,
        log_path="/logs/agent.log",
    )


def run_args(container: dict[str, Any], image_user: str = "65532", **spec: Any) -> list[str]:
    return list(plan_of(container, image_user, **spec).run_args)


def test_the_agents_container_as_the_chart_asks() -> None:
    args = run_args(AGENT, hostNetwork=True)
    assert "--network=ns:/run/netns/node-1" in args
    assert "--user=0" in args
    assert args.index("--cap-drop=all") < args.index("--cap-add=NET_ADMIN")
    assert "--cap-add=SYS_ADMIN" in args
    assert "--privileged" not in args
    assert "--env=NODE_NAME=node-1" in args
    assert "--env=LEVEL=info" in args
    assert "--volume=/proc:/host/proc:ro" in args
    assert "--volume=/var/run/netns:/var/run/netns:rw,rslave" in args
    assert not any(a.startswith("--hostname") for a in args)  # the node's, with its network
    # The image's entrypoint stays; the container's args follow the image.
    assert args[-3:] == ["localhost/ambient-cni:dev", "agent", "--proc=/host/proc"]


def test_command_replaces_the_entrypoint_and_read_only_means_all_of_it() -> None:
    container = {
        "name": "c",
        "image": "img",
        "command": ["sh", "-c"],
        "args": ["id"],
        "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
    }
    args = run_args(container)
    assert '--entrypoint=["sh", "-c"]' in args
    assert args[-2:] == ["img", "id"]
    assert "--read-only" in args
    assert "--read-only-tmpfs=false" in args
    assert "--security-opt=no-new-privileges" in args
    assert "--hostname=agent-x" in args


def test_pod_level_user_applies_and_run_as_non_root_is_checked() -> None:
    container = {"name": "c", "image": "img"}
    assert "--user=1000:2000" in run_args(
        container, securityContext={"runAsUser": 1000, "runAsGroup": 2000}
    )
    with pytest.raises(PodSpecError, match="runAsNonRoot and image will run as root"):
        run_args(container, image_user="", securityContext={"runAsNonRoot": True})
    assert "--user=0" not in run_args(container, securityContext={"runAsNonRoot": True})


def test_privileged_needs_no_capability_list() -> None:
    container = {**AGENT, "securityContext": {"privileged": True, "capabilities": {"add": ["X"]}}}
    args = run_args(container)
    assert "--privileged" in args
    assert not any(a.startswith("--cap-") for a in args)


def test_probes_take_kubernetes_defaults_and_named_ports() -> None:
    assert probe(AGENT, "livenessProbe") == Probe(kind="http", port=8000, path="/healthz")
    assert probe({"readinessProbe": {"tcpSocket": {"port": 80}}}, "readinessProbe") == Probe(
        kind="tcp", port=80
    )
    exec_probe = probe({"readinessProbe": {"exec": {"command": ["true"]}}}, "readinessProbe")
    assert exec_probe is not None
    assert (exec_probe.kind, exec_probe.command) == ("exec", ("true",))
    with pytest.raises(PodSpecError, match="names no port"):
        probe({"livenessProbe": {"httpGet": {"port": "nope"}}}, "livenessProbe")


def test_a_mount_of_a_missing_volume_and_an_unknown_kind_are_the_pods_error() -> None:
    with pytest.raises(PodSpecError, match="names no volume"):
        run_args({"name": "c", "image": "i", "volumeMounts": [{"name": "x", "mountPath": "/x"}]})
    with pytest.raises(PodSpecError, match="makes only"):
        volume_kind({"name": "v", "nfs": {}})


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/proc", "/proc"),
        ("/proc/1/ns", "/proc/1/ns"),
        ("/var/run/netns", "/var/run/netns"),
        ("/etc/cni/net.d", "/sb/cni/node-1/conf"),
        ("/opt/cni/bin/", "/sb/cni/node-1/bin"),
        ("/var/run/ztunnel", "/sb/ztunnel/node-1"),
        ("/var/run/istio-cni", "/sb/nodes/node-1/var/run/istio-cni"),
        ("/etc/cni/net.d.bak", "/sb/nodes/node-1/etc/cni/net.d.bak"),
    ],
)
def test_host_paths_are_the_nodes_own_but_proc_and_netns(path: str, expected: str) -> None:
    special = {
        "/etc/cni/net.d": "/sb/cni/node-1/conf",
        "/opt/cni/bin": "/sb/cni/node-1/bin",
        "/var/run/ztunnel": "/sb/ztunnel/node-1",
    }
    assert host_path(path, "/sb/nodes/node-1", special) == expected


def test_a_cri_log_reads_as_its_lines_partial_entries_joined() -> None:
    text = (
        "2026-11-26T03:17:46.5+00:00 stdout F 1: lo inet 127.0.0.1/8\n"
        "2026-11-26T03:17:46.6+00:00 stdout P WHOAMI system:service\n"
        "2026-11-26T03:17:46.6+00:00 stdout F account:ns:default node-2\n"
        "2026-11-26T03:17:46.7+00:00 stderr F \n"
    )
    assert cri_log_lines(text) == [
        "1: lo inet 127.0.0.1/8",
        "WHOAMI system:serviceaccount:ns:default node-2",
        "",
    ]


def test_until_its_startup_probe_succeeds_a_container_gets_no_liveness_verdict() -> None:
    startup = Probe(kind="http", port=8081, failure_threshold=2)
    liveness = Probe(kind="http", port=8081, failure_threshold=1)
    state = ContainerState(name="c", image="i", started=False)
    restart: list[str] = []
    # The scheduler asks only the startup probe while not started: a failure of it counts
    # against its own threshold, not liveness's.
    ImagePods._note(state, "startup", startup, False, restart)
    assert (state.started, restart) == (False, [])
    ImagePods._note(state, "startup", startup, True, restart)
    assert state.started
    ImagePods._note(state, "liveness", liveness, False, restart)
    assert restart == ["c"]
    never = ContainerState(name="d", image="i", started=False)
    for _ in range(2):
        ImagePods._note(never, "startup", startup, False, restart)
    assert restart == ["c", "d"]  # never started within its threshold: restarted


def test_the_plan_carries_the_startup_probe() -> None:
    container = {**AGENT, "startupProbe": {"httpGet": {"path": "/healthz", "port": "health"}}}
    assert plan_of(container).startup == Probe(kind="http", port=8000, path="/healthz")


def test_a_host_pid_pod_runs_in_the_machines_pid_namespace() -> None:
    assert "--pid=host" in run_args(AGENT, hostPID=True, hostNetwork=True)
    assert "--pid=host" not in run_args(AGENT, hostNetwork=True)
