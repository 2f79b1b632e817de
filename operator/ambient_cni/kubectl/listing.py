"""`kubectl ambient pods`: every pod the AmbientNodeConfigs mention, one row each, read from
those objects alone (no per-pod lookups: one list call however many pods there are)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from ambient_cni.api.models import Repair, WorkloadState

from .objects import NodeObject, Report

# A pod the spec lists and the status does not mention yet.
NOT_REPORTED = "NotReported"


class PodRow(Report):
    namespace: str
    name: str
    uid: str
    node: str
    mode: str  # inpod | node (ambient), or sidecar
    state: WorkloadState
    reason: str | None = None
    message: str | None = None
    since: datetime.datetime | None = None
    ips: tuple[str, ...] = ()
    last_repair: Repair | None = None


def _node_rows(node: NodeObject) -> list[PodRow]:
    status = node.status
    ambient_mode = (status.mode if status else None) or (
        node.spec.redirect_mode if node.spec else "inpod"
    )
    listed = {w.uid: w for w in node.spec.workloads} if node.spec else {}
    rows = []
    reported = set()
    for entry in status.workloads if status else ():
        reported.add(entry.uid)
        spec_entry = listed.get(entry.uid)
        sidecar = entry.capture is not None or (spec_entry is not None and spec_entry.sidecar)
        rows.append(
            PodRow(
                namespace=entry.namespace,
                name=entry.name,
                uid=entry.uid,
                node=node.name,
                mode="sidecar" if sidecar else ambient_mode,
                state=entry.state,
                reason=entry.reason,
                message=entry.message,
                since=entry.since,
                ips=tuple(spec_entry.ips) if spec_entry else (),
                last_repair=entry.last_repair,
            )
        )
    for uid, spec_entry in listed.items():
        if uid in reported:
            continue
        rows.append(
            PodRow(
                namespace=spec_entry.namespace,
                name=spec_entry.name,
                uid=uid,
                node=node.name,
                mode="sidecar" if spec_entry.sidecar else ambient_mode,
                state="Pending",
                reason=NOT_REPORTED,
                message="the node's agent has not reported on this pod yet",
                ips=tuple(spec_entry.ips),
            )
        )
    return rows


def pod_rows(nodes: Iterable[NodeObject], namespace: str | None = None) -> list[PodRow]:
    """Rows for every pod in `namespace` (None: every namespace), sorted as kubectl sorts."""
    rows = [row for node in nodes for row in _node_rows(node)]
    if namespace is not None:
        rows = [row for row in rows if row.namespace == namespace]
    return sorted(rows, key=lambda r: (r.namespace, r.name, r.uid))
