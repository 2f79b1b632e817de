"""KubePodApi.has_sandbox: a pod keeps its sandbox (and netns) until it is deleted or has
terminated, read from the watched copy when it has the pod, else from the server."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from ambient_cni.agent.kube_writers import KubePodApi
from ambient_cni.api.models import Workload


@dataclass
class Answer:
    data: bytes


class Server:
    """read_namespaced_pod from a dict of name -> pod (404 for others)."""

    def __init__(self, pods: dict[str, dict[str, Any]]):
        self.pods = pods
        self.reads = 0

    def read_namespaced_pod(self, name: str, namespace: str, **_: Any) -> Answer:
        self.reads += 1
        if name not in self.pods:
            raise ApiException(status=404)
        return Answer(json.dumps(self.pods[name]).encode())


class Cache:
    def __init__(self, pods: dict[str, dict[str, Any]]):
        self.pods = pods
        self.synced = threading.Event()
        self.synced.set()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.pods.get(key)


def pod(uid: str, phase: str) -> dict[str, Any]:
    return {"metadata": {"name": uid, "namespace": "shop", "uid": uid}, "status": {"phase": phase}}


def workload(uid: str) -> Workload:
    return Workload(uid=uid, name=uid, namespace="shop", ips=["10.0.0.1"])


def api(server: dict[str, dict[str, Any]], cached: dict[str, dict[str, Any]]) -> KubePodApi:
    pods = KubePodApi(None, Cache(cached))  # type: ignore[arg-type]
    pods.core = Server(server)  # type: ignore[assignment]
    return pods


@pytest.mark.parametrize(
    ("phase", "has"),
    [("Pending", True), ("Running", True), ("Succeeded", False), ("Failed", False)],
)
def test_a_pod_has_its_sandbox_until_it_terminates(phase: str, has: bool) -> None:
    from_cache = api({}, {"a": pod("a", phase)})
    assert from_cache.has_sandbox(workload("a")) is has
    from_server = api({"a": pod("a", phase)}, {})  # the copy has not got it yet
    assert from_server.has_sandbox(workload("a")) is has


def test_a_deleted_pod_or_another_with_its_name_has_no_sandbox_of_it() -> None:
    assert not api({}, {}).has_sandbox(workload("a"))
    assert not api({"a": pod("b", "Running")}, {}).has_sandbox(workload("a"))
