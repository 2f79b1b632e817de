"""The sandbox kubelet's container runtime: podman with runc, the project's engine
configuration (images.engine_env), every container labelled with its sandbox so
`sandbox down` finds and removes it whatever state a crash left.

Runs what containerspec.plan decided; it decides nothing itself.
"""

from __future__ import annotations

import functools
import http.client
import socket
import subprocess
from collections.abc import Sequence

from ambient_cni.netns import run_in_netns

from . import images
from .containerspec import ContainerPlan, Probe

SANDBOX_LABEL = "dev.ambient-cni.sandbox"
POD_LABEL = "io.kubernetes.pod.uid"


class RuntimeError_(Exception):
    """podman refused; the message is its own words."""


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return images.run_tool("podman", *args, check=False, timeout=timeout)


@functools.lru_cache(maxsize=64)
def _image_user(image_id: str) -> str:
    found = _podman("image", "inspect", "--format", "{{.Config.User}}", image_id)
    return found.stdout.strip() if found.returncode == 0 else ""


def image_id(image: str) -> str | None:
    """The local image's ID, None when the store does not hold it (nothing is pulled)."""
    found = _podman("image", "inspect", "--format", "{{.Id}}", image)
    return found.stdout.strip() if found.returncode == 0 else None


def image_user(image: str) -> str:
    """The user the image runs as by default ("" for root)."""
    found = image_id(image)
    return _image_user(found) if found else ""


def run(plan: ContainerPlan, sandbox: str) -> tuple[str, int]:
    """Start the container; (ID, host PID of its first process)."""
    started = _podman("run", f"--label={SANDBOX_LABEL}={sandbox}", *plan.run_args)
    if started.returncode != 0:
        raise RuntimeError_(started.stderr.strip().splitlines()[-1] if started.stderr else "")
    container = started.stdout.strip().splitlines()[-1]
    return container, pid(container)


def pid(container: str) -> int:
    found = _podman("inspect", "--format", "{{.State.Pid}}", container)
    return int(found.stdout.strip() or 0) if found.returncode == 0 else 0


def wait(container: str) -> int:
    """Block until the container exits; its exit code (-1 when podman cannot say)."""
    done = subprocess.run(
        ["podman", "wait", container],
        env=images.engine_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return -1


def stop(container: str, grace: float) -> None:
    _podman("stop", f"--time={int(grace)}", container, timeout=grace + 30)


def remove(container: str) -> None:
    _podman("rm", "--force", "--time=0", container)


def containers_of(*, sandbox: str, pod_uid: str | None = None) -> list[str]:
    filters = [f"--filter=label={SANDBOX_LABEL}={sandbox}"]
    if pod_uid is not None:
        filters.append(f"--filter=label={POD_LABEL}={pod_uid}")
    found = _podman("ps", "--all", "--quiet", "--no-trunc", *filters)
    return found.stdout.split() if found.returncode == 0 else []


def remove_all(sandbox: str) -> None:
    for container in containers_of(sandbox=sandbox):
        remove(container)


def execute(container: str, command: Sequence[str], timeout: float) -> int:
    done = _podman("exec", container, *command, timeout=timeout + 5)
    return done.returncode


def probe(check: Probe, *, container: str, netns: str, address: str) -> bool:
    """One try of a probe, as the kubelet makes it: HTTP and TCP from the node's network
    namespace to the pod's address, exec inside the container."""
    if check.kind == "exec":
        return execute(container, check.command, check.timeout) == 0

    def attempt() -> bool:
        try:
            if check.kind == "tcp":
                with socket.create_connection((address, check.port), timeout=check.timeout):
                    return True
            conn = http.client.HTTPConnection(address, check.port, timeout=check.timeout)
            try:
                conn.request("GET", check.path, headers={"User-Agent": "kube-probe/sandbox"})
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        except OSError:
            return False

    return run_in_netns(netns, attempt)
