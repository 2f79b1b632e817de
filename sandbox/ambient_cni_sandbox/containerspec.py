"""How the sandbox kubelet runs a pod's containers from images, as a kubelet with a CRI
runtime would: `podman run` arguments from the pod's spec (pure functions).

What is honoured: the container's command and args (over the image's entrypoint and
command), `env` with values and the downward API's fieldRefs, the pod's and the
container's `securityContext` (user, group, non-root check, privileged, capabilities, a
read-only root filesystem, no new privileges), `volumeMounts` (read-only, subPath,
HostToContainer and Bidirectional propagation) of volumes the kubelet has made into host
directories, and readiness, liveness and startup probes (httpGet, tcpSocket, exec).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .podspec import Pod, PodSpecError, resolve_env

ProbeKind = Literal["http", "tcp", "exec"]

# The volume kinds the kubelet makes (anything else is refused as the pod's error).
VOLUME_KINDS = ("hostPath", "emptyDir", "configMap", "secret", "projected", "downwardAPI")


class Probe(BaseModel):
    """A readiness, liveness or startup probe, with Kubernetes' defaults filled in."""

    model_config = ConfigDict(frozen=True)

    kind: ProbeKind
    port: int = 0
    path: str = "/"
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1


class ContainerPlan(BaseModel):
    """One container of the pod, ready to run."""

    model_config = ConfigDict(frozen=True)

    name: str
    image: str
    run_args: tuple[str, ...]  # `podman run` arguments after `run`, image and command included
    readiness: Probe | None = None
    liveness: Probe | None = None
    startup: Probe | None = None  # until it succeeds, no other probe runs


def containers(pod: Pod) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = list(pod.get("spec", {}).get("containers") or [])
    return found


def images_of(pod: Pod) -> list[str]:
    return [str(c.get("image", "")) for c in containers(pod)]


def _port(container: Mapping[str, Any], value: Any) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(value, int):
        return value
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise PodSpecError("CreateContainerConfigError", f"probe port {value!r} names no port")


def probe(container: Mapping[str, Any], key: str) -> Probe | None:
    spec = container.get(key)
    if not spec:
        return None
    timing = Probe(
        kind="tcp",
        initial_delay=float(spec.get("initialDelaySeconds", 0)),
        period=float(spec.get("periodSeconds", 10)),
        timeout=float(spec.get("timeoutSeconds", 1)),
        failure_threshold=int(spec.get("failureThreshold", 3)),
        success_threshold=int(spec.get("successThreshold", 1)),
    )
    if "httpGet" in spec:
        get = spec["httpGet"]
        return timing.model_copy(
            update={
                "kind": "http",
                "port": _port(container, get.get("port")),
                "path": get.get("path", "/"),
            }
        )
    if "tcpSocket" in spec:
        return timing.model_copy(update={"port": _port(container, spec["tcpSocket"].get("port"))})
    if "exec" in spec:
        command = tuple(str(c) for c in spec["exec"].get("command") or ())
        return timing.model_copy(update={"kind": "exec", "command": command})
    raise PodSpecError("CreateContainerConfigError", f"{key}: no httpGet, tcpSocket or exec")


def _security(pod: Pod, container: Mapping[str, Any], image_user: str) -> list[str]:
    """The pod's securityContext under the container's, as `podman run` flags."""
    pod_level = pod.get("spec", {}).get("securityContext") or {}
    own = container.get("securityContext") or {}

    def setting(key: str) -> Any:
        return own.get(key, pod_level.get(key))

    user, group = setting("runAsUser"), setting("runAsGroup")
    args = []
    if user is not None:
        args.append(f"--user={user}" + (f":{group}" if group is not None else ""))
    elif group is not None:
        args.append(f"--group-add={group}")
    if setting("runAsNonRoot"):
        effective = str(user) if user is not None else (image_user.split(":", maxsplit=1)[0] or "0")
        if effective in ("0", "root"):
            raise PodSpecError(
                "CreateContainerConfigError",
                "container has runAsNonRoot and image will run as root",
            )
    if own.get("privileged"):
        args.append("--privileged")
    else:
        capabilities = own.get("capabilities") or {}
        for cap in capabilities.get("drop") or []:
            args.append("--cap-drop=all" if cap == "ALL" else f"--cap-drop={cap}")
        args += [f"--cap-add={cap}" for cap in capabilities.get("add") or []]
    if own.get("readOnlyRootFilesystem"):
        # As a kubelet: read-only is all of it, no runtime-made writable /tmp or /run.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if own.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    return args


PROPAGATION = {"HostToContainer": "rslave", "Bidirectional": "rshared"}


def _mounts(container: Mapping[str, Any], volume_dirs: Mapping[str, str]) -> list[str]:
    args = []
    for mount in container.get("volumeMounts") or []:
        name = mount.get("name")
        if name not in volume_dirs:
            raise PodSpecError(
                "CreateContainerConfigError", f"volumeMount {name!r} names no volume of the pod"
            )
        source = volume_dirs[name]
        if mount.get("subPath"):
            source = f"{source.rstrip('/')}/{mount['subPath']}"
        options = ["ro" if mount.get("readOnly") else "rw"]
        propagation = PROPAGATION.get(mount.get("mountPropagation", ""))
        if propagation:
            options.append(propagation)
        args.append(f"--volume={source}:{mount['mountPath']}:{','.join(options)}")
    return args


def plan(
    pod: Pod,
    container: Mapping[str, Any],
    *,
    name: str,
    netns_path: str,
    pod_ips: Sequence[str],
    host_ips: Sequence[str],
    volume_dirs: Mapping[str, str],
    image_user: str,
    log_path: str,
    service_env: Sequence[tuple[str, str]] = (),
) -> ContainerPlan:
    """`podman run` of one container: in `netns_path`, as its securityContext says, with
    its env, its mounts of the pod's volumes (`volume_dirs`: volume name -> host
    directory), its log in `log_path` (the k8s-file format kubelets read), and
    `service_env` (KUBERNETES_SERVICE_HOST and PORT) before its own env."""
    meta = pod.get("metadata", {})
    args = [
        "--detach",
        f"--name={name}",
        "--pull=never",
        f"--network=ns:{netns_path}",
        "--log-driver=k8s-file",
        f"--log-opt=path={log_path}",
        f"--stop-timeout={int(pod.get('spec', {}).get('terminationGracePeriodSeconds', 30))}",
        f"--label=io.kubernetes.pod.uid={meta.get('uid', '')}",
        f"--label=io.kubernetes.pod.namespace={meta.get('namespace', '')}",
        f"--label=io.kubernetes.pod.name={meta.get('name', '')}",
        f"--label=io.kubernetes.container.name={container.get('name', '')}",
    ]
    if not pod.get("spec", {}).get("hostNetwork"):
        args.append(f"--hostname={meta.get('name', '')}")
    if pod.get("spec", {}).get("hostPID"):
        args.append("--pid=host")
    args += _security(pod, container, image_user)
    # The API server's whereabouts first, as a kubelet puts service variables first.
    env = [*service_env, *resolve_env(pod, container, pod_ips, host_ips)]
    args += [f"--env={key}={value}" for key, value in env]
    args += _mounts(container, volume_dirs)
    command = [str(c) for c in container.get("command") or []]
    if command:
        args.append(f"--entrypoint={json.dumps(command)}")
    args.append(str(container.get("image", "")))
    args += [str(a) for a in container.get("args") or []]
    return ContainerPlan(
        name=str(container.get("name", "")),
        image=str(container.get("image", "")),
        run_args=tuple(args),
        readiness=probe(container, "readinessProbe"),
        liveness=probe(container, "livenessProbe"),
        startup=probe(container, "startupProbe"),
    )


def volume_kind(volume: Mapping[str, Any]) -> str:
    kinds = [kind for kind in VOLUME_KINDS if kind in volume]
    if not kinds:
        raise PodSpecError(
            "CreateContainerConfigError",
            f"volume {volume.get('name')!r}: the sandbox makes only {', '.join(VOLUME_KINDS)}",
        )
    return kinds[0]


# Host paths every sandbox node shares with the machine, as the node netns model needs:
# processes (/proc) and network namespaces are the machine's.
SHARED_HOST_PATHS = ("/proc", "/var/run/netns", "/run/netns", "/sys")


def host_path(path: str, node_root: str, special: Mapping[str, str]) -> str:
    """Where a hostPath volume of a pod on this node is on the machine: shared paths as
    they are, the node's own directories (`special`: its CNI dirs, its ZDS socket dir) where
    they are, anything else under the node's own root, so two nodes never share one."""
    clean = "/" + path.strip("/")
    for shared in SHARED_HOST_PATHS:
        if clean == shared or clean.startswith(shared + "/"):
            return clean
    for prefix, target in special.items():
        if clean == prefix or clean.startswith(prefix + "/"):
            return target + clean[len(prefix) :]
    return node_root.rstrip("/") + clean
