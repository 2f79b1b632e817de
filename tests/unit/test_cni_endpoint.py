"""The agent's answers to the CNI plugin (CniEndpoint), with its edges replaced by fakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ambient_cni.agent.cni_endpoint import CniEndpoint, PluginEvent
from ambient_cni.agent.mode import outcome
from ambient_cni.agent.status import PodOutcome
from ambient_cni.api.models import Workload
from ambient_cni.selection import SelectionConfig

# What the Go plugin sends: Istio's body (Go field names, the IPs as the CNI library
# marshals a result's) and two fields more.
BODY = (
    '{"Netns":"/var/run/netns/cni-1","PodName":"web","PodNamespace":"shop","PodUID":"u-1",'
    '"ContainerID":"c-1","IPs":[{"interface":2,"address":"10.244.0.7/24",'
    '"gateway":"10.244.0.1"}]}'
)


def pod(uid: str = "u-1", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid, "name": "web", "namespace": "shop", "labels": labels or {}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "main"}]},
        "status": {"phase": "Pending"},
    }


class Pods:
    def __init__(self, found: dict[str, Any] | None, ns_labels: dict[str, str] | None):
        self.found = found
        self.ns_labels = ns_labels

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.found

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        return self.ns_labels


class Enroller:
    def __init__(self, state: str = "Enrolled", reason: str | None = None):
        self.state_after = state
        self.reason = reason
        self.enrolled: list[Workload] = []
        self.deleted: list[str] = []

    def enrol_now(self, workload: Workload, timeout: float) -> PodOutcome:
        self.enrolled.append(workload)
        return outcome(workload, self.state_after, self.reason, "ztunnel is not connected")

    def cni_deleted(self, uid: str) -> None:
        self.deleted.append(uid)

    def state(self, uid: str) -> str | None:
        return self.state_after if self.enrolled else None


class Reports:
    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def report(self, uid: str, netns: Path) -> None:
        self.paths[uid] = netns

    def forget(self, uid: str) -> None:
        self.paths.pop(uid, None)


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def endpoint(pods: Pods, enroller: Enroller, reports: Reports | None = None) -> CniEndpoint:
    return CniEndpoint("node-1", pods, enroller, reports or Reports(), SelectionConfig())


def test_an_ambient_pod_is_enrolled_with_the_plugins_ips_and_netns_before_the_answer() -> None:
    enroller, reports = Enroller(), Reports()
    answer = endpoint(Pods(pod(), AMBIENT), enroller, reports).add(
        PluginEvent.model_validate_json(BODY)
    )
    assert answer.ok
    assert [w.ips for w in enroller.enrolled] == [["10.244.0.7"]]
    assert reports.paths == {"u-1": Path("/var/run/netns/cni-1")}


def test_a_pod_outside_the_mesh_is_answered_at_once_without_enrolment() -> None:
    enroller = Enroller()
    answer = endpoint(Pods(pod(), {}), enroller).add(PluginEvent.model_validate_json(BODY))
    assert answer.ok
    assert "NotSelected" in answer.message
    assert enroller.enrolled == []


def test_an_enrolment_that_does_not_finish_fails_the_add_with_its_reason() -> None:
    enroller = Enroller(state="Pending", reason="ZtunnelNotConnected")
    answer = endpoint(Pods(pod(), AMBIENT), enroller).add(PluginEvent.model_validate_json(BODY))
    assert not answer.ok
    assert "shop/web" in answer.message
    assert "ZtunnelNotConnected" in answer.message


def test_a_missing_pod_or_another_pod_by_that_name_fails_the_add() -> None:
    event = PluginEvent.model_validate_json(BODY)
    assert "not in the API server" in endpoint(Pods(None, AMBIENT), Enroller()).add(event).message
    other = endpoint(Pods(pod(uid="u-2"), AMBIENT), Enroller()).add(event)
    assert not other.ok
    assert "another pod" in other.message


def test_del_forgets_the_netns_and_never_fails() -> None:
    enroller, reports = Enroller(), Reports()
    reports.report("u-1", Path("/var/run/netns/cni-1"))
    answer = endpoint(Pods(None, None), enroller, reports).delete(
        PluginEvent.model_validate_json(BODY)
    )
    assert answer.ok
    assert reports.paths == {}
    assert enroller.deleted == ["u-1"]


def test_addresses_that_are_not_ips_never_reach_a_workload() -> None:
    event = PluginEvent.model_validate_json(BODY.replace("10.244.0.7", "10.244.0.7; rm -rf"))
    answer = endpoint(Pods(pod(), AMBIENT), Enroller()).add(event)
    assert not answer.ok
    assert "no IP" in answer.message


def test_a_late_del_of_an_earlier_sandbox_leaves_the_current_one_alone() -> None:
    enroller, reports = Enroller(), Reports()
    api = endpoint(Pods(pod(), AMBIENT), enroller, reports)
    assert api.add(PluginEvent.model_validate_json(BODY.replace('"c-1"', '"c-2"'))).ok
    assert api.delete(PluginEvent.model_validate_json(BODY)).ok  # c-1's DEL, late
    assert reports.paths == {"u-1": Path("/var/run/netns/cni-1")}
    assert enroller.deleted == []


def test_an_add_without_a_netns_is_refused_and_a_del_without_one_accepted() -> None:
    event = PluginEvent.model_validate_json(BODY.replace("/var/run/netns/cni-1", ""))
    enroller = Enroller()
    assert not endpoint(Pods(pod(), AMBIENT), enroller).add(event).ok
    assert endpoint(Pods(pod(), AMBIENT), enroller).delete(event).ok
    assert enroller.enrolled == []


def sidecar_pod(annotations: dict[str, str]) -> dict[str, Any]:
    found = pod()
    found["metadata"]["annotations"] = {"sidecar.istio.io/status": "{}", **annotations}
    found["spec"]["containers"].append({"name": "istio-proxy", "args": ["proxy", "sidecar"]})
    return found


def test_a_sidecar_pod_gets_its_capture_before_the_answer_and_no_ambient_redirection() -> None:
    enroller = Enroller()
    answer = endpoint(Pods(sidecar_pod({}), None), enroller).add(
        PluginEvent.model_validate_json(BODY)
    )
    assert (answer.ok, answer.message) == (True, "sidecar capture in place")
    [wanted] = enroller.enrolled
    assert wanted.sidecar is not None
    assert wanted.sidecar.interception_mode == "REDIRECT"
    assert wanted.ips == ["10.244.0.7"]


def test_a_sidecar_pod_with_a_malformed_annotation_is_refused_naming_it() -> None:
    enroller = Enroller()
    key = "traffic.sidecar.istio.io/includeOutboundIPRanges"
    answer = endpoint(Pods(sidecar_pod({key: "10.0.0.0/33"}), None), enroller).add(
        PluginEvent.model_validate_json(BODY)
    )
    assert not answer.ok
    assert answer.message == (
        f"pod shop/web: sidecar capture refused: annotation {key}='10.0.0.0/33': "
        "'10.0.0.0/33' is not a CIDR (address/bits)"
    )
    assert enroller.enrolled == []


def test_a_sidecar_pod_the_ambient_labels_select_gets_neither_as_in_istio() -> None:
    enroller = Enroller()
    answer = endpoint(Pods(sidecar_pod({}), AMBIENT), enroller).add(
        PluginEvent.model_validate_json(BODY)
    )
    assert (answer.ok, answer.message) == (True, "not redirected: SidecarPod")
    assert enroller.enrolled == []
