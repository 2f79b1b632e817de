"""The API objects the plugin reads, parsed once into the operator's own models.

A malformed AmbientNodeConfig (an older schema, a hand edit) does not stop the plugin: its
spec or status is left out and `problem` says why, so the rest of the cluster still shows.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from ambient_cni.api import names
from ambient_cni.api.models import (
    AmbientNodeConfigSpec,
    AmbientNodeConfigStatus,
    Condition,
    ConditionType,
    Workload,
    WorkloadStatus,
)

AGENT_VERSION_FIELD = "agentVersion"


class Report(BaseModel):
    """What a command says: frozen, camelCase in JSON and YAML as Kubernetes objects are."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)


class NodeObject(BaseModel):
    """One AmbientNodeConfig: its node's desired state (spec) and actual state (status)."""

    model_config = ConfigDict(frozen=True)

    name: str
    uid: str = ""
    generation: int = 0
    orphaned: bool = False
    spec: AmbientNodeConfigSpec | None = None
    status: AmbientNodeConfigStatus | None = None
    agent_version: str | None = None
    problem: str | None = None  # why spec or status could not be read

    def spec_entry(self, uid: str) -> Workload | None:
        for entry in self.spec.workloads if self.spec else ():
            if entry.uid == uid:
                return entry
        return None

    def status_entry(self, uid: str) -> WorkloadStatus | None:
        for entry in self.status.workloads if self.status else ():
            if entry.uid == uid:
                return entry
        return None

    def condition(self, kind: ConditionType) -> Condition | None:
        for condition in self.status.conditions if self.status else ():
            if condition.type == kind:
                return condition
        return None

    @property
    def in_sync(self) -> bool:
        """Whether the agent has reported on the spec as it is now."""
        return self.status is not None and self.status.observed_generation == self.generation

    @property
    def ready(self) -> bool:
        ready = self.condition("Ready")
        return self.in_sync and ready is not None and ready.status == "True"


def _short(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" + (
        f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    )


def node_object(obj: Mapping[str, Any]) -> NodeObject:
    meta = obj.get("metadata") or {}
    problems = []
    spec = status = None
    try:
        spec = AmbientNodeConfigSpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        problems.append(f"spec unreadable: {_short(exc)}")
    raw_status = obj.get("status")
    if raw_status:
        try:
            status = AmbientNodeConfigStatus.model_validate(raw_status)
        except ValidationError as exc:
            problems.append(f"status unreadable: {_short(exc)}")
    labels = meta.get("labels") or {}
    version = (raw_status or {}).get(AGENT_VERSION_FIELD)
    return NodeObject(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        orphaned=labels.get(names.ORPHANED_LABEL) == "true",
        spec=spec,
        status=status,
        agent_version=str(version) if version else None,
        problem="; ".join(problems) or None,
    )


class ControllerInfo(BaseModel):
    """What the leading controller says of itself on its leader-election Lease; with
    `found` false, why the Lease could not be read (`problem`)."""

    model_config = ConfigDict(frozen=True)

    found: bool = True
    problem: str | None = None
    # The API server's clock when the Lease was read: "leading" is judged on it, so a
    # laptop's clock that is off does not make a live controller look gone.
    server_time: datetime.datetime | None = None
    holder: str | None = None
    renewed: datetime.datetime | None = None
    duration_seconds: int = 15
    version: str | None = None
    excluded_namespaces: tuple[str, ...] | None = None
    system_namespace: str | None = None
    redirect_mode: str | None = None

    def leading(self, now: datetime.datetime) -> bool:
        if not self.holder or self.renewed is None:
            return False
        at = self.server_time or now
        # The Date header has whole seconds: one more of slack.
        return at <= self.renewed + datetime.timedelta(seconds=self.duration_seconds + 1)


def controller_info(
    lease: Mapping[str, Any], server_time: datetime.datetime | None = None
) -> ControllerInfo:
    meta = lease.get("metadata") or {}
    spec = lease.get("spec") or {}
    notes = meta.get("annotations") or {}
    renewed = spec.get("renewTime")
    excluded = notes.get(names.CONTROLLER_EXCLUDED_NAMESPACES_ANNOTATION)
    return ControllerInfo(
        server_time=server_time,
        holder=spec.get("holderIdentity") or None,
        renewed=datetime.datetime.fromisoformat(str(renewed).replace("Z", "+00:00"))
        if renewed
        else None,
        duration_seconds=int(spec.get("leaseDurationSeconds") or 15),
        version=notes.get(names.CONTROLLER_VERSION_ANNOTATION),
        excluded_namespaces=tuple(n for n in excluded.split(",") if n)
        if excluded is not None
        else None,
        system_namespace=notes.get(names.CONTROLLER_SYSTEM_NAMESPACE_ANNOTATION),
        redirect_mode=notes.get(names.CONTROLLER_REDIRECT_MODE_ANNOTATION),
    )
