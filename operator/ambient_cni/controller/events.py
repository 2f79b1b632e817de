"""Warning Events on pods, so a bad annotation shows in `kubectl describe pod`.

Posted from a worker thread, never from a watch handler, and only by the
replica that holds the Lease (standbys see the same pods). The caller decides
what deserves an Event; this only delivers it, retrying a failed post a few
times before giving up with a log line.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
from dataclasses import dataclass

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from ambient_cni.event_recorder import KubeEventApi, ObjectRef, Source, event_body
from ambient_cni.selection import PodView
from ambient_cni.workqueue import WorkQueue

log = logging.getLogger("ambient_cni.controller.events")
COMPONENT = "ambient-cni-controller"
ATTEMPTS = 3


@dataclass(frozen=True)
class PodWarning:
    namespace: str
    name: str
    uid: str
    reason: str
    message: str


class PodEvents:
    def __init__(self, api: ApiClient, leading: threading.Event):
        self.events = KubeEventApi(api)
        self.leading = leading
        self.queue: WorkQueue[PodWarning] = WorkQueue()
        self._attempts: dict[PodWarning, int] = {}
        self.source = Source(COMPONENT, socket.gethostname())

    def warn(self, pod: PodView, reason: str, message: str) -> None:
        self.queue.add(PodWarning(pod.namespace, pod.name, pod.uid, reason, message))

    def start(self) -> None:
        self.queue.start(self._post, name="pod-events", on_error=self._failed)

    def stop(self) -> None:
        self.queue.join()

    def _post(self, warning: PodWarning) -> None:
        if not self.leading.is_set():
            return  # the leader posts it
        pod = ObjectRef("v1", "Pod", warning.name, warning.uid, warning.namespace)
        body = event_body(
            pod,
            "Warning",
            warning.reason,
            warning.message,
            source=self.source,
            namespace=warning.namespace,
            first=datetime.datetime.now(datetime.UTC),
        )
        self.events.create(warning.namespace, body)
        self._attempts.pop(warning, None)

    def _failed(self, warning: PodWarning, exc: Exception) -> None:
        attempts = self._attempts.get(warning, 0) + 1
        if attempts >= ATTEMPTS or (isinstance(exc, ApiException) and exc.status == 404):
            self._attempts.pop(warning, None)
            log.warning("no Event for pod %s/%s: %s", warning.namespace, warning.name, exc)
            return
        self._attempts[warning] = attempts
        self.queue.add_after(warning, 2.0 * attempts)
