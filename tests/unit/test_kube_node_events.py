"""KubeNodeEvents: the agent's notes reach the recorder on the node's AmbientNodeConfig, each
with the number of occurrences it stands for."""

from __future__ import annotations

from typing import Any

from ambient_cni.agent.events import EventNote
from ambient_cni.agent.kube_writers import KubeNodeEvents


class Recorder:
    def __init__(self) -> None:
        self.recorded: list[tuple[Any, ...]] = []

    def record(self, ref: Any, event_type: str, reason: str, message: str, count: int = 1) -> None:
        self.recorded.append((ref.kind, ref.name, ref.uid, event_type, reason, message, count))


def test_each_note_is_recorded_on_the_nodes_object_with_its_count() -> None:
    recorder = Recorder()
    events = KubeNodeEvents(recorder, "node-1")  # type: ignore[arg-type]
    events.record(
        "anc-uid",
        [
            EventNote("Warning", "DriftRepaired", "pod shop/web: redirection repaired", count=3),
            EventNote("Normal", "ZtunnelConnected", "ztunnel connected"),
        ],
    )
    assert recorder.recorded == [
        ("AmbientNodeConfig", "node-1", "anc-uid", "Warning", "DriftRepaired",
         "pod shop/web: redirection repaired", 3),
        ("AmbientNodeConfig", "node-1", "anc-uid", "Normal", "ZtunnelConnected",
         "ztunnel connected", 1),
    ]  # fmt: skip
