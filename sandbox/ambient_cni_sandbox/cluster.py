"""A handle on a running sandbox, with the helpers tests, demos and benchmarks share.

Objects are plain dicts in the API's JSON form. Every wait polls with a
deadline and fails with what it last saw, never a bare timeout.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException

from ambient_cni.kube import MERGE_PATCH, Obj, as_body, new_api_client, raw
from ambient_cni.netns import run_in_netns

from . import pki
from .controlplane import write_kubeconfig
from .lifecycle import require_state
from .podspec import sidecar_log_name
from .state import SandboxState, paths_for
from .topology import IpFamily, PodNetwork


class WaitTimeout(AssertionError):
    """A polled condition did not hold in time; the message carries the last state seen."""


def wait_for(
    what: str, probe: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1
) -> Any:
    """Poll `probe` until it returns something truthy; return that. No sleeps as sync."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class SandboxCluster:
    def __init__(self, state: SandboxState):
        self.state = state
        self.kubeconfig = Path(state.kubeconfig)
        self.api: ApiClient = new_api_client(self.kubeconfig)
        self.core = CoreV1Api(self.api)

    @classmethod
    def open(cls, name: str) -> SandboxCluster:
        return cls(require_state(name))

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def pod_network(self) -> PodNetwork:
        """How pods are wired to their node: "bridge" (cbr0) or "ptp" (a veth each)."""
        return self.state.topology.pod_network

    @property
    def ip_family(self) -> IpFamily:
        """ "dual" (every pod an IPv4 and an IPv6 address, IPv4 first), "ipv4" or "ipv6"."""
        return self.state.topology.ip_family

    @property
    def ip_versions(self) -> tuple[int, ...]:
        """(4, 6), (4,) or (6,): the address versions every pod has, in podIPs' order."""
        return self.state.topology.ip_versions

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.state.topology.nodes]

    # -- kubectl -----------------------------------------------------------------

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(Path(self.state.bin_dir) / "kubectl"),
                "--kubeconfig",
                str(self.kubeconfig),
                *args,
            ],
            capture_output=True,
            text=True,
            check=check,
            input=input_text,
        )

    def user_kubeconfig(self, user: str, groups: str | None = None) -> Path:
        """A kubeconfig for a client-certificate user (CN `user`, O `groups`), made once."""
        path = Path(self.state.state_dir) / "users" / f"{user}.kubeconfig"
        if not path.exists():
            pki_dir = Path(self.state.state_dir) / "pki"
            ca = pki.read_pair(pki_dir, "ca")
            client = pki.issue(ca, user, organization=groups, client=True)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            server = f"https://127.0.0.1:{self.state.apiserver_port}"
            write_kubeconfig(path, server, ca, client, user=user, cluster=self.name)
        return path

    def service_account_kubeconfig(self, namespace: str, account: str) -> Path:
        """A kubeconfig with a fresh bearer token of a ServiceAccount (TokenRequest API)."""
        token = self.kubectl(
            "create", "token", account, "-n", namespace, "--duration=4h"
        ).stdout.strip()
        return self._token_kubeconfig(f"sa-{namespace}-{account}", account, token)

    def pod_bound_kubeconfig(self, namespace: str, account: str, pod: str) -> Path:
        """A kubeconfig with a token bound to a pod, as a kubelet hands its pods: the API
        server names the pod's node in the token's user (authentication.kubernetes.io/
        node-name) and the token dies with the pod."""
        token = self.kubectl(
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--bound-object-kind=Pod",
            f"--bound-object-name={pod}",
            "--duration=4h",
        ).stdout.strip()
        return self._token_kubeconfig(f"pod-{namespace}-{pod}", account, token)

    def _token_kubeconfig(self, label: str, user: str, token: str) -> Path:
        path = Path(self.state.state_dir) / "users" / f"{label}.kubeconfig"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        ca = (Path(self.state.state_dir) / "pki" / "ca.crt").read_bytes()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.state.apiserver_port}",
                        "certificate-authority-data": base64.b64encode(ca).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": user}}],
            "current-context": self.name,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    # -- namespaces and pods -----------------------------------------------------------

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> Obj:
        body = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels or {})},
        }
        return raw(self.core.create_namespace(body=as_body(body), _preload_content=False))

    def label_namespace(self, name: str, key: str, value: str | None) -> None:
        """Set (None: remove) one label of a namespace."""
        self.core.patch_namespace(
            name, as_body({"metadata": {"labels": {key: value}}}), _content_type=MERGE_PATCH
        )

    def pod_annotation(self, namespace: str, name: str, key: str) -> str | None:
        pod = self.pod(namespace, name) or {}
        value = ((pod.get("metadata") or {}).get("annotations") or {}).get(key)
        return None if value is None else str(value)

    def namespace(self, name: str) -> Obj | None:
        try:
            return raw(self.core.read_namespace(name, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_namespace(self, name: str) -> None:
        try:
            self.core.delete_namespace(name, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create_pod(
        self,
        namespace: str,
        name: str,
        *,
        node: str | None = None,
        command: Sequence[str] | None = None,
        args: Sequence[str] | None = None,
        port: int | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        host_network: bool = False,
        restart_policy: str = "Always",
        env: Mapping[str, str] | None = None,
        service_account: str | None = None,
        node_selector: Mapping[str, str] | None = None,
        sidecar: Mapping[str, Any] | None = None,
    ) -> Obj:
        """A pod; with `node` it is bound there at once (no scheduler, as `spec.nodeName`
        is), otherwise the sandbox's scheduler places it. With `sidecar` (fields of the
        container, e.g. a securityContext), it is a pod as Istio's injector leaves it: an
        `istio-proxy` container (the sandbox's Envoy stand-in) and its status annotation."""
        container: dict[str, Any] = {"name": "main", "image": "sandbox/echo"}
        if command is not None:
            container["command"] = list(command)
        if args is not None:
            container["args"] = list(args)
        if port is not None:
            container["ports"] = [{"containerPort": port}]
        if env:
            container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        containers = [container]
        annotations = dict(annotations or {})
        if sidecar is not None:
            containers.append(
                {
                    "name": "istio-proxy",
                    "image": "sandbox/sidecar",
                    "args": ["proxy", "sidecar"],
                    **dict(sidecar),
                }
            )
            annotations.setdefault(
                "sidecar.istio.io/status", '{"containers":["istio-proxy"],"version":"sandbox"}'
            )
        spec: dict[str, Any] = {
            "containers": containers,
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 5,
        }
        if node:
            spec["nodeName"] = node
        if node_selector:
            spec["nodeSelector"] = dict(node_selector)
        if service_account:
            spec["serviceAccountName"] = service_account
        if host_network:
            spec["hostNetwork"] = True
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels or {}),
                "annotations": annotations,
            },
            "spec": spec,
        }
        return raw(
            self.core.create_namespaced_pod(namespace, body=as_body(body), _preload_content=False)
        )

    def node_taints(self, node: str) -> list[Obj]:
        found = raw(self.core.read_node(node, _preload_content=False))
        return list(found["spec"].get("taints") or [])

    def set_node_taints(self, node: str, taints: Sequence[Mapping[str, Any]]) -> None:
        """Replace the node's taints (as a node pool's registration or `kubectl taint` does)."""
        self.core.patch_node(
            node,
            as_body({"spec": {"taints": [dict(t) for t in taints]}}),
            _content_type=MERGE_PATCH,  # the list is replaced whole
            _preload_content=False,
        )

    def pod_events(self, namespace: str, pod: str, reason: str) -> list[Obj]:
        """The Events about one pod with this reason (e.g. FailedCreatePodSandBox)."""
        events = raw(self.core.list_namespaced_event(namespace, _preload_content=False))
        return [
            e
            for e in events["items"]
            if e["involvedObject"]["name"] == pod and e["reason"] == reason
        ]

    def pod(self, namespace: str, name: str) -> Obj | None:
        try:
            return raw(self.core.read_namespaced_pod(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pods(self, namespace: str | None = None) -> list[Obj]:
        if namespace is None:
            listing = raw(self.core.list_pod_for_all_namespaces(_preload_content=False))
        else:
            listing = raw(self.core.list_namespaced_pod(namespace, _preload_content=False))
        items: list[Obj] = listing["items"]
        return items

    def delete_pod(self, namespace: str, name: str, *, grace: int | None = None) -> None:
        try:
            self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=grace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_pod(
        self,
        namespace: str,
        name: str,
        condition: Callable[[Obj], bool],
        what: str,
        *,
        timeout: float = 30.0,
    ) -> Obj:
        def probe() -> Obj | None:
            pod = self.pod(namespace, name)
            return pod if pod is not None and condition(pod) else None

        try:
            result: Obj = wait_for(f"pod {namespace}/{name} {what}", probe, timeout=timeout)
        except WaitTimeout as exc:
            pod = self.pod(namespace, name)
            status = pod.get("status") if pod else "(pod does not exist)"
            raise WaitTimeout(f"{exc}; pod status: {json.dumps(status)}") from None
        return result

    def wait_running(self, namespace: str, name: str, *, timeout: float = 30.0) -> Obj:
        return self.wait_pod(namespace, name, is_ready, "to be Running and Ready", timeout=timeout)

    def wait_pod_gone(self, namespace: str, name: str, *, timeout: float = 30.0) -> None:
        wait_for(
            f"pod {namespace}/{name} to be deleted",
            lambda: self.pod(namespace, name) is None,
            timeout=timeout,
        )

    # -- inside pods -------------------------------------------------------------

    def pod_netns(self, pod: Mapping[str, Any]) -> str:
        """The network namespace a pod's process runs in (its node's, for hostNetwork)."""
        if pod["spec"].get("hostNetwork"):
            return self.state.topology.node(pod["spec"]["nodeName"]).netns
        return self.state.topology.pod_netns(pod["metadata"]["uid"])

    def http_get(
        self,
        from_pod: Mapping[str, Any],
        url_host: str,
        port: int = 8080,
        path: str = "/",
        *,
        timeout: float = 5.0,
        source_port: int | None = None,
    ) -> HttpReply:
        """An HTTP GET made from inside `from_pod`'s network namespace. `url_host` may be
        an IPv6 address, bracketed or not. With `source_port` (below the kernel's ephemeral
        range, 32768+, so no relay picks it too), the call comes from that port: a server
        seeing it knows no proxy stood between (ztunnel keeps a caller's address, not its
        port)."""
        host = url_host[1:-1] if url_host.startswith("[") and url_host.endswith("]") else url_host
        source = None if source_port is None else ("", source_port)

        def call() -> HttpReply:
            conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=source)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return HttpReply(response.status, response.read().decode(errors="replace"))
            finally:
                conn.close()

        return run_in_netns(self.pod_netns(from_pod), call)

    def sidecar_connections(self, pod: Mapping[str, Any]) -> list[dict[str, Any]]:
        """What the pod's Envoy stand-in relayed, one record per closed connection."""
        meta = pod["metadata"]
        path = paths_for(self.name).pods_dir(pod["spec"]["nodeName"]) / sidecar_log_name(
            meta["namespace"], meta["name"], meta["uid"]
        )
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def container_log(self, pod: Mapping[str, Any], container: str) -> list[str]:
        """An image pod's container's output, line by line, as `kubectl logs` shows it."""
        meta = pod["metadata"]
        name = f"{meta['namespace']}_{meta['name']}_{meta['uid']}_{container}.log"
        path = paths_for(self.name).pods_dir(pod["spec"]["nodeName"]) / name
        return cri_log_lines(path.read_text()) if path.exists() else []

    def exec_in_pod(
        self, pod: Mapping[str, Any], argv: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.pod_netns(pod), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )


def cri_log_lines(text: str) -> list[str]:
    """The lines of a CRI log file (`TIME STREAM TAG TEXT`; tag P: the line goes on in the
    next entry, F: it ends here), partial entries joined, both streams in order."""
    lines, partial = [], ""
    for entry in text.splitlines():
        fields = entry.split(" ", 3)
        if len(fields) < 3:
            continue
        content = fields[3] if len(fields) == 4 else ""
        if fields[2].startswith("P"):
            partial += content
            continue
        lines.append(partial + content)
        partial = ""
    if partial:
        lines.append(partial)
    return lines


def is_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return status.get("phase") == "Running" and ready and bool(status.get("podIP"))


def pod_ip(pod: Mapping[str, Any], *, family: int | None = None) -> str:
    """The pod's address: its first family's (podIP), or with `family` (4 or 6) its address
    of that family; KeyError if it has none."""
    if family is None:
        return str(pod["status"]["podIP"])
    for ip in pod_ips(pod):
        if ipaddress.ip_address(ip).version == family:
            return ip
    name = pod.get("metadata", {}).get("name")
    raise KeyError(f"pod {name} has no IPv{family} address: {pod_ips(pod)}")


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    """Every address of the pod (status.podIPs), the first family's first."""
    status = pod["status"]
    ips = [str(entry["ip"]) for entry in status.get("podIPs") or [] if entry.get("ip")]
    return ips or [str(status["podIP"])]
