"""What install-cni tells the node agent: is istio-cni installed on this node?

install-cni and the agent are two containers of one pod that share the agent's
run dir (the plugin's socket is there). install-cni keeps one small JSON file in
it, replaced atomically on every pass; the agent reads it and reports it in
the node's AmbientNodeConfig, whose Ready condition then means what a user (and
the node untaint) needs: agent up, plugin installed, ztunnel connected.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

REPORT_FILE = "install-cni.json"
# install-cni rewrites its report on every pass (at least every 5 s); one older than this
# means install-cni is not running, and nobody keeps istio-cni in the chain.
STALE_AFTER = 30.0


class InstallReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    installed: bool
    message: str  # where it is chained, or why it is not


def write_report(run_dir: Path, report: InstallReport) -> None:
    path = run_dir / REPORT_FILE
    tmp = run_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(report.model_dump_json())
    tmp.replace(path)


def remove_report(run_dir: Path) -> None:
    (run_dir / REPORT_FILE).unlink(missing_ok=True)


def read_report(run_dir: Path, now: float | None = None) -> InstallReport:
    """The last report; a missing, stale or unreadable one says so (never an exception)."""
    path = run_dir / REPORT_FILE
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
        report = InstallReport.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return InstallReport(installed=False, message="install-cni has not reported (running?)")
    except (OSError, ValidationError) as exc:
        return InstallReport(
            installed=False, message=f"install-cni's report is unreadable: {exc}"[:500]
        )
    if age > STALE_AFTER:
        return InstallReport(
            installed=False,
            message=f"install-cni has not reported for {age:.0f} s (running?); it said: "
            f"{report.message}"[:500],
        )
    return report
