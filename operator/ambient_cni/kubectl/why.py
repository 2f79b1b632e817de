"""`kubectl ambient why POD`: the decision for one pod and the evidence, and whether they
agree. The decision is `selection.decide` and `selection.desired_workload`, the functions
the controller plans with; this module only puts words to them and compares."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Literal

from pydantic import computed_field

from ambient_cni.api import names
from ambient_cni.api.models import RedirectMode, Repair, WorkloadState
from ambient_cni.selection import (
    PodView,
    SelectionConfig,
    decide,
    decide_sidecar_pod,
    desired_workload,
)

from .objects import NodeObject, Report

Verdict = Literal["Redirected", "Captured", "NotRedirected", "Pending", "Failed", "Inconsistent"]
Handling = Literal["ambient", "sidecar"]

# What a person reads for each verdict.
VERDICT_WORDS: dict[Verdict, str] = {
    "Redirected": "in the mesh: its traffic is redirected to the node's ztunnel",
    "Captured": "captured by its own sidecar proxy",
    "NotRedirected": "not in the mesh, as selected",
    "Pending": "its redirection is being put in place or taken out, not done yet",
    "Failed": "selected, but its redirection failed",
    "Inconsistent": "the decision and the node's state disagree",
}


class NodeFacts(Report):
    """The pod's node as its AmbientNodeConfig shows it."""

    name: str
    mode: RedirectMode | None = None
    ready: bool = False
    in_sync: bool = False
    ztunnel_connected: bool = False


class StatusEntry(Report):
    """The pod's entry in its node's status."""

    state: WorkloadState
    reason: str | None = None
    message: str | None = None
    since: datetime.datetime | None = None
    last_repair: Repair | None = None
    capture: str | None = None


class Finding(Report):
    """Where the pieces disagree, or what is missing: a code for scripts and the status
    command's groups, and words for a person."""

    code: str
    message: str


class WhyReport(Report):
    namespace: str
    name: str
    uid: str
    node: str | None
    verdict: Verdict
    summary: str
    reason: str  # selection's reason (CamelCase), e.g. NamespaceLabel
    rule: str  # the rule that decided, in words
    warnings: tuple[str, ...] = ()
    handling: Handling | None = None  # what the pod should get
    sidecar_reason: str | None = None  # for a pod with an istio-proxy container
    listed_in_spec: bool | None = None  # None: no AmbientNodeConfig to look in
    node_facts: NodeFacts | None = None
    status: StatusEntry | None = None
    annotation: str | None = None
    findings: tuple[Finding, ...] = ()
    # How selection was configured when the running controller did not say (no Lease).
    note: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """Whether the pieces agree and nothing is in flight (the command's exit code)."""
        return self.verdict in ("Redirected", "Captured", "NotRedirected")


def rule_words(
    reason: str, pod: PodView, namespace_labels: Mapping[str, str] | None, config: SelectionConfig
) -> str:
    """The selection rule behind `reason`, as a platform engineer would say it."""
    label = names.DATAPLANE_MODE_LABEL
    ns_value = (namespace_labels or {}).get(label)
    match reason:
        case "NamespaceLabel":
            return f"namespace {pod.namespace} is labelled {label}={ns_value}"
        case "PodLabel":
            where = (
                f"namespace {pod.namespace} is labelled too"
                if ns_value == names.DATAPLANE_MODE_AMBIENT
                else f"namespace {pod.namespace} is not"
            )
            return f"the pod is labelled {label}=ambient ({where})"
        case "ExcludedNamespace":
            return (
                f"namespace {pod.namespace} is excluded from the mesh "
                f"(excluded: {', '.join(sorted(config.excluded_namespaces))})"
            )
        case "HostNetwork":
            return "the pod uses the node's network (hostNetwork: true)"
        case "SidecarPod":
            return (
                f"the pod has an injected sidecar ({names.SIDECAR_STATUS_ANNOTATION}); "
                "ambient never redirects it"
            )
        case "ZtunnelPod":
            return (
                f"the pod is a ztunnel ({names.ZTUNNEL_APP_LABEL}={names.ZTUNNEL_APP} "
                f"in {config.system_namespace})"
            )
        case "NodeAgentPod":
            return (
                f"the pod is a node agent ({names.NODE_AGENT_LABEL}={names.NODE_AGENT_APP} "
                f"in {config.system_namespace})"
            )
        case "Terminal":
            return f"the pod has finished (phase {pod.phase})"
        case "OptedOut":
            return f"the pod is labelled {label}=none, which overrides its namespace"
        case "NotSelected":
            if namespace_labels is None:
                return f"namespace {pod.namespace} does not exist"
            shown = f"{label}={ns_value}" if ns_value else f"no {label} label"
            return (
                f"neither the pod nor namespace {pod.namespace} is labelled {label}=ambient "
                f"(the namespace has {shown})"
            )
        case "RedirectionDisabled":
            return (
                f"the pod is annotated {names.REDIRECTION_ANNOTATION}={names.REDIRECTION_DISABLED}"
            )
        case "NotScheduled":
            return "the pod is not scheduled to a node yet"
        case "NoPodIP":
            return f"the pod has no IP address yet (node {pod.node_name})"
    return reason


def _status_entry(node: NodeObject | None, uid: str) -> StatusEntry | None:
    found = node.status_entry(uid) if node else None
    if found is None:
        return None
    return StatusEntry(
        state=found.state,
        reason=found.reason,
        message=found.message,
        since=found.since,
        last_repair=found.last_repair,
        capture=found.capture,
    )


def _node_facts(node: NodeObject) -> NodeFacts:
    status = node.status
    return NodeFacts(
        name=node.name,
        mode=status.mode
        if status and status.mode
        else node.spec.redirect_mode
        if node.spec
        else None,
        ready=node.ready,
        in_sync=node.in_sync,
        ztunnel_connected=bool(status and status.ztunnel and status.ztunnel.connected),
    )


def explain(
    pod: PodView,
    namespace_labels: Mapping[str, str] | None,
    config: SelectionConfig,
    node: NodeObject | None,
    *,
    note: str | None = None,
) -> WhyReport:
    """Why `pod` is or is not redirected, from selection, its node's spec and status and
    its annotation; `node` is the AmbientNodeConfig of the pod's node (None: none); `note`
    says how `config` was chosen when the controller did not say."""
    decision = decide(pod, namespace_labels, config)
    desired = desired_workload(pod, namespace_labels, config)
    handling: Handling | None = None
    if desired is not None:
        handling = "sidecar" if desired.sidecar is not None else "ambient"
    sidecar_reason = None
    if pod.proxy is not None:
        sidecar = decide_sidecar_pod(pod, namespace_labels, config)
        sidecar_reason = sidecar.reason + (f": {sidecar.error}" if sidecar.error else "")
    listed = None
    if node is not None and node.spec is not None:
        listed = node.spec_entry(pod.uid) is not None
    status = _status_entry(node, pod.uid)
    annotation = pod.annotations.get(names.REDIRECTION_ANNOTATION)
    findings = _findings(
        pod, handling=handling, node=node, listed=listed, status=status, annotation=annotation
    )
    verdict = _verdict(handling, status, findings)
    return WhyReport(
        namespace=pod.namespace,
        name=pod.name,
        uid=pod.uid,
        node=pod.node_name,
        verdict=verdict,
        summary=VERDICT_WORDS[verdict],
        reason=decision.reason,
        rule=rule_words(decision.reason, pod, namespace_labels, config),
        warnings=decision.warnings,
        handling=handling,
        sidecar_reason=sidecar_reason,
        listed_in_spec=listed,
        node_facts=_node_facts(node) if node is not None else None,
        status=status,
        annotation=annotation,
        findings=tuple(findings),
        note=note,
    )


def _findings(
    pod: PodView,
    *,
    handling: Handling | None,
    node: NodeObject | None,
    listed: bool | None,
    status: StatusEntry | None,
    annotation: str | None,
) -> list[Finding]:
    where = f"node {pod.node_name}"
    if pod.node_name and node is None:
        if handling is None:
            return []
        said = f"{where} has no AmbientNodeConfig: is the controller running?"
        return [Finding(code="NoNodeConfig", message=said)]
    found: list[Finding] = []
    if node is not None and node.problem:
        found.append(Finding(code="NodeConfigUnreadable", message=f"{where}: {node.problem}"))
    behind = node is not None and node.spec is not None and not node.in_sync
    if behind and (handling is not None or listed or status is not None):
        assert node is not None  # for mypy: `behind` says so
        reported = node.status.observed_generation if node.status else None
        found.append(
            Finding(
                code="AgentBehind",
                message=f"{where}'s agent has not reported on the current spec yet "
                f"(generation {node.generation}, reported {reported if reported else 'none'})",
            )
        )
    if handling is not None and listed is False:
        found.append(
            Finding(
                code="NotInSpec",
                message=f"{where}'s spec does not list the pod: the controller has not "
                "caught up, or decides with another configuration",
            )
        )
    if handling is None and listed:
        found.append(
            Finding(
                code="ListedButNotSelected",
                message=f"{where}'s spec lists the pod, but selection leaves it out: the "
                "controller has not caught up, or decides with another configuration",
            )
        )
    if listed and status is None and not behind:
        found.append(
            Finding(code="NotReported", message=f"{where}'s status does not mention the pod")
        )
    if handling is None and status is not None and status.state != "Removing" and not behind:
        found.append(
            Finding(
                code="StillInStatus",
                message=f"{where}'s status still holds the pod ({status.state})",
            )
        )
    found += _annotation_findings(handling, status, annotation)
    return found


def _annotation_findings(
    handling: Handling | None, status: StatusEntry | None, annotation: str | None
) -> list[Finding]:
    """The annotation against the status: `enabled` exactly while the pod is redirected
    (Enrolled, or Removing: still redirected until it can be taken out), `pending` while
    ztunnel has not taken it yet; a sidecar pod gets neither."""
    key = names.REDIRECTION_ANNOTATION
    state = status.state if status is not None else None
    if handling == "ambient" and state == "Enrolled" and annotation != names.REDIRECTION_ENABLED:
        return [
            Finding(
                code="AnnotationMissing",
                message=f"the status says Enrolled, but the annotation {key} is "
                f"{annotation or 'absent'}",
            )
        ]
    ours = (names.REDIRECTION_ENABLED, names.REDIRECTION_PENDING)
    if annotation in ours and state in (None, "Failed") and handling != "sidecar":
        in_place = "not in place" if state is None else "failed"
        return [
            Finding(
                code="AnnotationStale",
                message=f"the annotation {key} says {annotation}, but the pod's redirection "
                f"is {in_place}",
            )
        ]
    return []


def _verdict(
    handling: Handling | None, status: StatusEntry | None, findings: list[Finding]
) -> Verdict:
    state = status.state if status is not None else None
    if any(f.code == "AgentBehind" for f in findings):
        return "Pending"
    if handling is not None:
        if state == "Failed":
            return "Failed"
        if state != "Enrolled":
            return "Pending"
    elif state == "Removing":
        return "Pending"
    if findings:
        return "Inconsistent"
    if handling == "ambient":
        return "Redirected"
    if handling == "sidecar":
        return "Captured"
    return "NotRedirected"
