"""The agent's annotation writes from its watched copy of the node's pods, against a real
API server: a copy that is behind never overwrites what someone else wrote meanwhile."""

from __future__ import annotations

import threading
from typing import Any

from ambient_cni.agent.kube_writers import KubePodApi
from ambient_cni.api import names
from ambient_cni.api.models import Workload
from ambient_cni_sandbox.cluster import SandboxCluster


class Copy:
    """A watched copy of the pods, frozen at the moment it was taken."""

    def __init__(self, *pods: dict[str, Any]):
        self.synced = threading.Event()
        self.synced.set()
        self._pods = {pod["metadata"]["uid"]: pod for pod in pods}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._pods.get(key)


def workload(pod: dict[str, Any]) -> Workload:
    meta = pod["metadata"]
    return Workload(
        uid=meta["uid"], name=meta["name"], namespace=meta["namespace"], ips=["10.0.0.1"]
    )


def test_a_users_disabled_written_after_the_copy_is_never_overwritten(
    sandbox: SandboxCluster, namespace: str
) -> None:
    pod = sandbox.create_pod(namespace, "web")
    stale = Copy(pod)  # taken before the user's write
    sandbox.kubectl(
        "annotate", "pod", "web", "-n", namespace, f"{names.REDIRECTION_ANNOTATION}=disabled"
    )

    KubePodApi(sandbox.api, stale).annotate(workload(pod), names.REDIRECTION_ENABLED)

    assert sandbox.pod_annotation(namespace, "web", names.REDIRECTION_ANNOTATION) == "disabled"


def test_a_copy_behind_an_unrelated_change_is_read_again_and_the_write_lands(
    sandbox: SandboxCluster, namespace: str
) -> None:
    pod = sandbox.create_pod(namespace, "web")
    stale = Copy(pod)
    sandbox.kubectl("label", "pod", "web", "-n", namespace, "tier=front")  # a new resourceVersion

    KubePodApi(sandbox.api, stale).annotate(workload(pod), names.REDIRECTION_ENABLED)

    assert sandbox.pod_annotation(namespace, "web", names.REDIRECTION_ANNOTATION) == "enabled"
    assert (sandbox.pod(namespace, "web") or {})["metadata"]["labels"] == {"tier": "front"}
