"""Who is enrolled in ambient, and whose sidecar is captured: pure functions over reduced
views of Pods and Namespaces.

Implements section 1 of the reference sheet: the namespace and pod
`istio.io/dataplane-mode` labels, the exclusions (excluded namespaces,
hostNetwork, sidecar pods, ztunnel and node agent pods, terminal pods,
`ambient.istio.io/redirection: disabled`) and the per-pod knobs; and for pods
with an injected sidecar, section 1 of the sidecar sheet (sidecar.py).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .api import names
from .api.models import MAX_VIRTUAL_INTERFACES, Workload, is_interface_name
from .sidecar import ProxyFacts, SidecarDecision, decide_sidecar, proxy_facts

Obj = Mapping[str, Any]


class SelectionConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    excluded_namespaces: frozenset[str] = frozenset(names.DEFAULT_EXCLUDED_NAMESPACES)
    system_namespace: str = names.DEFAULT_SYSTEM_NAMESPACE


class PodView(BaseModel):
    """What selection and planning need of a Pod (reduced from its API JSON)."""

    model_config = ConfigDict(frozen=True)

    uid: str
    name: str
    namespace: str
    node_name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    host_network: bool = False
    phase: str | None = None
    ips: tuple[str, ...] = ()
    service_account: str = "default"
    ready: bool = False
    deleting: bool = False
    created: str = ""
    proxy: ProxyFacts | None = None  # with an istio-proxy container: what sidecar.py reads


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    enrolled: bool
    reason: str  # CamelCase: why the pod is (or is not) enrolled
    warnings: tuple[str, ...] = ()  # annotations that were ignored, and why


# Only these annotations matter; keeping just them keeps the index small.
_RELEVANT_ANNOTATIONS = (
    names.REDIRECTION_ANNOTATION,
    names.SIDECAR_STATUS_ANNOTATION,
    names.DNS_CAPTURE_ANNOTATION,
    names.BYPASS_INBOUND_CAPTURE_ANNOTATION,
    names.REROUTE_VIRTUAL_INTERFACES_ANNOTATION,
)


def pod_view(pod: Obj) -> PodView:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    ips = tuple(str(entry.get("ip")) for entry in status.get("podIPs") or [] if entry.get("ip"))
    if not ips and status.get("podIP"):
        ips = (str(status["podIP"]),)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return PodView(
        uid=str(meta.get("uid", "")),
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        node_name=spec.get("nodeName") or None,
        labels=dict(meta.get("labels") or {}),
        annotations={k: str(v) for k, v in annotations.items() if k in _RELEVANT_ANNOTATIONS},
        host_network=bool(spec.get("hostNetwork")),
        phase=status.get("phase"),
        ips=ips,
        service_account=spec.get("serviceAccountName") or "default",
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        created=str(meta.get("creationTimestamp") or ""),
        proxy=proxy_facts(pod),
    )


# The only labels selection reads.
SELECTION_LABELS = (
    names.DATAPLANE_MODE_LABEL,
    names.ZTUNNEL_APP_LABEL,
    names.NODE_AGENT_LABEL,
)
_NONE: dict[str, str] = {}  # shared by every slim view without such labels or annotations
_SLIM_FIELDS = set(PodView.model_fields)
# One dict per distinct set of selection labels (an app's pods share theirs); never mutated.
_SHARED_LABELS: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}


def slim_pod_view(pod: Obj) -> PodView:
    """`pod_view` for a long-lived index: the same answers from selection and planning, with
    only the labels selection reads, the namespace and node names interned (a node's pods
    share one string) and no per-view validation or copies of empty maps: memory follows
    pods times a small constant. Every field is built here from the pod's JSON with its
    type, as `pod_view` builds it."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    ips = tuple(str(entry.get("ip")) for entry in status.get("podIPs") or [] if entry.get("ip"))
    if not ips and status.get("podIP"):
        ips = (str(status["podIP"]),)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    node = spec.get("nodeName") or None
    kept = tuple((k, str(labels[k])) for k in SELECTION_LABELS if k in labels)
    kept_labels = _SHARED_LABELS.setdefault(kept, dict(kept)) if kept else _NONE
    kept_annotations = {
        k: str(annotations[k]) for k in _RELEVANT_ANNOTATIONS if k in annotations
    } or _NONE
    return PodView.model_construct(
        _SLIM_FIELDS,
        uid=str(meta.get("uid", "")),
        name=str(meta.get("name", "")),
        namespace=sys.intern(str(meta.get("namespace", ""))),
        node_name=sys.intern(str(node)) if node else None,
        labels=kept_labels,
        annotations=kept_annotations,
        host_network=bool(spec.get("hostNetwork")),
        phase=sys.intern(str(status["phase"])) if status.get("phase") else None,
        ips=ips,
        service_account=sys.intern(str(spec.get("serviceAccountName") or "default")),
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        created=str(meta.get("creationTimestamp") or ""),
        proxy=proxy_facts(pod),
    )


def is_node_agent(pod: PodView, config: SelectionConfig) -> bool:
    return (
        pod.namespace == config.system_namespace
        and pod.labels.get(names.NODE_AGENT_LABEL) == names.NODE_AGENT_APP
    )


def is_ztunnel(pod: PodView, config: SelectionConfig) -> bool:
    return (
        pod.namespace == config.system_namespace
        and pod.labels.get(names.ZTUNNEL_APP_LABEL) == names.ZTUNNEL_APP
    )


def decide(
    pod: PodView, namespace_labels: Mapping[str, str] | None, config: SelectionConfig
) -> Decision:
    """Whether `pod` is enrolled, given its namespace's labels (None: namespace unknown)."""
    pod_mode = pod.labels.get(names.DATAPLANE_MODE_LABEL)
    ns_mode = (namespace_labels or {}).get(names.DATAPLANE_MODE_LABEL)
    if pod.namespace in config.excluded_namespaces:
        return Decision(enrolled=False, reason="ExcludedNamespace")
    if pod.host_network:
        return Decision(enrolled=False, reason="HostNetwork")
    if names.SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return Decision(enrolled=False, reason="SidecarPod")
    if is_ztunnel(pod, config):
        return Decision(enrolled=False, reason="ZtunnelPod")
    if is_node_agent(pod, config):
        return Decision(enrolled=False, reason="NodeAgentPod")
    if pod.phase in ("Succeeded", "Failed"):
        return Decision(enrolled=False, reason="Terminal")
    if pod_mode == names.DATAPLANE_MODE_NONE:
        return Decision(enrolled=False, reason="OptedOut")
    if names.DATAPLANE_MODE_AMBIENT not in (pod_mode, ns_mode):
        return Decision(enrolled=False, reason="NotSelected")
    if pod.annotations.get(names.REDIRECTION_ANNOTATION) == names.REDIRECTION_DISABLED:
        return Decision(enrolled=False, reason="RedirectionDisabled")
    if not pod.node_name:
        return Decision(enrolled=False, reason="NotScheduled")
    if not pod.ips:
        return Decision(enrolled=False, reason="NoPodIP")
    _, warnings = knobs(pod)
    reason = "PodLabel" if pod_mode == names.DATAPLANE_MODE_AMBIENT else "NamespaceLabel"
    return Decision(enrolled=True, reason=reason, warnings=warnings)


class Knobs(BaseModel):
    model_config = ConfigDict(frozen=True)

    dns_capture: bool | None = None
    bypass_inbound_capture: bool | None = None
    reroute_virtual_interfaces: tuple[str, ...] = ()


def _boolean(pod: PodView, key: str, warnings: list[str]) -> bool | None:
    value = pod.annotations.get(key)
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    warnings.append(f'{key}={value!r} ignored: use "true" or "false"')
    return None


def _interfaces(pod: PodView, warnings: list[str]) -> list[str]:
    """The interface names of the annotation; one bad name drops the whole value (nothing
    half-applied), with a warning that names the annotation and the value."""
    key = names.REROUTE_VIRTUAL_INTERFACES_ANNOTATION
    raw = pod.annotations.get(key)
    if raw is None:
        return []
    items = list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    bad = [item for item in items if not is_interface_name(item)]
    if bad or len(items) > MAX_VIRTUAL_INTERFACES:
        why = (
            f"{bad[0]!r} is not an interface name (at most 15 of A-Z a-z 0-9 _ . -, "
            "not starting with . or -)"
            if bad
            else f"more than {MAX_VIRTUAL_INTERFACES} interfaces"
        )
        warnings.append(f"{key}={raw!r} ignored: {why}")
        return []
    return items


def knobs(pod: PodView) -> tuple[Knobs, tuple[str, ...]]:
    """The per-pod annotations, parsed; malformed values are ignored with a warning."""
    warnings: list[str] = []
    dns = _boolean(pod, names.DNS_CAPTURE_ANNOTATION, warnings)
    bypass = _boolean(pod, names.BYPASS_INBOUND_CAPTURE_ANNOTATION, warnings)
    interfaces = _interfaces(pod, warnings)
    return (
        Knobs(
            dns_capture=dns,
            # Only "true" changes anything; "false" is the default, so it is not written.
            bypass_inbound_capture=True if bypass else None,
            reroute_virtual_interfaces=tuple(interfaces),
        ),
        tuple(warnings),
    )


def workload(pod: PodView) -> Workload:
    """The spec entry of an enrolled pod."""
    parsed, _ = knobs(pod)
    return _entry(
        pod,
        dns_capture=parsed.dns_capture,
        bypass_inbound_capture=parsed.bypass_inbound_capture,
        reroute_virtual_interfaces=list(parsed.reroute_virtual_interfaces),
    )


def _entry(pod: PodView, **options: Any) -> Workload:
    """A pod's spec entry: who it is and its addresses, with the options of its kind."""
    return Workload(
        uid=pod.uid,
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        ips=list(pod.ips[:2]),
        **options,
    )


def ambient_selected(pod: PodView, namespace_labels: Mapping[str, str] | None) -> bool:
    """Whether the ambient labels select the pod (Istio's enablement selectors)."""
    pod_mode = pod.labels.get(names.DATAPLANE_MODE_LABEL)
    ns_mode = (namespace_labels or {}).get(names.DATAPLANE_MODE_LABEL)
    return pod_mode != names.DATAPLANE_MODE_NONE and names.DATAPLANE_MODE_AMBIENT in (
        pod_mode,
        ns_mode,
    )


def decide_sidecar_pod(
    pod: PodView, namespace_labels: Mapping[str, str] | None, config: SelectionConfig
) -> SidecarDecision:
    """Whether a pod gets sidecar capture: Istio's plugin skips its own agent's pods and
    excluded namespaces, leaves a pod the ambient labels select to the ambient path (which
    redirects no sidecar pod: such a pod gets neither, as in Istio), then looks at the
    pod's proxy."""
    if pod.namespace in config.excluded_namespaces:
        return SidecarDecision(captured=False, reason="ExcludedNamespace")
    if is_node_agent(pod, config):
        return SidecarDecision(captured=False, reason="NodeAgentPod")
    if ambient_selected(pod, namespace_labels):
        return SidecarDecision(captured=False, reason="AmbientSelected")
    return decide_sidecar(pod.proxy)


def sidecar_workload(
    pod: PodView, namespace_labels: Mapping[str, str] | None, config: SelectionConfig
) -> Workload | None:
    """The spec entry of a pod whose sidecar's capture the agent keeps, if it has one: a
    running pod of its own network namespace, with an address."""
    if pod.host_network or pod.phase in ("Succeeded", "Failed") or not pod.node_name:
        return None
    if not pod.ips:
        return None
    decision = decide_sidecar_pod(pod, namespace_labels, config)
    if decision.capture is None:
        return None
    return _entry(pod, sidecar=decision.capture)


def desired_workload(
    pod: PodView, namespace_labels: Mapping[str, str] | None, config: SelectionConfig
) -> Workload | None:
    """The pod's entry in its node's spec, if it has one: ambient redirection when selection
    enrols it, otherwise its sidecar's capture (never both: an ambient pod is not a sidecar
    pod). The controller plans with this and `kubectl ambient why` checks against it."""
    if decide(pod, namespace_labels, config).enrolled:
        return workload(pod)
    if pod.proxy is not None:
        return sidecar_workload(pod, namespace_labels, config)
    return None
