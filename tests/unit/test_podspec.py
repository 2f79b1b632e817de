from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ambient_cni_sandbox.podspec import (
    PodRuntime,
    PodSpecError,
    container_run,
    grace_seconds,
    readiness_port,
    render_status,
    restart_on_exit,
)

GOLDEN = Path(__file__).parent / "golden"


def pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
        "spec": {"nodeName": "node-1", "containers": [container], **spec},
    }


def run(p: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, str], int]:
    result = container_run(p, pod_ip="10.244.0.2", host_ip="172.18.0.11", python="py")
    return result.argv, dict(result.env), result.port


@pytest.mark.parametrize(
    ("container", "argv", "port"),
    [
        ({}, ("py", "-m", "ambient_cni_sandbox.echo", "--port", "8080"), 8080),
        (
            {"ports": [{"containerPort": 9000, "protocol": "UDP"}, {"containerPort": 80}]},
            ("py", "-m", "ambient_cni_sandbox.echo", "--port", "80"),
            80,
        ),
        (
            {"args": ["--verbose"]},
            ("py", "-m", "ambient_cni_sandbox.echo", "--port", "8080", "--verbose"),
            8080,
        ),
        ({"command": ["sleep"], "args": [3600]}, ("sleep", "3600"), 8080),
    ],
)
def test_argv_and_port(container: dict[str, Any], argv: tuple[str, ...], port: int) -> None:
    got_argv, _, got_port = run(pod(container))
    assert (got_argv, got_port) == (argv, port)


def test_env_values_and_field_refs() -> None:
    container = {
        "env": [
            {"name": "PLAIN", "value": "x"},
            {"name": "EMPTY"},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        ]
    }
    _, env, _ = run(pod(container))
    assert env == {
        "HOSTNAME": "web",
        "PLAIN": "x",
        "EMPTY": "",
        "IP": "10.244.0.2",
        "NODE": "node-1",
        "SA": "default",
        "HOST": "172.18.0.11",
    }


def test_dual_stack_field_refs_list_every_family() -> None:
    container = {
        "env": [
            {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            for name, path in (
                ("IP", "status.podIP"),
                ("IPS", "status.podIPs"),
                ("HOST", "status.hostIP"),
                ("HOSTS", "status.hostIPs"),
            )
        ]
    }
    result = container_run(
        pod(container),
        pod_ip="10.244.0.2",
        host_ip="172.18.0.11",
        python="py",
        pod_ips=("10.244.0.2", "fd00:10:244::2"),
        host_ips=("172.18.0.11", "fd00:172:18::11"),
    )
    env = dict(result.env)
    assert (env["IP"], env["IPS"]) == ("10.244.0.2", "10.244.0.2,fd00:10:244::2")
    assert (env["HOST"], env["HOSTS"]) == ("172.18.0.11", "172.18.0.11,fd00:172:18::11")
    # Without the plural values the plural fields hold the single one.
    _, single, _ = run(pod(container))
    assert (single["IPS"], single["HOSTS"]) == ("10.244.0.2", "172.18.0.11")


def test_a_dual_stack_pod_reports_every_address_its_first_as_pod_ip() -> None:
    runtime = RUNTIMES["running"].model_copy(
        update={
            "pod_ips": ("10.244.0.2", "fd00:10:244::2"),
            "host_ips": ("172.18.0.11", "fd00:172:18::11"),
        }
    )
    status = render_status(runtime)
    assert (status["podIP"], status["podIPs"]) == (
        "10.244.0.2",
        [{"ip": "10.244.0.2"}, {"ip": "fd00:10:244::2"}],
    )
    assert (status["hostIP"], status["hostIPs"]) == (
        "172.18.0.11",
        [{"ip": "172.18.0.11"}, {"ip": "fd00:172:18::11"}],
    )


@pytest.mark.parametrize(
    ("p", "match"),
    [
        ({"metadata": {"name": "x"}, "spec": {"containers": []}}, "no containers"),
        (
            pod({"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
            "env S",
        ),
        (
            pod(
                {
                    "env": [
                        {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}
                    ]
                }
            ),
            "env L",
        ),
    ],
)
def test_unrunnable_specs_give_a_kubelet_reason(p: dict[str, Any], match: str) -> None:
    with pytest.raises(PodSpecError, match=match) as caught:
        run(p)
    assert caught.value.reason == "CreateContainerConfigError"


@pytest.mark.parametrize(
    ("policy", "exit_code", "restart"),
    [
        (None, 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 2, True),
        ("Never", 1, False),
    ],
)
def test_restart_policy(policy: str | None, exit_code: int, restart: bool) -> None:
    spec = {"restartPolicy": policy} if policy else {}
    assert restart_on_exit(pod({}, **spec), exit_code) is restart


@pytest.mark.parametrize(
    ("container", "port"),
    [
        ({}, 8080),  # the echo image: ready once it serves
        ({"ports": [{"containerPort": 9090}]}, 9090),
        ({"command": ["sleep", "1000"]}, None),  # a custom command without a probe: on start
        ({"command": ["x"], "readinessProbe": {"tcpSocket": {"port": 15021}}}, 15021),
        ({"command": ["x"], "readinessProbe": {"httpGet": {"path": "/", "port": 80}}}, 80),
        ({"command": ["x"], "readinessProbe": {"httpGet": {"port": "http"}}}, None),
    ],
)
def test_readiness_port(container: dict[str, Any], port: int | None) -> None:
    assert readiness_port(pod(container)) == port


def test_grace_prefers_the_deletion_grace_period() -> None:
    p = pod({}, terminationGracePeriodSeconds=10)
    assert grace_seconds(p) == 10
    p["metadata"]["deletionGracePeriodSeconds"] = 0
    assert grace_seconds(p) == 0
    assert grace_seconds(pod({})) == 30


RUNTIMES = {
    "running": PodRuntime(
        phase="Running",
        pod_ip="10.244.0.2",
        host_ip="172.18.0.11",
        start_time="2026-01-01T00:00:00Z",
        container="main",
        image="echo",
        state="running",
        started_at="2026-01-01T00:00:01Z",
        pid=4242,
        ready=True,
        ready_since="2026-01-01T00:00:01Z",
    ),
    "start_failed": PodRuntime(
        phase="Failed",
        pod_ip="10.244.0.3",
        host_ip="172.18.0.11",
        start_time="2026-01-01T00:00:00Z",
        state="terminated",
        state_reason="StartError",
        state_message="exec: /nope: no such file or directory",
        exit_code=128,
        finished_at="2026-01-01T00:00:01Z",
        pod_reason="StartError",
        pod_message="exec: /nope: no such file or directory",
    ),
    "started_not_ready": PodRuntime(
        phase="Running",
        pod_ip="10.244.0.4",
        host_ip="172.18.0.11",
        start_time="2026-01-01T00:00:00Z",
        state="running",
        started_at="2026-01-01T00:00:01Z",
        pid=4243,
    ),
    "pending": PodRuntime(host_ip="172.18.0.11", start_time="2026-01-01T00:00:00Z"),
}


@pytest.mark.parametrize("case", sorted(RUNTIMES))
def test_render_status_golden(case: str) -> None:
    rendered = json.dumps(render_status(RUNTIMES[case]), indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / f"pod_status_{case}.json"
    assert rendered == golden.read_text(), f"update {golden} if this change is intended"
