"""What the simulated kubelet runs for a pod, and the status it reports: pure functions.

Pods are plain dicts in the API's JSON form (camelCase). The first container
runs (the first but `istio-proxy`, in a sidecar pod). With no `command` it runs
the sandbox's HTTP echo server (the "image" every sandbox pod has); `args` are
appended either way, as the container runtime would append them to the image's
entrypoint. An `istio-proxy` container of image `sandbox/sidecar` runs the
Envoy stand-in (sidecar.py) as its user and group, before the app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

DEFAULT_PORT = 8080
ECHO_MODULE = "ambient_cni_sandbox.echo"

# fieldRef paths the sandbox can resolve for env vars (the downward API subset that matters here).
FIELD_REFS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.podIP",
    "status.podIPs",
    "status.hostIP",
    "status.hostIPs",
)

Pod = Mapping[str, Any]


class PodSpecError(ValueError):
    """The pod cannot be run as specified; `reason` is a kubelet-style CamelCase reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class ContainerRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    container: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    port: int


SIDECAR_CONTAINER = "istio-proxy"
SIDECAR_IMAGE = "sandbox/sidecar"
SIDECAR_MODULE = "ambient_cni_sandbox.sidecar"
SIDECAR_PORTS = (15001, 15006)


def app_container(pod: Pod) -> Mapping[str, Any]:
    """The container that runs (the first but istio-proxy), or {} if there is none."""
    try:
        return _first_container(pod)
    except PodSpecError:
        return {}


def _first_container(pod: Pod) -> Mapping[str, Any]:
    containers = [
        c for c in pod.get("spec", {}).get("containers") or [] if c.get("name") != SIDECAR_CONTAINER
    ]
    if not containers:
        raise PodSpecError("CreateContainerConfigError", "the pod has no containers")
    first: Mapping[str, Any] = containers[0]
    return first


def sidecar_log_name(namespace: str, name: str, uid: str) -> str:
    """The file (in the node's pod records) where a pod's Envoy stand-in logs connections."""
    return f"{namespace}_{name}_{uid}.sidecar.jsonl"


class SidecarRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    argv: tuple[str, ...]
    user: int
    group: int


def sidecar_run(pod: Pod, *, python: str, log: str) -> SidecarRun | None:
    """The Envoy stand-in for the pod's `istio-proxy` container, if it has one of the
    sandbox's image; as its securityContext's user and group (1337 unless said)."""
    spec = pod.get("spec", {})
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    proxy = next((c for c in containers if c.get("name") == SIDECAR_CONTAINER), None)
    if proxy is None or proxy.get("image") != SIDECAR_IMAGE:
        return None
    security = proxy.get("securityContext") or {}
    annotations = pod.get("metadata", {}).get("annotations") or {}
    tproxy = annotations.get("sidecar.istio.io/interceptionMode") == "TPROXY"
    user = 1337 if security.get("runAsUser") is None else int(security["runAsUser"])
    group = 1337 if security.get("runAsGroup") is None else int(security["runAsGroup"])
    ids = ("--user", str(user), "--group", str(group))
    return SidecarRun(
        argv=(python, "-m", SIDECAR_MODULE, "--log", log, *ids, *(["--tproxy"] if tproxy else [])),
        user=user,
        group=group,
    )


def container_port(pod: Pod) -> int:
    for port in _first_container(pod).get("ports") or []:
        if port.get("protocol", "TCP") == "TCP" and port.get("containerPort"):
            return int(port["containerPort"])
    return DEFAULT_PORT


def field_value(pod: Pod, path: str, pod_ips: Sequence[str], host_ips: Sequence[str]) -> str:
    # The plural fields are comma-separated lists, the primary family's address first.
    if path in ("status.podIP", "status.podIPs"):
        return pod_ips[0] if path == "status.podIP" else ",".join(pod_ips)
    if path in ("status.hostIP", "status.hostIPs"):
        return host_ips[0] if path == "status.hostIP" else ",".join(host_ips)
    section, key = path.split(".", 1)
    value = pod.get(section, {}).get(key)
    if path == "spec.serviceAccountName" and not value:
        value = "default"
    return "" if value is None else str(value)


def resolve_env(
    pod: Pod, container: Mapping[str, Any], pod_ips: Sequence[str], host_ips: Sequence[str]
) -> list[tuple[str, str]]:
    """A container's `env`: values as written, fieldRefs from the downward API."""
    env = []
    for item in container.get("env") or []:
        name = item.get("name")
        if not name:
            continue
        if "value" in item or "valueFrom" not in item:
            env.append((name, str(item.get("value", ""))))
            continue
        path = (item["valueFrom"].get("fieldRef") or {}).get("fieldPath")
        if path not in FIELD_REFS:
            raise PodSpecError(
                "CreateContainerConfigError",
                f"env {name}: the sandbox resolves only fieldRef {', '.join(FIELD_REFS)}",
            )
        env.append((name, field_value(pod, path, pod_ips, host_ips)))
    return env


def container_run(
    pod: Pod,
    *,
    pod_ip: str,
    host_ip: str,
    python: str,
    pod_ips: Sequence[str] = (),
    host_ips: Sequence[str] = (),
) -> ContainerRun:
    """The process for the pod's first container: argv, environment, serving port.
    `pod_ips`/`host_ips`: every family's address (dual-stack), `pod_ip`/`host_ip` first."""
    pod_ips = tuple(pod_ips) or (pod_ip,)
    host_ips = tuple(host_ips) or (host_ip,)
    container = _first_container(pod)
    port = container_port(pod)
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    # Without a command, the sandbox "image" runs: the echo server.
    entrypoint = command or [python, "-m", ECHO_MODULE, "--port", str(port)]
    argv = [*entrypoint, *args]

    env: dict[str, str] = {"HOSTNAME": str(pod.get("metadata", {}).get("name", ""))}
    env.update(resolve_env(pod, container, pod_ips, host_ips))
    return ContainerRun(
        container=str(container.get("name", "main")),
        argv=tuple(argv),
        env=tuple(sorted(env.items())),
        port=port,
    )


def readiness_port(pod: Pod) -> int | None:
    """The TCP port whose listener makes the pod Ready, or None for Ready on start.

    A tcpSocket or httpGet readiness probe names it; the sandbox's echo "image"
    carries an implicit one on its serving port, so Ready means it answers.
    """
    container = _first_container(pod)
    probe = container.get("readinessProbe") or {}
    for kind in ("tcpSocket", "httpGet"):
        port = (probe.get(kind) or {}).get("port")
        if isinstance(port, int):
            return port
    if not container.get("command"):
        return container_port(pod)
    return None


def uses_host_network(pod: Pod) -> bool:
    return bool(pod.get("spec", {}).get("hostNetwork"))


def restart_on_exit(pod: Pod, exit_code: int) -> bool:
    policy = pod.get("spec", {}).get("restartPolicy", "Always")
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def grace_seconds(pod: Pod, default: int = 30) -> int:
    meta = pod.get("metadata", {})
    value = meta.get("deletionGracePeriodSeconds")
    if value is None:
        value = pod.get("spec", {}).get("terminationGracePeriodSeconds", default)
    return max(0, int(value))


# -- status -------------------------------------------------------------------

ContainerStateName = Literal["waiting", "running", "terminated"]


class ContainerState(BaseModel):
    """One container of an image pod, as the kubelet tracks it (and reports it)."""

    name: str
    image: str
    id: str = ""
    pid: int = 0
    state: ContainerStateName = "waiting"
    reason: str | None = None
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    ready: bool = False
    started_mono: float = 0.0
    next_probe: float = 0.0
    readiness_streak: int = 0
    liveness_failures: int = 0
    started: bool = True  # its startup probe succeeded (True when it has none)
    startup_failures: int = 0
    restart_at: float | None = None


class PodRuntime(BaseModel):
    """What the kubelet knows of one pod's sandbox and process; status is rendered from it."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = "Pending"
    pod_ip: str | None = None  # the first family's address, as podIP
    host_ip: str | None = None
    pod_ips: tuple[str, ...] = ()  # every family's, pod_ip first (empty: just pod_ip)
    host_ips: tuple[str, ...] = ()
    start_time: str | None = None
    container: str = "main"
    image: str = ""
    state: ContainerStateName = "waiting"
    state_reason: str | None = None
    state_message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    pid: int | None = None
    ready: bool = False  # the container passed its readiness check since it started
    ready_since: str | None = None
    not_ready_since: str | None = None
    pod_reason: str | None = None
    pod_message: str | None = None
    # An image pod's containers, each its own (empty: the one process above).
    containers: list[ContainerState] = []


def _condition(kind: str, ok: bool, since: str | None, reason: str | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": since,
    }
    if not ok and reason:
        condition["reason"] = reason
    return condition


def render_status(runtime: PodRuntime) -> dict[str, Any]:
    """The pod `status` the kubelet writes for this runtime (a full replacement of its fields)."""
    if runtime.containers:
        ready = runtime.phase == "Running" and all(c.ready for c in runtime.containers)
        statuses = [_container_status(c, "podman") for c in runtime.containers]
    else:
        ready = runtime.phase == "Running" and runtime.state == "running" and runtime.ready
        process = ContainerState(
            name=runtime.container,
            image=runtime.image,
            id=str(runtime.pid) if runtime.pid else "",
            state=runtime.state,
            reason=runtime.state_reason,
            message=runtime.state_message,
            started_at=runtime.started_at,
            finished_at=runtime.finished_at,
            exit_code=runtime.exit_code,
            restart_count=runtime.restart_count,
            ready=ready,
        )
        statuses = [_container_status(process, "sandbox")]
    since = runtime.ready_since if ready else (runtime.not_ready_since or runtime.start_time)
    status: dict[str, Any] = {
        "phase": runtime.phase,
        "reason": runtime.pod_reason,
        "message": runtime.pod_message,
        "startTime": runtime.start_time,
        "conditions": [
            _condition("PodReadyToStartContainers", runtime.pod_ip is not None, runtime.start_time),
            _condition("Initialized", True, runtime.start_time),
            _condition("ContainersReady", ready, since, "ContainersNotReady"),
            _condition("Ready", ready, since, "ContainersNotReady"),
            _condition("PodScheduled", True, runtime.start_time),
        ],
        "containerStatuses": statuses,
    }
    # podIPs/hostIPs: one address per family, the one in podIP/hostIP first (the API checks).
    if runtime.host_ip:
        status["hostIP"] = runtime.host_ip
        status["hostIPs"] = [{"ip": ip} for ip in runtime.host_ips or (runtime.host_ip,)]
    if runtime.pod_ip:
        status["podIP"] = runtime.pod_ip
        status["podIPs"] = [{"ip": ip} for ip in runtime.pod_ips or (runtime.pod_ip,)]
    return status


def _container_status(container: ContainerState, scheme: str) -> dict[str, Any]:
    """One container, as a kubelet reports it (`scheme`: its runtime's, in its ID)."""
    state: dict[str, Any]
    if container.state == "running":
        state = {"running": {"startedAt": container.started_at}}
    elif container.state == "terminated":
        state = {
            "terminated": {
                "exitCode": container.exit_code if container.exit_code is not None else 0,
                "reason": container.reason,
                "message": container.message,
                "startedAt": container.started_at,
                "finishedAt": container.finished_at,
                "containerID": f"{scheme}://{container.id}" if container.id else None,
            }
        }
    else:
        state = {
            "waiting": {
                "reason": container.reason or "ContainerCreating",
                "message": container.message,
            }
        }
    found: dict[str, Any] = {
        "name": container.name,
        "image": container.image,
        "imageID": "",
        "ready": container.ready and container.state == "running",
        "started": container.state == "running",
        "restartCount": container.restart_count,
        "state": state,
    }
    if container.id and container.state == "running":
        found["containerID"] = f"{scheme}://{container.id}"
    return found
