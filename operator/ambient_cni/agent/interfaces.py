"""The agent's seams to the world outside the kernel: ztunnel, the API server, pod netns lookup;
and the kernel's word that rules changed (KernelChanges).

Each is a small Protocol with one real implementation (ZdsServer, KubePodApi,
KubeStatusWriter, KubeNodeEvents, PodNetnsResolver, HeldNetns); tests pass fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ambient_cni.api.models import Workload
from ambient_cni.zds import WorkloadInfo

from .events import EventNote


class ZdsError(RuntimeError):
    """ztunnel did not take a message: not connected, NACKed, timed out or gone."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Ztunnel(Protocol):
    """The node's ztunnel, reached over ZDS."""

    @property
    def connected(self) -> bool: ...

    @property
    def connected_since(self) -> float | None:
        """Wall time the newest live session started."""
        ...

    def add(self, uid: str, info: WorkloadInfo, netns_path: Path) -> None:
        """ztunnel should hold this pod from now on; raises ZdsError if none took it yet."""
        ...

    def holds(self, uid: str) -> bool: ...

    def delete(self, uid: str) -> None:
        """ztunnel should no longer hold this pod; never raises."""
        ...


class PodApi(Protocol):
    """The agent's view of its pods in the API server."""

    def annotate(self, workload: Workload, value: str | None) -> None:
        """Make the pod's `ambient.istio.io/redirection` annotation `value` (None: remove ours).
        Never overwrites a user's `disabled`; a pod that is gone or replaced is left alone."""
        ...

    def has_sandbox(self, workload: Workload) -> bool:
        """Whether this very pod (same UID) may still have its sandbox, and so its netns:
        it is in the API server and has not terminated (the kubelet tears a finished pod's
        sandbox down)."""
        ...


class PodSource(Protocol):
    """Pods and namespaces as the API server has them now, for a decision at CNI ADD."""

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod's API JSON, None if there is no such pod."""
        ...

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        """The namespace's labels, None if there is no such namespace."""
        ...


class StatusWriter(Protocol):
    def write(self, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the node's AmbientNodeConfig status; returns the object as the server
        now holds it, None if it is gone. Raises StatusWriteError when the API server
        refuses or cannot be reached."""
        ...


class StatusWriteError(RuntimeError):
    pass


class NodeEvents(Protocol):
    """Kubernetes Events on the node's AmbientNodeConfig."""

    def record(self, uid: str, notes: Sequence[EventNote]) -> None:
        """Record `notes` on the object with `uid` (aggregated, rate-limited, posted later);
        never blocks, never raises."""
        ...


class NetnsNotFoundError(LookupError):
    pass


class NetnsHandles(Protocol):
    """Open handles on enrolled pods' network namespaces, as Istio's agent keeps them: a pod's
    rules can be taken out even after its netns was unmounted while its process lives."""

    def hold(self, uid: str, netns: Path) -> Path:
        """Hold `netns` for the pod (again, if it is another namespace now); returns a path
        to it that lasts as long as the hold."""
        ...

    def held(self, uid: str) -> Path | None: ...

    def release(self, uid: str) -> None: ...


class NetnsResolver(Protocol):
    def resolve(self, uid: str, ips: Iterable[str]) -> Path:
        """The pod's network namespace; raises NetnsNotFoundError."""
        ...


class NetnsReports(Protocol):
    """Where the CNI plugin said a pod's network namespace is."""

    def report(self, uid: str, netns: Path) -> None: ...

    def forget(self, uid: str) -> None: ...


# Told the key of a watched namespace whose rules changed (from a thread of the source's).
OnChange = Callable[[str], None]


class KernelChanges(Protocol):
    """Where the kernel announces changes to a backend's rules, namespace by namespace.

    nftables (and iptables-nft, nftables underneath) announce every committed change in the
    namespace where it happens; legacy iptables announces nothing (`announces` False: the
    agent keeps polling). A watched namespace is known by the caller's key (a pod UID, or
    "host"); `on_change` is told the key of one whose rules changed, from the source's own
    thread, and never for a change the agent itself made when that can be told apart (else
    once more: a re-check that finds nothing wrong costs a read).
    """

    @property
    def announces(self) -> bool: ...

    def start(self, on_change: OnChange) -> None: ...

    def watch(self, key: str, netns: Path | None) -> bool:
        """Tell of changes in `netns` (None: the agent's own) as `key`, instead of any
        namespace watched as `key` before; False when it cannot be watched (poll it)."""
        ...

    def unwatch(self, key: str) -> None: ...

    def close(self) -> None: ...


class NoAnnouncements:
    """KernelChanges of a backend the kernel says nothing about (legacy iptables): every
    namespace is polled."""

    @property
    def announces(self) -> bool:
        return False

    def start(self, on_change: OnChange) -> None:
        pass

    def watch(self, key: str, netns: Path | None) -> bool:  # noqa: ARG002 - the seam's
        return False

    def unwatch(self, key: str) -> None:
        pass

    def close(self) -> None:
        pass
