"""`ambient-cni install-cni`: install, then keep installed, until stopped.

The conf dir and bin dir are watched with inotify: when the primary CNI
rewrites its config (as many do on every start), istio-cni is chained again
within a fraction of a second. A pass also runs every RECHECK seconds, in case
an event was missed. Stopping leaves everything in place (an upgrade: new pods
wait for the new agent rather than start unredirected), unless the DaemonSet
it runs in (`--daemonset`) is being deleted: that is an uninstall, and it
takes everything out, as `--uninstall` does. With `absent`, the same loop keeps
istio-cni out instead (the chart's `cni.enabled: false` on a node that had it:
a plugin left in the chain with no agent to answer it would hold every pod).
"""

from __future__ import annotations

import http.server
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from ambient_cni.daemonset_watch import DaemonSetWatch
from ambient_cni.install_report import InstallReport, remove_report, write_report
from ambient_cni.kube import new_api_client
from ambient_cni.logs import configure_json_logging

from .installer import Installer, InstallOptions, InstallState

log = logging.getLogger("ambient_cni.install")

RECHECK = 5.0
SETTLE = 0.05  # events come in bursts (write, rename): gather them before a pass
WATCHED = (
    flags.CREATE | flags.MODIFY | flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM
) | flags.DELETE


class _Health:
    def __init__(self) -> None:
        self.state = InstallState(False, problem="not installed yet")

    def serve(self, address: str, port: int) -> None:
        health = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path in ("/readyz", "/healthz") and health.state.ready
                self.send_response(200 if ok else 503)
                self.end_headers()
                self.wfile.write(b"installed\n" if ok else health.state.problem.encode() + b"\n")

            def log_message(self, *_: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()


def run(
    options: InstallOptions,
    *,
    listen_address: str,
    health_port: int,
    daemonset: str | None = None,
    kubeconfig: Path | None = None,
    absent: bool = False,
) -> int:
    configure_json_logging(logging.INFO)
    installer = Installer(options)
    health = _Health()
    health.serve(listen_address, health_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    watch = None if daemonset is None else DaemonSetWatch(new_api_client(kubeconfig), daemonset)
    if watch is not None:
        watch.start(stop)
    run_dir = Path(options.settings.agent_run_dir)
    with INotify() as inotify:
        for directory in (options.conf_dir, options.bin_dir):
            inotify.add_watch(directory, WATCHED)
        while not stop.is_set():
            if absent:
                installer.uninstall()
                state = InstallState(True)
            else:
                state = installer.ensure()
            if state.problem != health.state.problem and state.problem:
                log.warning("not installed: %s", state.problem)
            if absent:
                remove_report(run_dir)
            else:
                _report(run_dir, state)
            health.state = state
            # Wakes on a change in either dir, or after RECHECK; SIGTERM ends the wait too.
            inotify.read(timeout=int(RECHECK * 1000), read_delay=int(SETTLE * 1000))
    if absent:
        return 0
    going, why = (False, "no --daemonset") if watch is None else watch.going()
    if going:
        log.info("DaemonSet %s is going (%s): uninstalling istio-cni", daemonset, why)
        installer.uninstall()
        remove_report(run_dir)
    else:
        log.info("stopping; istio-cni stays installed (%s)", why)
    return 0


def _report(run_dir: Path, state: InstallState) -> None:
    """Tell the agent (through the run dir they share) whether istio-cni is installed; on
    every pass, so a report that stops being renewed says install-cni stopped."""
    report = InstallReport(
        installed=state.ready,
        message=f"istio-cni is chained in {state.config}" if state.ready else state.problem,
    )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_report(run_dir, report)
    except OSError as exc:
        log.warning("cannot tell the agent in %s: %s", run_dir, exc)


def uninstall(options: InstallOptions) -> int:
    configure_json_logging(logging.INFO)
    removed = Installer(options).uninstall()
    remove_report(Path(options.settings.agent_run_dir))
    if not removed:
        log.info("nothing of istio-cni was installed")
    return 0
