"""The node agent process: watch this node's AmbientNodeConfig, reconcile, serve ZDS, report.

The watch is a list-and-watch with a server-side field selector on the
object's name, so an agent never receives another node's object (kopf's
watches filter on the client side, which would send every node's object to
every agent).
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from prometheus_client import start_http_server

from ambient_cni.agent import metrics
from ambient_cni.agent.cni_endpoint import CniEndpoint
from ambient_cni.agent.cni_server import CniServer
from ambient_cni.agent.inpod import InpodMode
from ambient_cni.agent.install_watch import InstallReportWatch
from ambient_cni.agent.kube_writers import KubeNodeEvents, KubePodApi, KubeStatusWriter
from ambient_cni.agent.node_mode import NodeMode
from ambient_cni.agent.podnetns import HeldNetns, PodNetnsResolver
from ambient_cni.agent.reconciler import AgentOptions, NodeAgent
from ambient_cni.agent.sidecar_mode import SidecarMode
from ambient_cni.agent.zds_server import ZdsServer
from ambient_cni.api import names
from ambient_cni.daemonset_watch import DaemonSetWatch
from ambient_cni.dataplane import factory
from ambient_cni.event_recorder import EventRecorder, KubeEventApi, Source
from ambient_cni.kube import new_api_client
from ambient_cni.logs import configure_json_logging
from ambient_cni.reflector import Reflector, name_of

log = logging.getLogger("ambient_cni.agent")
INITIAL_PASS_TIMEOUT = 60.0
COMPONENT = "ambient-cni-agent"


def _health_server(
    address: str, port: int, healthy: threading.Event
) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/healthz" and healthy.is_set()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok\n" if ok else b"starting\n")

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    return server


def _count_received(objects: int, size: int) -> None:
    metrics.WATCH_OBJECTS.inc(objects)
    metrics.WATCH_BYTES.inc(size)


def _raise_open_files_limit() -> None:
    """Up to the hard limit, as Go programs do at start: the agent holds three fds per enrolled
    pod (its namespace, and two sockets hearing its rule changes), and a soft limit of 1024
    would bind at a few hundred pods."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _backend_options(options: AgentOptions) -> factory.BackendOptions:
    return factory.BackendOptions(
        host_netns=options.host_netns,
        proc=options.proc,
        kubelet_uid=options.kubelet_uid,
        workers=options.workers,
    )


def uninstall(options: AgentOptions) -> int:
    """Remove the host's probe rules and ipsets (pod rules are left to their pods)."""
    dataplane = factory.build(options.backend, _backend_options(options))
    removed = dataplane.host.uninstall()
    log.info("host rules and ipsets %s", "removed" if removed else "were already absent")
    if dataplane.node.uninstall():
        log.info("node mode's chains, tables, rules, tunnels and ipset removed")
    return 0


def _event_recorder(api: ApiClient, node: str) -> EventRecorder:
    """Events on the node's AmbientNodeConfig: cluster-scoped, so the API server takes its
    Events in namespace default only, where `kubectl describe anc` finds them."""
    instance = os.environ.get("POD_NAME") or socket.gethostname()
    return EventRecorder(
        KubeEventApi(api), names.CLUSTER_EVENTS_NAMESPACE, Source(COMPONENT, instance, host=node)
    )


def _serve_when_ready(
    agent: NodeAgent,
    zds: ZdsServer,
    cni: CniServer | None,
    stop: threading.Event,
    healthy: threading.Event,
) -> None:
    """Serve ZDS, and the CNI plugin, once every pod was re-applied: a ztunnel that connected
    earlier would get an empty snapshot and drop every pod it serves. Past the timeout the
    agent is healthy and serves anyway, unless the spec asks for a mode it lacks: then every
    pod is held as it is, ztunnel's share included, until the spec changes."""
    deadline = time.monotonic() + INITIAL_PASS_TIMEOUT
    while not stop.is_set() and not agent.initial_pass_done():
        if time.monotonic() > deadline:
            healthy.set()
            if agent.mode_supported():
                log.warning("serving ZDS before every pod was re-applied (a pod is stuck?)")
                break
        stop.wait(0.05)
    if not stop.is_set():
        zds.start()
        if cni is not None:
            cni.start()
    healthy.set()


def run(
    options: AgentOptions,
    *,
    kubeconfig: Path | None,
    listen_address: str,
    metrics_port: int,
    health_port: int,
    log_level: str = "info",
) -> int:
    configure_json_logging(logging.getLevelName(log_level.upper()))
    _raise_open_files_limit()
    api = new_api_client(kubeconfig)
    dataplane = factory.build(options.backend, _backend_options(options))
    zds = ZdsServer(options.zds_socket)
    # The pods on this node, to annotate them without reading each first.
    pods: Reflector = Reflector(
        f"pods@{options.node}",
        CoreV1Api(api).list_pod_for_all_namespaces,
        lambda _uid: None,
        field_selector=f"spec.nodeName={options.node}",
    )
    resolver = PodNetnsResolver(
        proc=options.proc, netns_dir=options.netns_dir, netns_prefix=options.netns_prefix
    )
    pod_api = KubePodApi(api, pods)
    inpod = InpodMode(
        pods=dataplane.pods,
        host=dataplane.host,
        resolver=resolver,
        handles=HeldNetns(),
        ztunnel=zds,
        pod_api=pod_api,
    )
    node = NodeMode(
        dataplane=dataplane.node, resolver=resolver, pod_api=pod_api, backend=dataplane.backend
    )
    sidecar = SidecarMode(dataplane=dataplane.sidecars, resolver=resolver, handles=HeldNetns())
    recorder = _event_recorder(api, options.node)
    agent = NodeAgent(
        options,
        {m.name: m for m in (inpod, node) if m.name in options.redirect_modes},
        zds,
        KubeStatusWriter(api, options.node),
        dataplane.backend,
        sidecar=sidecar,
        events=KubeNodeEvents(recorder, options.node),
        changes=dataplane.changes,
    )
    zds.on_change = agent.ztunnel_changed
    custom = CustomObjectsApi(api)
    reflector: Reflector = Reflector(
        f"anc@{options.node}",
        functools.partial(
            custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.PLURAL
        ),
        lambda key: agent.on_object(reflector.get(key)),
        key=name_of,
        on_received=_count_received,
        field_selector=f"metadata.name={options.node}",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    healthy = threading.Event()
    start_http_server(metrics_port, listen_address)
    _health_server(listen_address, health_port, healthy)
    log.info("agent for node %s (%s)", options.node, dataplane.backend)

    daemonset = DaemonSetWatch(api, options.daemonset) if options.daemonset else None
    recorder.start()
    agent.start()
    reflector.start(stop)
    pods.start(stop)
    if daemonset is not None:
        daemonset.start(stop)
    cni = (
        None
        if options.cni_run_dir is None
        else CniServer(
            options.cni_run_dir,
            CniEndpoint(options.node, pod_api, agent, resolver, options.selection),
        )
    )
    if options.cni_run_dir is not None:
        InstallReportWatch(options.cni_run_dir, agent.cni_plugin_changed).start(stop)
    serving = threading.Thread(
        target=_serve_when_ready,
        args=(agent, zds, cni, stop, healthy),
        name="zds-start",
        daemon=True,
    )
    serving.start()
    stop.wait()
    serving.join()
    if cni is not None:
        cni.stop()
    agent.stop()
    recorder.stop()
    zds.stop()
    if daemonset is not None:
        going, why = daemonset.going()
        log.info("DaemonSet %s: %s", options.daemonset, why)
        if going:
            uninstall(options)
    return 0
