"""The simulated kubelet of one sandbox node.

It registers its Node and keeps it Ready (Lease heartbeats), watches the pods
bound to its node and, level-based, makes each one real: a network namespace
set up by the node's CNI chain as a container runtime sets it up (cni.py), and
the first container's process running inside it. A failed CNI ADD leaves the
pod ContainerCreating with a FailedCreatePodSandBox Event carrying the
plugin's message, retried with backoff, as a kubelet does. It writes the pod's status
(phase, podIP and podIPs, conditions, container state) back through `pods/status`. On a
dual-stack sandbox a pod, like its node, has an address per family, IPv4 first: podIP is
the first, podIPs all; the Node's podCIDRs and InternalIPs likewise.
Deleting a pod stops its process and removes its namespace.

Each pod has a record file written before anything is made, so a restarted
kubelet adopts live processes and removes what a crash left half-made.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import CoordinationV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from ambient_cni.kube import MERGE_PATCH, Obj, as_body, new_api_client, raw
from ambient_cni.netns import run_in_netns
from ambient_cni.reflector import Reflector
from ambient_cni.workqueue import WorkQueue

from . import cni as cni_chain
from . import container_runtime, network
from .binaries import gomod_dir, parse_pins
from .cni import CniError, CniRuntime, SandboxPod
from .containerspec import ContainerPlan
from .image_pods import ImagePods, VolumeError, backoff
from .podspec import (
    SIDECAR_PORTS,
    ContainerState,
    PodRuntime,
    PodSpecError,
    app_container,
    container_run,
    grace_seconds,
    readiness_port,
    render_status,
    restart_on_exit,
    sidecar_log_name,
    sidecar_run,
    uses_host_network,
)
from .processes import TAG_ENV, is_running, listens_on, start_time, terminate_group
from .state import SandboxState, load_state, paths_for
from .topology import API_ENDPOINT_IPS, API_ENDPOINT_PORT

log = logging.getLogger("kubelet")

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_INTERVAL = 10.0
NODE_STATUS_INTERVAL = 60.0
RESYNC_INTERVAL = 30.0
WORKERS = 4
# Backoff of a pod whose CNI ADD failed, as a kubelet backs off sandbox creation.
SANDBOX_RETRY_S = 1.0
SANDBOX_RETRY_MAX_S = 10.0
MAX_BACKOFF = 30.0
READINESS_FAST_SECONDS = 10.0
SIDECAR_START_SECONDS = 10.0
SANDBOX_LABEL = "sandbox.ambient-cni.dev/name"
KUBELET_VERSION_FALLBACK = "v0.0.0"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LocalPod(BaseModel):
    """The kubelet's own record of one pod: what it made, and the status it derives."""

    uid: str
    namespace: str
    name: str
    netns: str  # where the process runs: the pod's own namespace, or the node's
    own_netns: bool
    veth: str | None
    ip: str  # the first family's address
    ips: tuple[str, ...] = ()  # every family's, ip first (a record from before: just ip)
    pid: int | None = None
    pid_start: int | None = None
    sidecar_pid: int | None = None  # the istio-proxy container's process, in a sidecar pod
    sidecar_pid_start: int | None = None
    restart_at: float | None = None  # monotonic time of the next restart after a crash
    ready_port: int | None = None  # Ready once something listens here (None: Ready on start)
    launched_at: float = 0.0  # monotonic time of the last start, for readiness polling
    image_pod: bool = False  # its containers run from images (image_pods.py), not a process
    runtime: PodRuntime


class Kubelet:
    def __init__(self, state: SandboxState, node_name: str, kubernetes_version: str):
        self.state = state
        self.node = state.topology.node(node_name)
        self.kubernetes_version = kubernetes_version
        self.paths = paths_for(state.name)
        self.records = self.paths.pods_dir(node_name)
        self.records.mkdir(parents=True, exist_ok=True)
        api = new_api_client(Path(state.kubeconfig))
        self.core = CoreV1Api(api)
        self.coord = CoordinationV1Api(api)
        self.queue: WorkQueue[str] = WorkQueue()
        self.pods = Reflector(
            f"pods@{node_name}",
            self.core.list_pod_for_all_namespaces,
            self.queue.add,
            field_selector=f"spec.nodeName={node_name}",
        )
        node_cni = self.paths.node_cni(node_name)
        agent_run_dir = cni_chain.agent_run_dir(node_cni)
        self.cni = CniRuntime(
            node_cni,
            self.node,
            Path(state.cni_bin_dir) / "cni-run",
            # install-cni in the agent's pod names the node's path in the conflist.
            node_view={cni_chain.NODE_AGENT_RUN_DIR: agent_run_dir},
        )
        self.images = ImagePods(
            core=self.core,
            sandbox=state.name,
            node=node_name,
            node_root=Path(state.state_dir) / "nodes" / node_name / "root",
            # The node's own directories where the sandbox keeps them (its CNI dirs and
            # the sockets its ztunnel and CNI plugin use); other hostPaths under its root.
            special_paths={
                "/etc/cni/net.d": str(node_cni.conf_dir),
                "/opt/cni/bin": str(node_cni.bin_dir),
                "/var/run/ztunnel": str(Path(state.state_dir) / "ztunnel" / node_name),
                cni_chain.NODE_AGENT_RUN_DIR: str(agent_run_dir),
            },
            records=self.records,
            now=now,
            service_env=api_service_env(self.node.ips[0]),
        )
        self.plans: dict[str, dict[str, ContainerPlan]] = {}  # uid -> container -> its plan
        self.sandbox_failures: dict[str, int] = {}  # uid -> failed CNI ADDs in a row
        self.sandbox_retry_at: dict[str, float] = {}  # uid -> monotonic time of the next try
        self.local: dict[str, LocalPod] = {}
        self.exited: dict[str, tuple[int, int]] = {}  # uid -> (pid, exit code)
        self.reported: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # -- main loop -------------------------------------------------------------

    def run(self) -> None:
        def on_signal(_signum: int, _frame: object) -> None:
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.register_node()
        self.adopt_records()
        self.pods.start(self.stop)
        self.queue.start(self.sync, workers=WORKERS, name="pod-sync")
        self.pods.synced.wait()
        for uid in list(self.local):  # pods gone from the API while we were down
            self.queue.add(uid)
        log.info("kubelet for %s running", self.node.name)
        self._heartbeat_loop()
        # Stopping leaves pods running, as a real kubelet restart does.
        self.queue.close()
        log.info("kubelet for %s stopped", self.node.name)

    def _heartbeat_loop(self) -> None:
        last_status = last_resync = time.monotonic()
        while not self.stop.is_set():
            try:
                self.renew_lease()
                if time.monotonic() - last_status > NODE_STATUS_INTERVAL:
                    self.patch_node_status()
                    last_status = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            if time.monotonic() - last_resync > RESYNC_INTERVAL:
                for uid in {*self.pods.key_list(), *self.local}:
                    self.queue.add(uid)
                last_resync = time.monotonic()
            self.stop.wait(HEARTBEAT_INTERVAL)

    # -- the node ------------------------------------------------------------

    def register_node(self) -> None:
        node = self.node
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    SANDBOX_LABEL: self.state.name,
                },
            },
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": list(node.pod_cidrs)},
        }
        try:
            self.core.create_node(body=as_body(body))
            log.info("registered node %s", node.name)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.patch_node_status()
        self.renew_lease()

    def patch_node_status(self) -> None:
        stamp = now()
        pressures = {
            "MemoryPressure": "KubeletHasSufficientMemory",
            "DiskPressure": "KubeletHasNoDiskPressure",
            "PIDPressure": "KubeletHasSufficientPID",
        }
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": reason,
                "message": "sandbox node",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
            for kind, reason in pressures.items()
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "sandbox kubelet is posting ready status",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
        )
        resources = {"cpu": "2", "memory": "8Gi", "pods": "1000"}
        status = {
            "conditions": conditions,
            "addresses": [
                *({"type": "InternalIP", "address": ip} for ip in self.node.ips),
                {"type": "Hostname", "address": self.node.name},
            ],
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {
                "machineID": self.node.name,
                "systemUUID": self.node.name,
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": "ambient-cni sandbox",
                "containerRuntimeVersion": "ambient-cni-sandbox://1",
                "kubeletVersion": self.kubernetes_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        # Keep Ready's lastTransitionTime stable across heartbeats.
        current = self.core.read_node_status(self.node.name, _preload_content=False)
        previous = {c["type"]: c for c in (raw(current).get("status", {}).get("conditions") or [])}
        for condition in conditions:
            old = previous.get(condition["type"])
            if old and old.get("status") == condition["status"]:
                condition["lastTransitionTime"] = old.get("lastTransitionTime", stamp)
        self.core.patch_node_status(
            self.node.name, body={"status": status}, _content_type=MERGE_PATCH
        )

    def renew_lease(self) -> None:
        spec = {
            "holderIdentity": self.node.name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": now_micro(),
        }
        try:
            self.coord.patch_namespaced_lease(
                self.node.name, LEASE_NAMESPACE, body={"spec": spec}, _content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease(
                LEASE_NAMESPACE,
                body=as_body(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.node.name, "namespace": LEASE_NAMESPACE},
                        "spec": spec,
                    }
                ),
            )

    # -- pods: the reconcile -----------------------------------------------------

    def sync(self, uid: str) -> None:
        pod = self.pods.get(uid)
        local = self.local.get(uid)
        if pod is None:
            if local:  # deleted (or force-deleted) from the API
                self.teardown(local, grace=0)
            self.reported.pop(uid, None)
            self.sandbox_failures.pop(uid, None)
            self.sandbox_retry_at.pop(uid, None)
            return
        if pod["metadata"].get("deletionTimestamp"):
            if local:
                self.teardown(local, grace=grace_seconds(pod))
            self._finish_deletion(pod)
            return
        phase = pod.get("status", {}).get("phase")
        if local is None:
            if phase in ("Succeeded", "Failed"):
                return  # terminal, and nothing of it left here
            local = self.start(pod)
            if local is None:
                return
        if local.image_pod:
            self._sync_images(pod, local)
            self.report(local)
            return
        self._handle_exit(pod, local)
        if local.restart_at is not None and time.monotonic() >= local.restart_at:
            local.restart_at = None
            self.launch(pod, local)
        self._check_readiness(local)
        self.report(local)

    def _check_readiness(self, local: LocalPod) -> None:
        runtime = local.runtime
        if runtime.state != "running" or runtime.ready or local.pid is None:
            return
        if local.ready_port is None or listens_on(local.pid, local.ready_port):
            runtime.ready = True
            runtime.ready_since = now()
            self.save(local)
            return
        # Poll quickly while the process starts, then at a probe-like period.
        starting = time.monotonic() - local.launched_at < READINESS_FAST_SECONDS
        self.queue.add_after(local.uid, 0.05 if starting else 1.0)

    def _finish_deletion(self, pod: Obj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiException):  # already gone
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body=as_body({"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}),
            )

    def start(self, pod: Obj) -> LocalPod | None:
        meta = pod["metadata"]
        uid = meta["uid"]
        wait = self.sandbox_retry_at.get(uid, 0.0) - time.monotonic()
        if wait > 0:  # backing off a failed sandbox; status events must not cut it short
            self.queue.add_after(uid, wait)
            return None
        host_network = uses_host_network(pod)
        container = app_container(pod)
        runtime = PodRuntime(
            start_time=now(),
            host_ip=self.node.ip,
            host_ips=self.node.ips,
            container=container.get("name", "main"),
            image=container.get("image", ""),
        )
        with self.lock:
            local = LocalPod(
                uid=uid,
                namespace=meta["namespace"],
                name=meta["name"],
                netns=self.node.netns if host_network else self.state.topology.pod_netns(uid),
                own_netns=not host_network,
                veth=None,
                ip=self.node.ip if host_network else "",
                ips=self.node.ips if host_network else (),
                runtime=runtime,
            )
            self.local[uid] = local
        self.save(local)  # before making anything, so a crash leaves a record to clean up
        if local.own_netns:
            try:
                network.create_netns(local.netns)
                local.ips = self.cni.add(self._sandbox(local))
                local.ip = local.ips[0]
                if self.state.topology.pod_network == "bridge":
                    network.forget_neighbours(self.node, local.ips)
            except (CniError, network.NetworkError, OSError) as exc:
                self._sandbox_failed(local, str(exc))
                return None
            self.sandbox_failures.pop(uid, None)
            self.sandbox_retry_at.pop(uid, None)
        runtime.pod_ip, runtime.pod_ips = local.ip, local.ips
        self.save(local)
        if ImagePods.eligible(pod):
            local.image_pod = True
            self.launch_images(pod, local)
        else:
            self.launch(pod, local)
        return local

    def _sandbox(self, local: LocalPod) -> SandboxPod:
        return SandboxPod(local.namespace, local.name, local.uid, local.netns)

    def _sandbox_failed(self, local: LocalPod, message: str) -> None:
        """As a kubelet: the sandbox goes, the pod stays ContainerCreating, an Event says
        why in the plugin's words, and another try comes after a backoff."""
        failures = self.sandbox_failures.get(local.uid, 0) + 1
        self.sandbox_failures[local.uid] = failures
        detail = f'failed to set up network for sandbox "{local.uid}": {message}'
        log.warning("%s/%s: %s", local.namespace, local.name, detail)
        self.teardown(local, grace=0)
        runtime = local.runtime
        runtime.state_reason = "ContainerCreating"
        runtime.state_message = detail
        self.report(LocalPod(**{**local.model_dump(), "runtime": runtime}))
        self._event(local, "FailedCreatePodSandBox", f"Failed to create pod sandbox: {detail}")
        backoff = min(SANDBOX_RETRY_S * 2 ** (failures - 1), SANDBOX_RETRY_MAX_S)
        self.sandbox_retry_at[local.uid] = time.monotonic() + backoff
        self.queue.add_after(local.uid, backoff)

    def _event(self, local: LocalPod, reason: str, message: str) -> None:
        stamp = now()
        body = {
            "metadata": {"generateName": f"{local.name}.", "namespace": local.namespace},
            "involvedObject": {
                "kind": "Pod",
                "namespace": local.namespace,
                "name": local.name,
                "uid": local.uid,
                "apiVersion": "v1",
            },
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "kubelet", "host": self.node.name},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(
                local.namespace, as_body(body), _preload_content=False
            )
        except ApiException as exc:
            log.warning(
                "event %s for %s/%s not recorded: %s", reason, local.namespace, local.name, exc
            )

    def sidecar_log(self, local: LocalPod) -> Path:
        """Where the pod's Envoy stand-in logs each connection it relays."""
        return self.records / sidecar_log_name(local.namespace, local.name, local.uid)

    def _start_sidecar(self, pod: Obj, local: LocalPod) -> str | None:
        """Start the pod's istio-proxy stand-in, if it has one and it is not running, and
        wait until it listens, as the app must not start before its proxy; why not, if not."""
        log_path = self.sidecar_log(local)
        run = sidecar_run(pod, python=sys.executable, log=str(log_path))
        if run is None:
            return None
        pid = local.sidecar_pid
        if pid and is_running(pid) and start_time(pid) == local.sidecar_pid_start:
            return None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), TAG_ENV: self.state.name}

        def spawn() -> subprocess.Popen[bytes]:
            with log_path.with_suffix(".log").open("ab") as out:
                return subprocess.Popen(
                    list(run.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd="/",
                    start_new_session=True,  # it drops to run.user itself, once loaded
                )

        try:
            proc = run_in_netns(local.netns, spawn)
        except OSError as exc:
            return f"cannot start container istio-proxy: {exc.strerror or exc}"
        local.sidecar_pid, local.sidecar_pid_start = proc.pid, start_time(proc.pid)
        self.save(local)
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped when it exits
        deadline = time.monotonic() + SIDECAR_START_SECONDS
        while not all(listens_on(proc.pid, port) for port in SIDECAR_PORTS):
            if proc.poll() is not None or time.monotonic() > deadline:
                return f"container istio-proxy did not listen on {SIDECAR_PORTS}"
            time.sleep(0.02)  # polled, with a deadline
        return None

    def launch(self, pod: Obj, local: LocalPod) -> None:
        runtime = local.runtime
        try:
            run = container_run(
                pod,
                pod_ip=local.ip,
                host_ip=self.node.ip,
                python=sys.executable,
                pod_ips=local.ips,
                host_ips=self.node.ips,
            )
        except PodSpecError as exc:
            self._fail(local, exc.reason, exc.message)
            return
        problem = self._start_sidecar(pod, local)
        if problem is not None:
            self._fail(local, "StartError", problem)
            return
        log_path = self.records / f"{local.namespace}_{local.name}_{local.uid}.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            TAG_ENV: self.state.name,
            **dict(run.env),
        }

        def spawn() -> subprocess.Popen[bytes]:
            with log_path.open("ab") as out:
                return subprocess.Popen(
                    list(run.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd="/",
                    start_new_session=True,
                )

        try:
            proc = run_in_netns(local.netns, spawn)
        except OSError as exc:
            detail = exc.strerror or str(exc)
            self._fail(
                local,
                "StartError",
                f"cannot start container {run.container}: exec {run.argv[0]!r}: {detail}",
            )
            return
        local.pid, local.pid_start = proc.pid, start_time(proc.pid)
        runtime.pid = proc.pid  # the container ID; kept after exit, as a runtime keeps it
        stamp = now()
        runtime.phase = "Running"
        runtime.state = "running"
        runtime.state_reason = runtime.state_message = None
        runtime.started_at = stamp
        local.ready_port = readiness_port(pod)
        local.launched_at = time.monotonic()
        runtime.ready = local.ready_port is None
        runtime.ready_since = stamp if runtime.ready else None
        runtime.exit_code = None
        self.save(local)
        log.info(
            "started %s/%s as pid %d in %s (%s)",
            local.namespace,
            local.name,
            proc.pid,
            local.netns,
            ", ".join(local.ips or (local.ip,)),
        )
        threading.Thread(target=self._wait_child, args=(local.uid, proc), daemon=True).start()

    def _wait_child(self, uid: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self.lock:
            self.exited[uid] = (proc.pid, code)
        self.queue.add(uid)

    def _watch_adopted(self, uid: str, pid: int, started: int | None) -> None:
        # Not our child: poll. Its exit code is lost with the kubelet that started it.
        while is_running(pid) and start_time(pid) == started and not self.stop.is_set():
            time.sleep(0.5)
        if not self.stop.is_set():
            with self.lock:
                self.exited[uid] = (pid, -1)
            self.queue.add(uid)

    def _handle_exit(self, pod: Obj, local: LocalPod) -> None:
        with self.lock:
            event = self.exited.pop(local.uid, None)
        if event is None or event[0] != local.pid:
            return
        _, code = event
        runtime = local.runtime
        stamp = now()
        runtime.state = "terminated"
        runtime.exit_code = code
        runtime.state_reason = "Completed" if code == 0 else "Error"
        runtime.state_message = None if code >= 0 else "exit status unknown (adopted process)"
        runtime.finished_at = stamp
        runtime.not_ready_since = stamp
        runtime.ready = False
        local.pid = local.pid_start = None
        log.info("%s/%s exited with %d", local.namespace, local.name, code)
        if restart_on_exit(pod, code):
            runtime.restart_count += 1
            delay = min(2.0 ** (runtime.restart_count - 1), MAX_BACKOFF)
            local.restart_at = time.monotonic() + delay
            runtime.state = "waiting"
            runtime.state_reason = "CrashLoopBackOff"
            runtime.state_message = f"back-off {delay:.0f}s restarting failed container"
            self.queue.add_after(local.uid, delay)
        else:
            runtime.phase = "Succeeded" if code == 0 else "Failed"
            self._release_network(local)
        self.save(local)

    def _fail(self, local: LocalPod, reason: str, message: str) -> None:
        """The container can never run as specified: the pod fails for good."""
        log.warning("%s/%s failed: %s: %s", local.namespace, local.name, reason, message)
        runtime = local.runtime
        stamp = now()
        runtime.phase = "Failed"
        runtime.pod_reason, runtime.pod_message = reason, message
        runtime.state = "terminated"
        runtime.state_reason, runtime.state_message = reason, message
        runtime.exit_code = 128
        runtime.finished_at = runtime.not_ready_since = stamp
        self._release_network(local)
        self.save(local)

    def _release_network(self, local: LocalPod) -> None:
        if local.own_netns:
            for failure in self.cni.delete(self._sandbox(local)):
                log.warning("CNI DEL of %s/%s: %s", local.namespace, local.name, failure)
            network.delete_netns(local.netns)

    def teardown(self, local: LocalPod, *, grace: int) -> None:
        """Stop the pod's process, remove its namespace, forget it."""
        if local.pid and is_running(local.pid) and start_time(local.pid) == local.pid_start:
            terminate_group(local.pid, grace=float(grace))
        pid = local.sidecar_pid
        if pid and is_running(pid) and start_time(pid) == local.sidecar_pid_start:
            terminate_group(pid, grace=1.0)
        if local.image_pod:
            self.images.stop(local.runtime.containers, float(grace))
            self.images.forget(local.uid)
            self.plans.pop(local.uid, None)
        self._release_network(local)
        with self.lock:
            self.local.pop(local.uid, None)
            self.exited.pop(local.uid, None)
        self._record_path(local.uid).unlink(missing_ok=True)
        log.info("removed %s/%s", local.namespace, local.name)

    # -- image pods ------------------------------------------------------------

    def launch_images(self, pod: Obj, local: LocalPod) -> None:
        """Every container of the pod from its image, its volumes made first; a volume that
        cannot be made yet (a ConfigMap not there) is retried, as a kubelet retries."""
        runtime = local.runtime
        try:
            volumes = self.images.make_volumes(pod, local.ips, self.node.ips)
            plans = self.images.plans(
                pod, f"/run/netns/{local.netns}", local.ips, self.node.ips, volumes
            )
        except PodSpecError as exc:
            self._fail(local, exc.reason, exc.message)
            return
        except (VolumeError, OSError) as exc:
            runtime.state_reason, runtime.state_message = "ContainerCreating", str(exc)
            self._event(local, "FailedMount", f"MountVolume.SetUp failed: {exc}")
            local.restart_at = time.monotonic() + 2.0
            self.queue.add_after(local.uid, 2.0)
            self.save(local)
            return
        self.plans[local.uid] = {p.name: p for p in plans}
        runtime.containers = [ContainerState(name=p.name, image=p.image) for p in plans]
        for spec, state in zip(plans, runtime.containers, strict=True):
            self._start_container(local, spec, state)
        runtime.phase = "Running"
        runtime.state = "running"
        runtime.started_at = now()
        runtime.ready = False
        local.restart_at = None
        self.save(local)
        self.queue.add(local.uid)

    def _start_container(self, local: LocalPod, spec: ContainerPlan, state: ContainerState) -> None:
        uid = local.uid
        try:
            self.images.start(spec, state, lambda: self.queue.add(uid))
        except container_runtime.RuntimeError_ as exc:
            state.state, state.reason, state.message = "waiting", "CreateContainerError", str(exc)
            state.restart_count += 1
            state.restart_at = time.monotonic() + backoff(state.restart_count)
            log.warning("%s/%s %s: %s", local.namespace, local.name, spec.name, exc)
            return
        log.info(
            "started %s/%s container %s (pid %d) in %s",
            local.namespace,
            local.name,
            spec.name,
            state.pid,
            local.netns,
        )

    def _sync_images(self, pod: Obj, local: LocalPod) -> None:
        runtime = local.runtime
        if not runtime.containers:  # its volumes are not made yet
            if local.restart_at is not None and time.monotonic() >= local.restart_at:
                self.launch_images(pod, local)
            return
        plans = self.plans.get(local.uid)
        if plans is None:  # adopted after a restart: the plans are pure, make them again
            volumes = self.images.make_volumes(pod, local.ips, self.node.ips)
            made = self.images.plans(
                pod, f"/run/netns/{local.netns}", local.ips, self.node.ips, volumes
            )
            plans = self.plans[local.uid] = {p.name: p for p in made}
        clock = time.monotonic()
        wait = 10.0
        for state in runtime.containers:
            code = self.images.take_exit(state.id) if state.id else None
            if code is not None and state.state == "running":
                state.state, state.exit_code, state.ready = "terminated", code, False
                state.reason = "Completed" if code == 0 else "Error"
                state.finished_at = now()
                log.info("%s/%s %s exited with %d", local.namespace, local.name, state.name, code)
                if restart_on_exit(pod, code):
                    state.restart_count += 1
                    state.restart_at = clock + backoff(state.restart_count)
            if state.restart_at is not None:
                if clock >= state.restart_at:
                    self._start_container(local, plans[state.name], state)
                else:
                    wait = min(wait, state.restart_at - clock)
        address = local.ip if local.own_netns else self.node.ip
        _, probe_wait, restart = self.images.probe_all(
            plans, runtime.containers, self.node.netns, address
        )
        wait = min(wait, probe_wait)
        for name in restart:  # liveness failed: killed and started again, as a kubelet does
            state = next(c for c in runtime.containers if c.name == name)
            log.warning("%s/%s %s failed its liveness probe", local.namespace, local.name, name)
            self.images.stop([state], 1.0)
            state.restart_count += 1
            self._start_container(local, plans[name], state)
        if all(c.state == "terminated" and c.restart_at is None for c in runtime.containers):
            failed = any(c.exit_code for c in runtime.containers)
            runtime.phase = "Failed" if failed else "Succeeded"
            runtime.state = "terminated"
            self._release_network(local)
        ready = all(c.ready and c.state == "running" for c in runtime.containers)
        if ready != runtime.ready:
            runtime.ready = ready
            stamp = now()
            if ready:
                runtime.ready_since = stamp
            else:
                runtime.not_ready_since = stamp
        self.save(local)
        if runtime.phase == "Running":
            self.queue.add_after(local.uid, wait)

    def _adopt_images(self, local: LocalPod) -> bool:
        """After a restart: keep an image pod whose containers still run, watching them."""
        running = [c for c in local.runtime.containers if c.id and container_runtime.pid(c.id)]
        if not running:
            return False
        self.local[local.uid] = local
        for state in running:
            uid, container = local.uid, state.id

            def watch(uid: str = uid, container: str = container) -> None:
                code = container_runtime.wait(container)
                with self.images.lock:
                    self.images.exited[container] = code
                self.queue.add(uid)

            threading.Thread(target=watch, daemon=True).start()
        log.info("adopted %s/%s (%d containers)", local.namespace, local.name, len(running))
        return True

    # -- status ------------------------------------------------------------------

    def report(self, local: LocalPod) -> None:
        status = render_status(local.runtime)
        if self.reported.get(local.uid) == status:
            return
        try:
            self.core.patch_namespaced_pod_status(
                local.name, local.namespace, body={"status": status}, _content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        self.reported[local.uid] = status

    # -- records ---------------------------------------------------------------

    def _record_path(self, uid: str) -> Path:
        return self.records / f"{uid}.json"

    def save(self, local: LocalPod) -> None:
        path = self._record_path(local.uid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(local.model_dump_json())
        tmp.replace(path)

    def adopt_records(self) -> None:
        """After a restart: keep pods whose process still runs; clean up the rest."""
        for path in sorted(self.records.glob("*.json")):
            try:
                local = LocalPod.model_validate_json(path.read_text())
            except ValueError:
                path.unlink(missing_ok=True)
                continue
            if local.image_pod and self._adopt_images(local):
                continue
            alive = (
                local.pid is not None
                and is_running(local.pid)
                and start_time(local.pid) == local.pid_start
            )
            if alive and local.pid is not None:
                self.local[local.uid] = local
                threading.Thread(
                    target=self._watch_adopted,
                    args=(local.uid, local.pid, local.pid_start),
                    daemon=True,
                ).start()
                log.info("adopted %s/%s (pid %d)", local.namespace, local.name, local.pid)
            elif local.runtime.phase in ("Succeeded", "Failed"):
                self.local[local.uid] = local  # keeps reporting its terminal status
            else:
                self.teardown(local, grace=0)  # half-made or dead: the next sync starts it anew


def api_service_env(node_ip: str) -> list[tuple[str, str]]:
    """What a kubelet tells every container about the `kubernetes` Service; here its
    address is the apiproxy's on the underlay, in the node's primary family."""
    host = API_ENDPOINT_IPS[6 if ":" in node_ip else 4]
    port = str(API_ENDPOINT_PORT)
    url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    return [
        ("KUBERNETES_SERVICE_HOST", host),
        ("KUBERNETES_SERVICE_PORT", port),
        ("KUBERNETES_SERVICE_PORT_HTTPS", port),
        ("KUBERNETES_PORT", url),
        ("KUBERNETES_PORT_443_TCP", url),
        ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
        ("KUBERNETES_PORT_443_TCP_PORT", port),
        ("KUBERNETES_PORT_443_TCP_ADDR", host),
    ]


def _call_process_kubelet() -> None:
    """Name this process `kubelet`, as a node's kubelet is named, so an agent finds its
    UID the way it does on a real node (a scan of /proc for that name)."""
    pr_set_name = 15
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_name, b"kubelet", 0, 0, 0)


def main(sandbox: str, node: str) -> None:
    _call_process_kubelet()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    state = load_state(sandbox)
    if state is None:
        raise SystemExit(f"sandbox {sandbox!r} has no state file; is it up?")
    try:
        version = parse_pins((gomod_dir() / "go.mod").read_text()).kubernetes
    except Exception:
        version = KUBELET_VERSION_FALLBACK
    Kubelet(state, node, version).run()
