"""Follows install-cni's report in the run dir the two containers share (see
ambient_cni.install_report), so the node's Ready condition says whether
istio-cni is installed within a moment of a change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify, flags

from ambient_cni.install_report import InstallReport, read_report

log = logging.getLogger("ambient_cni.agent")

RECHECK = 5.0  # a read even without an event, in case one was missed
WATCHED = flags.CREATE | flags.CLOSE_WRITE | flags.MOVED_TO | flags.DELETE


class InstallReportWatch:
    def __init__(self, run_dir: Path, on_report: Callable[[InstallReport], None]):
        self.run_dir = run_dir
        self.on_report = on_report

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self._run, args=(stop,), name="install-report", daemon=True).start()

    def _run(self, stop: threading.Event) -> None:
        self.on_report(read_report(self.run_dir))
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            inotify = INotify()
            inotify.add_watch(self.run_dir, WATCHED)
        except OSError as exc:  # e.g. the node's inotify limits: read it every RECHECK
            log.warning("cannot watch %s (%s); reading it every %.0f s", self.run_dir, exc, RECHECK)
            while not stop.wait(RECHECK):
                self.on_report(read_report(self.run_dir))
            return
        with inotify:
            while not stop.is_set():
                inotify.read(timeout=int(RECHECK * 1000), read_delay=20)
                self.on_report(read_report(self.run_dir))
