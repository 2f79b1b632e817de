"""API objects and network namespaces the benchmarks make in bulk, and remove."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from pyroute2 import IPRoute

from ambient_cni.api import names
from ambient_cni.kube import MERGE_PATCH, as_body, discard, new_api_client, raw
from ambient_cni.netns import run_in_netns
from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.components import repo_crds
from ambient_cni_sandbox.network import create_netns, delete_netns

from .measure import wait_until

T = TypeVar("T")
R = TypeVar("R")
BENCH_LABEL = "ambient-cni.dev/benchmark"
# acni-test-* namespaces are removed by `ambient-cni sandbox down --all` after a crash.
NETNS_PREFIX = "acni-test-bench-"
WRITERS = 16
PROCESSES = 4  # worker processes for the many pods of the controller scale benchmark


class BulkClient:
    """One API client per worker thread: the generated client's pool is small."""

    def __init__(self, cluster: SandboxCluster):
        self.kubeconfig: Path = cluster.kubeconfig
        self._local = threading.local()

    @classmethod
    def for_kubeconfig(cls, kubeconfig: Path) -> BulkClient:
        bulk = cls.__new__(cls)
        bulk.kubeconfig = kubeconfig
        bulk._local = threading.local()
        return bulk

    def api(self) -> ApiClient:
        client: ApiClient | None = getattr(self._local, "client", None)
        if client is None:
            client = new_api_client(self.kubeconfig)
            self._local.client = client
        return client

    def core(self) -> CoreV1Api:
        return CoreV1Api(self.api())

    def custom(self) -> CustomObjectsApi:
        return CustomObjectsApi(self.api())

    def each(self, fn: Callable[[T], R], items: Iterable[T], workers: int = WRITERS) -> list[R]:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))


def node_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {BENCH_LABEL: "true"}},
    }


def pod_body(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {BENCH_LABEL: "true", "app": "bench"}},
        "spec": {
            "nodeName": node,
            # No kubelet runs these: tolerate the taints an absent kubelet earns its node.
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "main", "image": "bench.invalid/none"}],
        },
    }


def create_nodes(bulk: BulkClient, nodes: list[str]) -> None:
    bulk.each(
        lambda n: bulk.core().create_node(as_body(node_body(n)), _preload_content=False), nodes
    )


def create_running_pods(
    bulk: BulkClient, namespace_of: Callable[[int], str], placed: list[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """Pods as objects only, `(name, node, ip)` each, with status.podIP set as a kubelet would."""

    def make(entry: tuple[int, tuple[str, str, str]]) -> dict[str, Any]:
        index, (name, node, ip) = entry
        namespace = namespace_of(index)
        core = bulk.core()
        created = raw(
            core.create_namespaced_pod(
                namespace, as_body(pod_body(name, node)), _preload_content=False
            )
        )
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1"}
        core.patch_namespaced_pod_status(
            name,
            namespace,
            as_body({"status": status}),
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )
        created["status"] = status
        return created

    return bulk.each(make, list(enumerate(placed)))


def _create_pods_chunk(kubeconfig: Path, rows: list[tuple[str, str, str, str]]) -> int:
    """One worker process's share of `create_many_running_pods`: WRITERS threads of its own."""
    bulk = BulkClient.for_kubeconfig(kubeconfig)

    def make(row: tuple[str, str, str, str]) -> None:
        name, namespace, node, ip = row
        core = bulk.core()
        discard(
            core.create_namespaced_pod(
                namespace, as_body(pod_body(name, node)), _preload_content=False
            )
        )
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1"}
        discard(
            core.patch_namespaced_pod_status(
                name,
                namespace,
                as_body({"status": status}),
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        )

    bulk.each(make, rows)
    return len(rows)


def create_many_running_pods(
    bulk: BulkClient, rows: list[tuple[str, str, str, str]], processes: int = PROCESSES
) -> None:
    """Pods as objects only, `(name, namespace, node, ip)` each, with status.podIP set, from
    `processes` processes of WRITERS threads each: one Python process's client work (TLS,
    JSON, the generated client) would otherwise set the pace at large sizes, not the API
    server."""
    chunks = [rows[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        done = sum(pool.map(_create_pods_chunk, [bulk.kubeconfig] * processes, chunks))
    if done != len(rows):
        raise RuntimeError(f"created {done} of {len(rows)} pods")


def delete_bench_objects(bulk: BulkClient, namespaces: list[str]) -> None:
    """Force-delete the pods (no kubelet will confirm), then the namespaces and the nodes
    (the garbage collector removes the nodes' AmbientNodeConfigs with them)."""
    core = bulk.core()

    def drop_namespace(ns: str) -> None:
        try:
            core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
            core.delete_namespace(ns, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    bulk.each(drop_namespace, namespaces)
    core.delete_collection_node(label_selector=f"{BENCH_LABEL}=true")

    def gone() -> bool:
        left = raw(core.list_namespace(label_selector=BENCH_LABEL, _preload_content=False))
        return not any(item["metadata"]["name"] in namespaces for item in left["items"])

    wait_until("the benchmark's namespaces to be gone", gone, timeout=120, interval=0.2)


def _address_on_loopback(ip: str) -> None:
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=lo, address=ip, prefixlen=32)


def make_pod_netns(names_and_ips: list[tuple[str, str]]) -> dict[str, Path]:
    """A named namespace per pod holding its IP (on lo: no process, no link to make)."""
    made: dict[str, Path] = {}
    for name, ip in names_and_ips:
        create_netns(name)
        path = Path("/run/netns") / name
        made[name] = path
        run_in_netns(path, lambda ip=ip: _address_on_loopback(ip))  # type: ignore[misc]
    return made


def delete_netns_all(netns: Iterable[str]) -> None:
    for name in netns:
        delete_netns(name)


def ensure_crd(cluster: SandboxCluster) -> None:
    cluster.kubectl("apply", "-f", str(repo_crds()))
    cluster.kubectl("wait", "--for=condition=established", f"crd/{names.CRD_NAME}")


def wait_default_service_accounts(bulk: BulkClient, namespaces: list[str]) -> None:
    """Pods are refused until the controller manager has made each namespace's `default`."""
    core = bulk.core()

    def ready() -> bool:
        listed = raw(
            core.list_service_account_for_all_namespaces(
                field_selector="metadata.name=default", _preload_content=False
            )
        )
        have = {item["metadata"]["namespace"] for item in listed["items"]}
        return set(namespaces) <= have

    wait_until("each namespace's default ServiceAccount", ready, timeout=120, interval=0.2)
