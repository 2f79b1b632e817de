"""Follows install-cni's report in the run dir the two containers share (see
ambient_cni.install_report), so the node's Ready condition says whether
istio-cni is installed within a moment of a change."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify, flags

from ambient_cni.install_report import InstallReport, read_report

RECHECK = 5.0  # a read even without an event, in case one was missed
WATCHED = flags.CREATE | flags.CLOSE_WRITE | flags.MOVED_TO | flags.DELETE


class InstallReportWatch:
    def __init__(self, run_dir: Path, on_report: Callable[[InstallReport], None]):
        self.run_dir = run_dir
        self.on_report = on_report

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self._run, args=(stop,), name="install-report", daemon=True).start()

    def _run(self, stop: threading.Event) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with INotify() as inotify:
            inotify.add_watch(self.run_dir, WATCHED)
            while not stop.is_set():
                self.on_report(read_report(self.run_dir))
                inotify.read(timeout=int(RECHECK * 1000), read_delay=20)
