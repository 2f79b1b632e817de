"""Pods whose images the local store holds, run as real containers (podman with runc), as a
kubelet with a CRI runtime runs them: every container of the pod, in the pod's network
namespace (the node's for hostNetwork), with its volumes made on the node first, its
probes made on schedule, restarted by its pod's policy.

Volumes: `emptyDir` (a directory of the pod's), `hostPath` (rooted per node: see
containerspec.host_path), `configMap` and `secret` (their data as files), `downwardAPI`,
and `projected` ones (a service-account token bound to the pod, issued by the API server
as a kubelet asks for it, the cluster's CA and the namespace: what every pod's
`kube-api-access-*` volume holds).
"""

from __future__ import annotations

import base64
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from ambient_cni.kube import Obj, as_body, raw

from . import container_runtime as runtime
from .containerspec import ContainerPlan, Probe, containers, host_path, plan, volume_kind
from .podspec import ContainerState, PodSpecError, field_value

log = logging.getLogger("kubelet.containers")
TOKEN_SECONDS = 3607  # what a kubelet asks for a projected token by default
MAX_BACKOFF = 30.0


class VolumeError(Exception):
    pass


class ImagePods:
    """The container half of the sandbox kubelet, for one node."""

    def __init__(
        self,
        *,
        core: CoreV1Api,
        sandbox: str,
        node: str,
        node_root: Path,
        special_paths: Mapping[str, str],
        records: Path,
        now: Callable[[], str],
        service_env: Sequence[tuple[str, str]] = (),
    ):
        self.core = core
        self.sandbox = sandbox
        self.node = node
        self.node_root = node_root
        self.special = dict(special_paths)
        self.records = records
        self.now = now
        self.service_env = tuple(service_env)
        self.exited: dict[str, int] = {}  # container ID -> exit code
        self.lock = threading.Lock()

    @staticmethod
    def eligible(pod: Obj) -> bool:
        """Whether every container's image is in the local store (nothing is pulled); the
        sandbox's own `sandbox/...` images are commands it runs, never looked up."""
        images = [str(c.get("image", "")) for c in containers(pod)]
        if not images or any(not image or image.startswith("sandbox/") for image in images):
            return False
        return shutil.which("podman") is not None and all(
            runtime.image_id(image) for image in images
        )

    # -- volumes ------------------------------------------------------------------------------

    def pod_dir(self, uid: str) -> Path:
        return self.records / uid

    def make_volumes(
        self, pod: Obj, pod_ips: tuple[str, ...], host_ips: tuple[str, ...]
    ) -> dict[str, str]:
        """Each volume of the pod as a host directory (or file, for a hostPath file)."""
        meta = pod["metadata"]
        made: dict[str, str] = {}
        for volume in pod.get("spec", {}).get("volumes") or []:
            name = volume["name"]
            kind = volume_kind(volume)
            if kind == "hostPath":
                spec = volume["hostPath"]
                target = Path(host_path(spec["path"], str(self.node_root), self.special))
                if spec.get("type") in ("DirectoryOrCreate", None, "") and not target.exists():
                    target.mkdir(parents=True, exist_ok=True)
                elif not target.exists():
                    raise VolumeError(f"hostPath {spec['path']} does not exist on {self.node}")
                made[name] = str(target)
                continue
            directory = self.pod_dir(meta["uid"]) / "volumes" / name
            directory.mkdir(parents=True, exist_ok=True)
            if kind == "configMap":
                self._write(directory, self._config_map(meta["namespace"], volume["configMap"]))
            elif kind == "secret":
                self._write(directory, self._secret(meta["namespace"], volume["secret"]))
            elif kind == "downwardAPI":
                self._write(directory, _downward(pod, volume["downwardAPI"], pod_ips, host_ips))
            elif kind == "projected":
                files: dict[str, bytes] = {}
                for source in volume["projected"].get("sources") or []:
                    files |= self._projected(pod, source, pod_ips, host_ips)
                self._write(directory, files)
            # As a kubelet makes them: an emptyDir anyone in the pod may write, the rest read.
            directory.chmod(0o777 if kind == "emptyDir" else 0o755)
            made[name] = str(directory)
        return made

    @staticmethod
    def _write(directory: Path, files: Mapping[str, bytes]) -> None:
        for relative, content in files.items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o644)

    def _read(self, what: str, call: Callable[[], Any], optional: bool) -> Obj | None:
        try:
            return raw(call())
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            raise VolumeError(f"{what}: {exc.status} {exc.reason}") from exc

    def _config_map(self, namespace: str, spec: Obj) -> dict[str, bytes]:
        found = self._read(
            f'configmap "{spec["name"]}"',
            lambda: self.core.read_namespaced_config_map(
                spec["name"], namespace, _preload_content=False
            ),
            bool(spec.get("optional")),
        )
        data = {k: v.encode() for k, v in ((found or {}).get("data") or {}).items()}
        return _items(data, spec.get("items"))

    def _secret(self, namespace: str, spec: Obj) -> dict[str, bytes]:
        found = self._read(
            f'secret "{spec["secretName"]}"',
            lambda: self.core.read_namespaced_secret(
                spec["secretName"], namespace, _preload_content=False
            ),
            bool(spec.get("optional")),
        )
        data = {k: base64.b64decode(v) for k, v in ((found or {}).get("data") or {}).items()}
        return _items(data, spec.get("items"))

    def _projected(
        self, pod: Obj, source: Obj, pod_ips: tuple[str, ...], host_ips: tuple[str, ...]
    ) -> dict[str, bytes]:
        meta = pod["metadata"]
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            account = pod["spec"].get("serviceAccountName") or "default"
            body: dict[str, Any] = {
                "spec": {
                    "expirationSeconds": int(spec.get("expirationSeconds", TOKEN_SECONDS)),
                    "boundObjectRef": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                }
            }
            if spec.get("audience"):
                body["spec"]["audiences"] = [spec["audience"]]
            issued = self._read(
                f'a token of serviceaccount "{account}"',
                lambda: self.core.create_namespaced_service_account_token(
                    account, meta["namespace"], as_body(body), _preload_content=False
                ),
                False,
            )
            token = str((issued or {}).get("status", {}).get("token", ""))
            return {spec.get("path", "token"): token.encode()}
        if "configMap" in source:
            return self._config_map(meta["namespace"], source["configMap"])
        if "secret" in source:
            spec = {**source["secret"], "secretName": source["secret"]["name"]}
            return self._secret(meta["namespace"], spec)
        if "downwardAPI" in source:
            return _downward(pod, source["downwardAPI"], pod_ips, host_ips)
        raise VolumeError(f"projected source {sorted(source)} is not made by the sandbox")

    # -- containers ---------------------------------------------------------------------------

    def container_name(self, pod: Obj, container: str) -> str:
        meta = pod["metadata"]
        return f"k8s_{container}_{meta['name']}_{meta['namespace']}_{meta['uid'][:8]}"

    def log_path(self, pod: Obj, container: str) -> Path:
        meta = pod["metadata"]
        return self.records / f"{meta['namespace']}_{meta['name']}_{meta['uid']}_{container}.log"

    def plans(
        self,
        pod: Obj,
        netns_path: str,
        pod_ips: tuple[str, ...],
        host_ips: tuple[str, ...],
        volume_dirs: Mapping[str, str],
    ) -> list[ContainerPlan]:
        return [
            plan(
                pod,
                container,
                name=self.container_name(pod, str(container.get("name"))),
                netns_path=netns_path,
                pod_ips=pod_ips,
                host_ips=host_ips,
                volume_dirs=volume_dirs,
                image_user=runtime.image_user(str(container.get("image", ""))),
                log_path=str(self.log_path(pod, str(container.get("name")))),
                service_env=self.service_env,
            )
            for container in containers(pod)
        ]

    def start(
        self, plan_: ContainerPlan, state: ContainerState, on_exit: Callable[[], None]
    ) -> None:
        """Run one container (removing a stopped one of the same name first) and watch it."""
        runtime.remove(plan_.run_args[1].removeprefix("--name="))
        container, pid = runtime.run(plan_, self.sandbox)
        state.id, state.pid = container, pid
        state.state, state.reason, state.message = "running", None, None
        state.started_at, state.started_mono = self.now(), time.monotonic()
        state.exit_code = state.finished_at = None
        state.ready = plan_.readiness is None
        state.readiness_streak = state.liveness_failures = state.startup_failures = 0
        state.started = plan_.startup is None
        state.next_probe = 0.0
        state.restart_at = None

        def watch() -> None:
            code = runtime.wait(container)
            with self.lock:
                self.exited[container] = code
            on_exit()

        threading.Thread(target=watch, daemon=True, name=f"wait-{plan_.name}").start()

    def take_exit(self, container: str) -> int | None:
        with self.lock:
            return self.exited.pop(container, None)

    def probe_all(
        self,
        plans: Mapping[str, ContainerPlan],
        states: list[ContainerState],
        netns: str,
        address: str,
    ) -> tuple[bool, float, list[str]]:
        """Probe what is due; (changed, seconds to the next probe, containers to restart).
        Each container's probes share one schedule: its shortest period."""
        changed = False
        restart: list[str] = []
        wait = 10.0
        clock = time.monotonic()
        for state in states:
            spec = plans.get(state.name)
            if spec is None or state.state != "running":
                continue
            # Until its startup probe succeeds, a container gets no other probe.
            probes = (
                (("readiness", spec.readiness), ("liveness", spec.liveness))
                if state.started
                else (("startup", spec.startup),)
            )
            checks = [(k, p) for k, p in probes if p]
            if not checks:
                continue
            first = state.started_mono + min(p.initial_delay for _, p in checks)
            due = max(first, state.next_probe)
            if clock < due:
                wait = min(wait, due - clock)
                continue
            for kind, check in checks:
                if clock < state.started_mono + check.initial_delay:
                    continue
                ok = runtime.probe(check, container=state.id, netns=netns, address=address)
                changed |= self._note(state, kind, check, ok, restart)
            period = min(p.period for _, p in checks)
            state.next_probe = clock + period
            wait = min(wait, period)
        return changed, max(wait, 0.05), restart

    @staticmethod
    def _note(state: ContainerState, kind: str, check: Probe, ok: bool, restart: list[str]) -> bool:
        if kind == "readiness":
            state.readiness_streak = state.readiness_streak + 1 if ok else 0
            now_ready = (ok and state.readiness_streak >= check.success_threshold) or (
                state.ready and ok
            )
            if not ok:
                now_ready = False
            changed = now_ready != state.ready
            state.ready = now_ready
            return changed
        if kind == "startup":
            state.startup_failures = 0 if ok else state.startup_failures + 1
            state.started = ok
            if state.startup_failures >= check.failure_threshold:
                restart.append(state.name)
            return False
        state.liveness_failures = 0 if ok else state.liveness_failures + 1
        if state.liveness_failures >= check.failure_threshold:
            restart.append(state.name)
        return False

    def stop(self, states: list[ContainerState], grace: float) -> None:
        for state in states:
            if state.id:
                runtime.stop(state.id, grace)
                runtime.remove(state.id)

    def forget(self, uid: str) -> None:
        for container in runtime.containers_of(sandbox=self.sandbox, pod_uid=uid):
            runtime.remove(container)
        shutil.rmtree(self.pod_dir(uid), ignore_errors=True)


def backoff(restarts: int) -> float:
    return min(2.0 ** max(restarts - 1, 0), MAX_BACKOFF)


def _items(data: Mapping[str, bytes], items: list[Obj] | None) -> dict[str, bytes]:
    if not items:
        return dict(data)
    return {
        str(item.get("path") or item["key"]): data[item["key"]]
        for item in items
        if item["key"] in data
    }


def _downward(
    pod: Obj, spec: Obj, pod_ips: tuple[str, ...], host_ips: tuple[str, ...]
) -> dict[str, bytes]:
    files = {}
    for item in spec.get("items") or []:
        path = (item.get("fieldRef") or {}).get("fieldPath")
        if path is None:
            raise PodSpecError("CreateContainerConfigError", "downwardAPI: only fieldRef items")
        files[item["path"]] = field_value(pod, path, pod_ips, host_ips).encode()
    return files
