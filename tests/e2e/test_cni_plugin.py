"""The istio-cni plugin binary as a container runtime runs it: environment, config on
stdin, result or error on stdout, exit code. No agent answers here, so these are the
paths that must not need one, and the error a pod gets when the agent is not there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ambient_cni_sandbox.binaries import PLUGIN_BINARY, cni_binaries_dir

PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/x"}],
    "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 2}],
}


def plugin(command: str, config: dict[str, Any], pod: tuple[str, str] = ("shop", "web")):  # type: ignore[no-untyped-def]
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "0b8f7c1e",
        "CNI_NETNS": "/run/netns/not-a-real-one",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};"
        "K8S_POD_UID=u-1",
        "PATH": os.environ.get("PATH", ""),
    }
    return subprocess.run(
        [str(cni_binaries_dir(build=False) / PLUGIN_BINARY)],
        input=json.dumps(config),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "simnet",
        "type": "istio-cni",
        "cni_agent_run_dir": str(tmp_path / "no-agent-here"),
        "exclude_namespaces": ["kube-system"],
        "agent_timeout_seconds": 2,
        "prevResult": PREV_RESULT,
    }


def test_version_lists_every_spec_version() -> None:
    done = plugin("VERSION", {"cniVersion": "1.0.0"})
    assert done.returncode == 0
    assert "1.1.0" in json.loads(done.stdout)["supportedVersions"]


def test_an_excluded_namespace_passes_through_unchanged(config: dict[str, Any]) -> None:
    done = plugin("ADD", config, pod=("kube-system", "coredns"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == PREV_RESULT


def test_an_add_the_agent_cannot_answer_fails_closed_naming_the_socket(
    config: dict[str, Any],
) -> None:
    done = plugin("ADD", config)
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11  # try again later: the runtime retries the sandbox
    assert "shop/web" in error["msg"]
    assert f"{config['cni_agent_run_dir']}/pluginevent.sock" in error["msg"]


def test_del_succeeds_with_the_agent_gone(config: dict[str, Any]) -> None:
    done = plugin("DEL", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ignored" in done.stderr


def test_a_config_that_is_not_json_is_a_decoding_error(config: dict[str, Any]) -> None:
    done = plugin("ADD", {**config, "exclude_namespaces": "kube-system"})
    assert done.returncode == 1
    assert json.loads(done.stdout)["code"] == 6
