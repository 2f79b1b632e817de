"""SidecarMode.enrol/unenrol, with its edges (dataplane, netns lookup) replaced by fakes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ambient_cni.agent.mode import NodeDefaults, PodState
from ambient_cni.agent.sidecar_mode import SidecarMode
from ambient_cni.api.models import Backend, SidecarCapture, Workload
from ambient_cni.dataplane.errors import DataplaneError
from ambient_cni.dataplane.interfaces import NO_CHANGES, Change, Changes

NETNS = Path("/run/netns/pod-1")
WEB = Workload(uid="u-1", name="web", namespace="shop", ips=["10.0.0.5"], sidecar=SidecarCapture())


class Dataplane:
    backend: Backend = "iptables-nft"

    def __init__(self) -> None:
        self.answers: list[Changes | DataplaneError] = []
        self.calls: list[tuple[Path, SidecarCapture, tuple[int, ...]]] = []

    def ensure(self, netns: Path, capture: SidecarCapture, families: Sequence[int]) -> Changes:
        self.calls.append((netns, capture, tuple(families)))
        answer = self.answers.pop(0) if self.answers else NO_CHANGES
        if isinstance(answer, DataplaneError):
            raise answer
        return answer


class Netns:
    def __init__(self) -> None:
        self.held: dict[str, Path] = {}

    def resolve(self, uid: str, ips: Iterable[str]) -> Path:
        return NETNS

    def hold(self, uid: str, netns: Path) -> Path:
        self.held[uid] = netns
        return netns

    def held_path(self, uid: str) -> Path | None:
        return self.held.get(uid)

    def release(self, uid: str) -> None:
        self.held.pop(uid, None)


def mode() -> tuple[SidecarMode, Dataplane, Netns]:
    dataplane, netns = Dataplane(), Netns()
    found = SidecarMode(dataplane=dataplane, resolver=netns, handles=_Handles(netns))
    return found, dataplane, netns


class _Handles:
    def __init__(self, netns: Netns):
        self.netns = netns

    def hold(self, uid: str, netns: Path) -> Path:
        return self.netns.hold(uid, netns)

    def held(self, uid: str) -> Path | None:
        return self.netns.held_path(uid)

    def release(self, uid: str) -> None:
        self.netns.release(uid)


def enrolled(sidecar: SidecarMode, pod: PodState) -> PodState:
    first = sidecar.enrol(pod, NodeDefaults())
    assert first.more
    assert first.state is not None
    second = sidecar.enrol(first.state, NodeDefaults())
    assert second.state is not None
    return second.state


def test_capture_applied_then_enrolled_and_drift_repaired_with_a_reason() -> None:
    sidecar, dataplane, netns = mode()
    pod = enrolled(sidecar, PodState.new(WEB))
    assert (pod.outcome.state, pod.outcome.reason) == ("Enrolled", "Captured")
    assert pod.outcome.capture is not None
    assert dataplane.calls == [(NETNS, SidecarCapture(), (4,))]
    assert netns.held == {"u-1": NETNS}

    dataplane.answers.append(Changes((Change("rules", "IPv4 nat: 3 of our rules missing"),)))
    pod = enrolled(sidecar, pod)
    assert pod.outcome.state == "Enrolled"
    assert pod.outcome.last_repair is not None
    assert pod.outcome.last_repair.reason == "DriftRepaired"
    assert pod.outcome.last_repair.message == "IPv4 nat: 3 of our rules missing"
    assert pod.outcome.last_repair.count == 1

    dataplane.answers.append(Changes((Change("rules", "IPv4 nat: 1 of our rules missing"),)))
    pod = enrolled(sidecar, pod)
    assert pod.outcome.last_repair is not None
    assert pod.outcome.last_repair.count == 2, "a second repair is counted, even in the same second"


def test_a_refused_ruleset_fails_the_pod_with_the_kernels_words() -> None:
    sidecar, dataplane, _ = mode()
    dataplane.answers.append(DataplaneError("RuleRejected", "iptables-restore: line 3 failed"))
    step = sidecar.enrol(PodState.new(WEB), NodeDefaults())
    assert step.state is not None
    assert (step.state.outcome.state, step.state.outcome.reason) == ("Failed", "RuleRejected")
    assert step.retry is not None


def test_leaving_the_spec_forgets_the_pod_and_leaves_its_rules() -> None:
    sidecar, dataplane, netns = mode()
    pod = enrolled(sidecar, PodState.new(WEB))
    calls = len(dataplane.calls)
    assert sidecar.unenrol(pod, set()).state is None
    assert netns.held == {}
    assert len(dataplane.calls) == calls  # nothing touched the pod's namespace
