"""The sandbox's scheduler: binds pending pods to nodes, round-robin.

Pods rotate over the Ready nodes that fit and whose taints they tolerate
(scheduling.choose_node). A pod no node can take gets a
PodScheduled=False condition saying why, and is retried when nodes change.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from ambient_cni.kube import MERGE_PATCH, as_body, new_api_client
from ambient_cni.reflector import Reflector, name_of
from ambient_cni.workqueue import WorkQueue

from .scheduling import choose_node, node_view, unschedulable_message
from .state import load_state

log = logging.getLogger("scheduler")
SCHEDULER_NAME = "default-scheduler"


class Scheduler:
    def __init__(self, kubeconfig: Path):
        self.core = CoreV1Api(new_api_client(kubeconfig))
        self.queue: WorkQueue[str] = WorkQueue()
        self.pending = Reflector(
            "unscheduled-pods",
            self.core.list_pod_for_all_namespaces,
            self.queue.add,
            field_selector="spec.nodeName=,status.phase=Pending",
        )
        self.nodes = Reflector("nodes", self.core.list_node, self._nodes_changed, key=name_of)
        self.turn = 0
        self.stop = threading.Event()

    def _nodes_changed(self, _name: str) -> None:
        for uid in self.pending.key_list():
            self.queue.add(uid)

    def run(self) -> None:
        def on_signal(_signum: int, _frame: object) -> None:
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.nodes.start(self.stop)
        self.nodes.synced.wait()
        self.pending.start(self.stop)
        self.queue.start(self.schedule, name="schedule")
        log.info("scheduler running")
        self.stop.wait()
        self.queue.join()

    def schedule(self, uid: str) -> None:
        pod = self.pending.get(uid)
        if pod is None or pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
            return
        if pod["spec"].get("schedulerName", SCHEDULER_NAME) != SCHEDULER_NAME:
            return
        meta = pod["metadata"]
        nodes = [node_view(n) for n in self.nodes.items()]
        target = choose_node(pod, nodes, self.turn)
        if target is None:
            message = unschedulable_message(pod, nodes)
            self.core.patch_namespaced_pod_status(
                meta["name"],
                meta["namespace"],
                _content_type=MERGE_PATCH,
                body={
                    "status": {
                        "conditions": [
                            {
                                "type": "PodScheduled",
                                "status": "False",
                                "reason": "Unschedulable",
                                "message": message,
                            }
                        ]
                    }
                },
            )
            log.info("%s/%s: %s", meta["namespace"], meta["name"], message)
            return
        self.turn += 1
        try:
            self.core.create_namespaced_binding(
                meta["namespace"],
                body=as_body(
                    {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": meta["name"], "uid": meta["uid"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": target},
                    }
                ),
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status in (404, 409):  # deleted, or bound meanwhile
                return
            raise
        log.info("bound %s/%s to %s", meta["namespace"], meta["name"], target)


def main(sandbox: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    state = load_state(sandbox)
    if state is None:
        raise SystemExit(f"sandbox {sandbox!r} has no state file; is it up?")
    Scheduler(Path(state.kubeconfig)).run()
