"""Does our DaemonSet still exist? How the agent and install-cni tell an uninstall from an
upgrade at SIGTERM.

`helm uninstall` deletes the DaemonSet, then its Role and ServiceAccount,
all before the kubelet sends the DaemonSet's containers SIGTERM. By then a GET
of the DaemonSet is refused (401 or 403), so the agent watches the DaemonSet
while it still may, and remembers a deletion it saw.
"""

from __future__ import annotations

import functools
import logging
import threading

from kubernetes.client import ApiClient, AppsV1Api
from kubernetes.client.exceptions import ApiException

from ambient_cni.kube import raw
from ambient_cni.reflector import Reflector, name_of

log = logging.getLogger(__name__)


class DaemonSetWatch:
    def __init__(self, api: ApiClient, daemonset: str):
        self.namespace, _, self.name = daemonset.partition("/")
        if not self.namespace or not self.name:
            raise ValueError(f"--daemonset wants NAMESPACE/NAME, got {daemonset!r}")
        self._apps = AppsV1Api(api)
        self._seen = False
        self._deleted = threading.Event()
        self._reflector: Reflector = Reflector(
            f"daemonset@{daemonset}",
            functools.partial(self._apps.list_namespaced_daemon_set, self.namespace),
            self._changed,
            key=name_of,
            field_selector=f"metadata.name={self.name}",
        )

    def start(self, stop: threading.Event) -> None:
        self._reflector.start(stop)

    def _changed(self, key: str) -> None:
        found = self._reflector.get(key)
        if found is None:
            if self._seen:
                self._deleted.set()
            return
        self._seen = True
        if found["metadata"].get("deletionTimestamp"):
            self._deleted.set()

    def going(self) -> tuple[bool, str]:
        """Whether the DaemonSet is deleted or being deleted, and why we think so."""
        if self._deleted.is_set():
            return True, "its deletion was watched"
        try:
            found = raw(
                self._apps.read_namespaced_daemon_set(
                    self.name, self.namespace, _preload_content=False, _request_timeout=5
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return True, "it is gone"
            if exc.status in (401, 403):
                # Our ServiceAccount or Role is gone: only an uninstall removes them.
                return True, f"the agent's own credentials were revoked ({exc.status})"
            return False, f"could not read it ({exc.status}): leaving rules in place"
        except Exception as exc:  # API server away: no evidence of an uninstall
            return False, f"could not read it ({exc}): leaving rules in place"
        if found["metadata"].get("deletionTimestamp"):
            return True, "it is being deleted"
        return False, "it still exists"
