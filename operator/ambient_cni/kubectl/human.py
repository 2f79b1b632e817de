"""The human formats of the three commands: aligned columns as kubectl prints them, colour
only when asked (the caller decides: a terminal, and no NO_COLOR). Pure: `now` is given, so
the golden files in tests/unit/golden/kubectl pin every word."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from ambient_cni.api import names

from .listing import PodRow
from .overview import Overview
from .why import WhyReport

_COLOURS = {"green": "32", "yellow": "33", "red": "31", "bold": "1"}
# The colour of a word wherever it appears in a STATE, READY or verdict cell.
_WORD_COLOURS = {
    "Enrolled": "green",
    "Redirected": "green",
    "Captured": "green",
    "NotRedirected": "bold",
    "True": "green",
    "Ready": "green",
    "Pending": "yellow",
    "Removing": "yellow",
    "Failed": "red",
    "Inconsistent": "red",
    "False": "red",
    "Not ready": "red",
}


class Style:
    def __init__(self, colour: bool):
        self.colour = colour

    def paint(self, text: str, colour: str | None) -> str:
        if not self.colour or colour is None or not text:
            return text
        return f"\033[{_COLOURS[colour]}m{text}\033[0m"

    def word(self, text: str) -> str:
        return self.paint(text, _WORD_COLOURS.get(text))


def human_duration(delta: datetime.timedelta) -> str:
    """An age as kubectl prints one (its HumanDuration): 45s, 3m20s, 2h5m, 3d4h."""
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    return f"{hours // (24 * 365)}y"


def age(when: datetime.datetime | None, now: datetime.datetime) -> str:
    return human_duration(now - when) if when is not None else "<unknown>"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], style: Style, coloured: Sequence[str]
) -> list[str]:
    """Columns padded to their widest cell, three spaces apart, as kubectl's printer does;
    cells under the `coloured` headers painted after padding, so colour never skews them."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    painted = {i for i, h in enumerate(headers) if h in coloured}
    lines = []
    for is_header, row in [(True, headers), *((False, r) for r in rows)]:
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - len(cell)) if i < len(row) - 1 else ""
            shown = style.word(cell) if i in painted and not is_header else cell
            cells.append(shown + pad)
        lines.append("   ".join(cells).rstrip())
    return lines


# -- pods ------------------------------------------------------------------------------


def pods_text(
    rows: Sequence[PodRow],
    now: datetime.datetime,
    style: Style,
    *,
    all_namespaces: bool,
    wide: bool,
) -> str:
    if not rows:
        return "No redirected pods found.\n"
    headers = ["NAME", "NODE", "MODE", "STATE", "REASON", "SINCE"]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    if wide:
        headers += ["IPS", "LAST REPAIR", "MESSAGE"]
    cells = []
    for row in rows:
        cell = [row.name, row.node, row.mode, row.state, row.reason or "-", age(row.since, now)]
        if all_namespaces:
            cell.insert(0, row.namespace)
        if wide:
            repair = row.last_repair
            cell += [
                ",".join(row.ips) or "-",
                f"{repair.reason} {age(repair.time, now)} ago" if repair else "-",
                _one_line(row.message) or "-",
            ]
        cells.append(cell)
    return "\n".join(table(headers, cells, style, ["STATE"])) + "\n"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


# -- why -------------------------------------------------------------------------------


_AGREEMENT = {
    "Redirected": "Selection, spec, status and annotation agree.",
    "Captured": "Selection, spec and status agree.",
    "NotRedirected": "Selection, spec, status and annotation agree.",
    "Pending": "Selection and spec agree; the node's agent has not finished (status above).",
    "Failed": "Selection and spec agree; the node's agent could not redirect the pod "
    "(status and message above).",
    "Inconsistent": "The pieces disagree.",
}


def why_text(report: WhyReport, now: datetime.datetime, style: Style) -> str:
    lines: list[tuple[str, str]] = [("Pod", f"{report.namespace}/{report.name}")]
    node = report.node_facts
    if report.node is None:
        lines.append(("Node", "not scheduled"))
    elif node is None:
        lines.append(("Node", f"{report.node} (no AmbientNodeConfig)"))
    else:
        ztunnel = "ztunnel connected" if node.ztunnel_connected else "no ztunnel connected"
        ready = "Ready" if node.ready else "Not ready"
        lines.append(("Node", f"{node.name} ({node.mode or 'unknown'} mode, {ztunnel}, {ready})"))
    lines.append(("Verdict", f"{style.word(report.verdict)} ({report.summary})"))
    decided = "selected" if report.handling is not None else "not selected"
    if report.handling == "sidecar":
        decided = "its sidecar's capture is kept"
    lines.append(("Decision", f"{decided} ({report.reason}): {report.rule}"))
    if report.sidecar_reason is not None:
        lines.append(("Sidecar", report.sidecar_reason))
    if report.listed_in_spec is not None:
        listed = "lists the pod" if report.listed_in_spec else "does not list the pod"
        lines.append(("Spec", f"AmbientNodeConfig {report.node} {listed}"))
    status = report.status
    if status is not None:
        said = style.word(status.state)
        if status.reason and status.reason != status.state:
            said += f" ({status.reason})"
        said += f" for {age(status.since, now)}"
        lines.append(("Status", said))
        if status.message:
            lines.append(("Message", _one_line(status.message)))
        if status.capture:
            lines.append(("Capture", status.capture))
        if status.last_repair is not None:
            repair = status.last_repair
            lines.append(
                (
                    "Last repair",
                    f"{age(repair.time, now)} ago, {repair.reason}: {_one_line(repair.message)}"
                    + (
                        f" ({repair.times} repairs since the agent last enrolled it)"
                        if repair.times > 1
                        else ""
                    ),
                )
            )
    elif report.node_facts is not None:
        lines.append(("Status", f"AmbientNodeConfig {report.node} does not mention the pod"))
    annotation = names.REDIRECTION_ANNOTATION
    lines.append(
        (
            "Annotation",
            f"{annotation}={report.annotation}"
            if report.annotation is not None
            else f"{annotation} not set",
        )
    )
    width = max(len(key) for key, _ in lines) + 2
    text = [f"{key + ':':<{width}}{value}" for key, value in lines]
    if report.findings:
        text.append("Findings:")
        text += [f"  - {finding.message}" for finding in report.findings]
    else:
        text.append(_AGREEMENT[report.verdict])
    if report.note:
        text.append(f"Note: {report.note}")
    if report.warnings:
        text.append("Warnings:")
        text += [f"  - {warning}" for warning in report.warnings]
    return "\n".join(text) + "\n"


# -- status ----------------------------------------------------------------------------


def status_text(view: Overview, style: Style, *, wide: bool) -> str:
    out = []
    controller = view.controller
    if not controller.found:
        said = f"unknown: {controller.problem} (leader election off, or another namespace: -i)"
    elif controller.leading:
        said = f"leading: {controller.holder}, version {controller.version or 'unknown'}"
    else:
        said = style.paint("no replica leading", "red")
    out.append(f"Controller:   {said}")
    versions: dict[str, list[str]] = {}
    for node in view.nodes:
        versions.setdefault(node.agent_version or "unknown", []).append(node.name)
    agents = ", ".join(f"{v} on {len(n)} node(s)" for v, n in sorted(versions.items()))
    out.append(f"Node agents:  {agents or 'none'}")
    out.append("")
    headers = ["NODE", "MODE", "BACKEND", "ZTUNNEL", "ENROLLED", "SIDECARS", "PENDING"]
    headers += ["FAILED", "READY"]
    if wide:
        headers += ["AGENT", "WHY NOT READY"]
    rows = []
    for node in view.nodes:
        row = [
            node.name,
            node.mode or "-",
            node.backend or "-",
            node.ztunnel,
            str(node.enrolled),
            str(node.sidecars),
            str(node.pending),
            str(node.failed),
            "-" if node.idle else "True" if node.ready else "False",
        ]
        if wide:
            row += [node.agent_version or "-", _one_line(node.why_not_ready) or "-"]
        rows.append(row)
    if rows:
        out += table(headers, rows, style, ["READY"])
    else:
        out.append("No AmbientNodeConfigs found: is the controller running?")
    if view.not_enrolled:
        out += ["", "Pods whose redirection is not as selected:"]
        for group in view.not_enrolled:
            more = (
                f" and {group.count - len(group.pods)} more"
                if group.count > len(group.pods)
                else ""
            )
            out.append(f"  {group.count} {style.word(group.state)} {group.reason}: {group.example}")
            out.append(f"      {', '.join(group.pods)}{more}")
    if view.orphans:
        out += ["", "Orphaned objects:"]
        out += [f"  {orphan}" for orphan in view.orphans]
    out.append("")
    if view.ready:
        out.append(f"Status:       {style.word('Ready')}")
    else:
        out.append(f"Status:       {style.word('Not ready')}")
        out += [f"  - {problem}" for problem in view.problems]
    return "\n".join(out) + "\n"
