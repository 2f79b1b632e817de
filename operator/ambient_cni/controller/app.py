"""The controller process: watches feed the index; the writer writes specs.

kopf is the framework: it runs the process (login, startup, liveness, the
stop signals). The watches are the project's own list-and-watch
(`ListWatch`): each resource listed page by page, then each watch event
handed straight to the index or the writer. kopf's per-object machinery (a
worker, a batching window, progress storage, a handler invocation per event)
took about half of the controller's CPU samples over its first sync and a
1,000-node burst (about 1 ms of CPU per event; BENCHMARKS.md has the profile);
the events the controller watches are read-only to it and need none of it:
every Pod and Namespace at start, every node's AmbientNodeConfig once per
write of ours and once per status write of its agent, every Node and
AmbientNodeConfig again at each restart. The handlers write nothing to the
objects they watch: no finalizers, no progress annotations. The one thing the
controller says about a pod is a warning Event when one of its annotations is
ignored, once per change. Every replica watches and indexes (a warm standby);
only the holder of the Lease writes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from ambient_cni.api import names
from ambient_cni.api.version import operator_version
from ambient_cni.controller import metrics
from ambient_cni.controller.events import PodEvents
from ambient_cni.controller.index import NAMESPACES, NODES, PODS, ClusterIndex
from ambient_cni.controller.leader import LeaseElector
from ambient_cni.controller.planner import PlannerConfig
from ambient_cni.controller.untaint import NodeUntainter
from ambient_cni.controller.writer import SpecWriter
from ambient_cni.kube import discard, in_cluster_server, new_api_client
from ambient_cni.reflector import ListWatch, name_of
from ambient_cni.selection import PodView, knobs, slim_pod_view
from ambient_cni.sidecar import decide_sidecar

log = logging.getLogger("ambient_cni.controller")
# Seconds a watch may hear nothing before liveness fails: each reconnects within a minute
# (60 s server timeout), and a read waits 90 s at most before it relists.
WATCH_SILENCE_LIMIT = 180.0


@dataclass
class ControllerOptions:
    kubeconfig: Path | None = None
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    listen_address: str = "0.0.0.0"  # noqa: S104 - metrics and health are scraped from outside
    metrics_port: int = 15014
    health_port: int = 8081
    leader_election: bool = True
    lease_namespace: str = names.DEFAULT_SYSTEM_NAMESPACE
    lease_name: str = names.CONTROLLER_LEASE
    debounce: float = 0.1
    min_write_interval: float = 1.0
    max_concurrent_writes: int = 8  # spec writes in flight at once (one per node at most)
    list_page_size: int = 500  # Pods and Namespaces are listed this many at a time
    orphan_grace: float = 60.0  # seconds an AmbientNodeConfig without a Node is kept
    untaint_nodes: bool = False  # take `taint_key` off nodes whose AmbientNodeConfig is Ready
    taint_key: str = names.NOT_READY_TAINT_KEY
    log_level: str = "info"


def lease_annotations(options: ControllerOptions) -> dict[str, str]:
    """What the leading replica says of itself on its Lease: its version and how it selects
    pods, so `kubectl ambient why` decides exactly as it does."""
    selection = options.planner.selection
    return {
        names.CONTROLLER_VERSION_ANNOTATION: operator_version(),
        names.CONTROLLER_EXCLUDED_NAMESPACES_ANNOTATION: ",".join(
            sorted(selection.excluded_namespaces)
        ),
        names.CONTROLLER_SYSTEM_NAMESPACE_ANNOTATION: selection.system_namespace,
        names.CONTROLLER_REDIRECT_MODE_ANNOTATION: options.planner.redirect_mode,
    }


class CrdMissingError(RuntimeError):
    pass


class Controller:
    """The state shared by kopf's handlers (passed to them as `memo`)."""

    def __init__(
        self, options: ControllerOptions, api: ApiClient, watch_api: ApiClient | None = None
    ):
        self.options = options
        self.api = api
        gauges = {kind: metrics.INDEX_OBJECTS.labels(kind) for kind in (NODES, NAMESPACES, PODS)}
        self.index = ClusterIndex(on_resize=lambda kind, delta: gauges[kind].inc(delta))
        self.writer = SpecWriter(
            api,
            self.index,
            options.planner,
            debounce=options.debounce,
            min_interval=options.min_write_interval,
            max_in_flight=options.max_concurrent_writes,
            orphan_grace=options.orphan_grace,
        )
        self.stop = threading.Event()  # ends the Pod and Namespace watches
        # A client of their own: each holds a connection for as long as it watches, which
        # would otherwise be taken from the writers' pool.
        core = CoreV1Api(watch_api or api)
        self.namespaces = ListWatch(
            "namespaces",
            core.list_namespace,
            lambda kind, ns: self.on_namespace(ns, deleted=kind == "DELETED"),
            self.on_namespaces_listed,
            key=name_of,
            page_size=options.list_page_size,
        )
        self.pods = ListWatch(
            "pods",
            core.list_pod_for_all_namespaces,
            lambda kind, pod: self.on_pod(pod, deleted=kind == "DELETED"),
            self.on_pods_listed,
            page_size=options.list_page_size,
        )
        self.nodes = ListWatch(
            "nodes",
            core.list_node,
            lambda kind, node: self.on_node(node, deleted=kind == "DELETED"),
            self.on_nodes_listed,
            key=name_of,
            page_size=options.list_page_size,
        )
        custom = CustomObjectsApi(watch_api or api)
        self.ancs = ListWatch(
            "ambientnodeconfigs",
            functools.partial(
                custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.PLURAL
            ),
            lambda kind, anc: self.on_anc(anc, deleted=kind == "DELETED"),
            self.on_ancs_listed,
            key=name_of,
            page_size=options.list_page_size,
        )
        self.watches = (self.ancs, self.nodes, self.namespaces, self.pods)
        self.primed = threading.Event()
        self.leading = threading.Event()
        self.events = PodEvents(api, self.leading)
        self.untainter = (
            NodeUntainter(api, options.taint_key, self.leading) if options.untaint_nodes else None
        )
        self._warned: dict[str, tuple[str, ...]] = {}  # pod uid -> the warnings last given
        self._started = False
        self._start_lock = threading.Lock()

    def prime(self) -> None:
        """List everything once, so the first plans see the whole cluster, not a partial one:
        the watches' own first lists, page by page."""
        try:
            discard(
                CustomObjectsApi(self.api).list_cluster_custom_object(
                    names.GROUP, names.VERSION, names.PLURAL, limit=1, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                raise CrdMissingError(
                    f"the {names.CRD_NAME} CRD is not installed: kubectl apply -f crds/"
                ) from None
            raise
        for watch in self.watches:
            watch.start(self.stop)
        for watch in self.watches:
            while not watch.synced.wait(1.0):
                if self.stop.is_set():
                    return
        self.writer.mark(self.index.nodes())
        log.info("index primed: %s", self.index.sizes())
        self.primed.set()
        self._maybe_start()

    def watch_silence(self) -> dict[str, float]:
        """Seconds since the API server last answered each watch. A watch reconnects at
        least every minute, so a long silence is one stuck on a dead connection."""
        now = time.monotonic()
        return {watch.name: round(now - watch.last_contact, 1) for watch in self.watches}

    def became_leader(self) -> None:
        self.leading.set()
        if self.untainter is not None:
            self.untainter.became_leader()
        self._maybe_start()

    def _maybe_start(self) -> None:
        with self._start_lock:
            if self._started or not (self.primed.is_set() and self.leading.is_set()):
                return
            self._started = True
        self.writer.start()
        log.info("writing AmbientNodeConfig specs")

    # -- event inputs (from kopf or from the priming list) ---------------------------------

    def on_pod(self, pod: dict[str, Any], *, deleted: bool = False) -> None:
        if deleted:
            uid = str(pod["metadata"]["uid"])
            self._warned.pop(uid, None)
            self.writer.mark(self.index.delete_pod(uid))
            return
        view = slim_pod_view(pod)
        old = self.index.pod(view.uid)
        if old is None or old.annotations != view.annotations or old.proxy != view.proxy:
            self._warn_once(view)  # warnings follow the annotations and the proxy only
        self.writer.mark(self.index.set_pod(view))

    def on_pods_listed(self, uids: set[str], _version: str) -> None:
        """After a (re)list: forget the pods deleted while no watch ran."""
        for uid in [uid for uid in self._warned if uid not in uids]:
            self._warned.pop(uid, None)
        self.writer.mark(self.index.retain_pods(uids))

    def on_namespaces_listed(self, names_: set[str], _version: str) -> None:
        self.writer.mark(self.index.retain_namespaces(names_))

    def on_nodes_listed(self, names_: set[str], _version: str) -> None:
        for name in [name for name in self.index.nodes() if name not in names_]:
            self.on_node({"metadata": {"name": name}}, deleted=True)

    def on_ancs_listed(self, names_: set[str], version: str) -> None:
        # Not those the writer learned of after the list (its own creates come back later).
        for name in self.writer.unlisted(names_, version):
            self.on_anc({"metadata": {"name": name}}, deleted=True)

    def _warn_once(self, view: PodView) -> None:
        """A log line and an Event per ignored annotation value, once per change of it (a
        pod changes for many other reasons: status, our own annotation)."""
        warnings = knobs(view)[1]
        if view.proxy is not None:
            sidecar = decide_sidecar(view.proxy)
            if sidecar.error is not None:
                warnings += (f"sidecar capture not applied: {sidecar.error}",)
        before = self._warned.get(view.uid, ())
        if warnings == before:
            return
        if warnings:
            self._warned[view.uid] = warnings
        else:
            self._warned.pop(view.uid, None)
        for warning in warnings:
            if warning not in before:
                log.warning("pod %s/%s: %s", view.namespace, view.name, warning)
                metrics.POD_WARNINGS.inc()
                self.events.warn(view, "AnnotationIgnored", warning)

    def on_namespace(self, ns: dict[str, Any], *, deleted: bool = False) -> None:
        name = str(ns["metadata"]["name"])
        if deleted:
            self.writer.mark(self.index.delete_namespace(name))
        else:
            self.writer.mark(self.index.set_namespace(name, ns["metadata"].get("labels") or {}))

    def on_node(self, node: dict[str, Any], *, deleted: bool = False) -> None:
        meta = node["metadata"]
        if self.untainter is not None:
            self.untainter.on_node(node, deleted=deleted)
        if deleted:
            self.index.delete_node(str(meta["name"]))
        else:
            self.writer.mark(self.index.set_node(str(meta["name"]), str(meta["uid"])))

    def on_anc(self, anc: dict[str, Any], *, deleted: bool = False) -> None:
        self.writer.observe(anc, deleted=deleted)
        if self.untainter is not None:
            self.untainter.on_anc(anc, deleted=deleted)


def check_watches(controller: Controller) -> dict[str, float]:
    """The liveness probe: fails (the endpoint answers 500) while a watch hears nothing, so
    the controller is restarted and lists everything again instead of planning from a
    stale index; otherwise each watch's seconds of silence."""
    silence = controller.watch_silence()
    stuck = {name: age for name, age in silence.items() if age > WATCH_SILENCE_LIMIT}
    if stuck:
        raise kopf.PermanentError(f"no answer from the API server for the watches {stuck}")
    return silence


def build_registry() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # kopf's own readers: they look at $KUBECONFIG when called, not when imported.
        in_pod = kopf.login_with_service_account(**kwargs)
        server = in_cluster_server(os.environ)
        if in_pod is not None and server is not None:
            # kopf dials kubernetes.default.svc, which needs cluster DNS (not there while a
            # cluster bootstraps, nor in the sandbox); client-go and the agent use the env.
            return dataclasses.replace(in_pod, server=server)
        return in_pod or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        settings.posting.enabled = False  # no Events on watched objects
        settings.watching.server_timeout = 300
        memo.controller.prime()

    @kopf.on.probe(registry=registry, id="watches", errors=kopf.ErrorsMode.PERMANENT)
    def watches(memo: Any, **_: Any) -> dict[str, float]:
        return check_watches(memo.controller)

    # Every watch is a ListWatch of Controller.watches, started by prime() (see the module's
    # docstring for why not kopf's).
    return registry


def run(options: ControllerOptions) -> int:
    if options.kubeconfig is not None:
        os.environ["KUBECONFIG"] = str(options.kubeconfig)  # for kopf's login too
    kopf.configure(log_format=kopf.LogFormat.JSON)
    # kopf logs every handled event per object at INFO; keep its warnings and errors only.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("ambient_cni").setLevel(options.log_level.upper())
    # The writers, Events, the untainter and the Lease share one pool: one connection each.
    api = new_api_client(options.kubeconfig, pool_size=options.max_concurrent_writes + 4)
    controller = Controller(options, api, new_api_client(options.kubeconfig))
    stop = threading.Event()  # ends our own threads
    lost = threading.Event()
    start_http_server(options.metrics_port, options.listen_address)
    controller.events.start()
    if controller.untainter is not None:
        controller.untainter.start()

    def lose() -> None:
        lost.set()
        stop.set()
        # Another replica may lead already: no write from here on, not even those queued.
        controller.leading.clear()
        controller.writer.queue.close()
        # kopf's stop_flag is waited for on an executor thread that a signal stop leaves
        # blocked at exit; stopping kopf by its own signal path has no such trap.
        os.kill(os.getpid(), signal.SIGTERM)

    elector: LeaseElector | None = None
    if options.leader_election:
        identity = f"{socket.gethostname()}-{os.getpid()}"
        elector = LeaseElector(
            api,
            options.lease_namespace,
            options.lease_name,
            identity,
            annotations=lease_annotations(options),
        )

        def elect() -> None:
            assert elector is not None
            if elector.acquire(stop):
                elector.keep(stop, lose)
                controller.became_leader()

        threading.Thread(target=elect, name="leader-election", daemon=True).start()
    else:
        controller.became_leader()

    kopf.run(
        registry=build_registry(),
        clusterwide=True,
        standalone=True,
        liveness_endpoint=f"http://{options.listen_address}:{options.health_port}/healthz",
        memo=kopf.Memo(controller=controller),
    )
    stop.set()
    controller.stop.set()
    controller.writer.stop()
    controller.events.stop()
    if controller.untainter is not None:
        controller.untainter.stop()
    if elector is not None and not lost.is_set():
        elector.release()
    if lost.is_set():
        log.error("lost leadership; exiting so a fresh process can take over")
        return 1
    return 0
