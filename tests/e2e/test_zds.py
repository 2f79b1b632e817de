"""ZDS between the agent's server and the stand-in's client, with real netns fds."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ambient_cni.agent.interfaces import ZdsError
from ambient_cni.agent.zds_server import ZdsServer
from ambient_cni.netns import netns_inode
from ambient_cni.zds import (
    WorkloadInfo,
    WorkloadRequest,
)
from ambient_cni_sandbox.cluster import wait_for
from ambient_cni_sandbox.zds_client import ZdsClient


@pytest.fixture
def netns_factory() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def new_netns(made: list[str]) -> Path:
    name = f"acni-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    made.append(name)
    return Path("/run/netns", name)


@dataclass
class StandIn:
    """A ZDS client that records what it was told and the netns each fd was."""

    socket_path: Path
    nack: set[str] = field(default_factory=set)
    silent: bool = False
    seen: list[tuple[str, str, int | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def handle(self, request: WorkloadRequest, fd: int | None) -> str:
        inode = os.fstat(fd).st_ino if fd is not None else None
        if fd is not None:
            os.close(fd)
        uid = getattr(request, "uid", "")
        self.seen.append((type(request).__name__, uid, inode))
        if self.silent:
            self.stop.wait()
        return "refused by test" if uid in self.nack else ""

    def last(self) -> tuple[str, str, int | None]:
        return self.seen[-1]

    def start(self) -> ZdsClient:
        client = ZdsClient(self.socket_path, self.handle)
        assert client.connect(self.stop)
        threading.Thread(target=client.serve, args=(self.stop,), daemon=True).start()
        return client


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "ztunnel" / "ztunnel.sock"


def test_snapshot_then_incremental_adds_and_dels(
    socket_path: Path, netns_factory: list[str]
) -> None:
    pod_a, pod_b = new_netns(netns_factory), new_netns(netns_factory)
    server = ZdsServer(socket_path)
    # Known before any ztunnel connects: uid-k's netns is gone by the time one does.
    pod_k = new_netns(netns_factory)
    for uid, pod in (("uid-a", pod_a), ("uid-k", pod_k)):
        with pytest.raises(ZdsError):
            server.add(uid, WorkloadInfo(uid[-1], "shop", "sa"), pod)
    subprocess.run(["ip", "netns", "delete", pod_k.name], check=True)
    netns_factory.remove(pod_k.name)
    server.start()
    first = StandIn(socket_path)
    try:
        first.start()
        wait_for("the first session", lambda: server.connected)
        assert first.seen == [
            ("AddWorkload", "uid-a", netns_inode(pod_a)),
            ("KeepWorkload", "uid-k", None),
            ("SnapshotSent", "", None),
        ]

        assert server.holds("uid-a")
        assert not server.holds("uid-k")  # a Keep hands over nothing
        server.add("uid-b", WorkloadInfo("b", "shop", "sa"), pod_b)
        assert first.last() == ("AddWorkload", "uid-b", netns_inode(pod_b))
        assert server.holds("uid-b")

        # A second ztunnel (a rollout): Adds go to the newest, Dels to both.
        second = StandIn(socket_path, nack={"uid-b"})
        second.start()
        wait_for("the second session", lambda: ("SnapshotSent", "", None) in second.seen)
        wait_for("both registered", lambda: len(server._connections) == 2)
        server.add("uid-c", WorkloadInfo("c", "shop", "sa"), pod_b)
        assert second.last()[:2] == ("AddWorkload", "uid-c")
        assert ("AddWorkload", "uid-c", netns_inode(pod_b)) not in first.seen
        assert server.holds("uid-a")  # the second session's snapshot replayed it
        # Every remembered pod is in a new session's snapshot; one it refused is not held.
        assert ("AddWorkload", "uid-b", netns_inode(pod_b)) in second.seen
        assert not server.holds("uid-b")  # acked by the first session only
        server.delete("uid-a")
        assert first.last() == ("DelWorkload", "uid-a", None)
        assert second.last() == ("DelWorkload", "uid-a", None)
        second.stop.set()
    finally:
        first.stop.set()
        server.stop()
    assert not socket_path.exists()


def test_nack_not_connected_and_disconnect(socket_path: Path, netns_factory: list[str]) -> None:
    pod = new_netns(netns_factory)
    changes: list[bool] = []
    server = ZdsServer(socket_path, on_change=lambda: changes.append(server.connected))
    server.start()
    try:
        with pytest.raises(ZdsError) as caught:
            server.add("uid", WorkloadInfo("p", "ns", "sa"), pod)
        assert caught.value.reason == "ZtunnelNotConnected"

        stand_in = StandIn(socket_path, nack={"bad"})
        stand_in.start()
        wait_for("connected", lambda: server.connected)
        with pytest.raises(ZdsError) as caught:
            server.add("bad", WorkloadInfo("p", "ns", "sa"), pod)
        assert caught.value.reason == "ZtunnelRejected"
        assert "refused by test" in caught.value.message
        server.add("good", WorkloadInfo("p", "ns", "sa"), pod)  # the session survives a NACK

        stand_in.stop.set()  # ztunnel goes away while idle
        wait_for("the server to notice", lambda: not server.connected)
        # on_change is told just after the flag flips: wait for it too.
        wait_for("the disconnect to be told", lambda: changes[-1] is False)
        assert changes[0] is True
    finally:
        server.stop()


def test_a_ztunnel_that_never_acks_times_out(socket_path: Path, netns_factory: list[str]) -> None:
    pod = new_netns(netns_factory)
    server = ZdsServer(socket_path, ack_deadline=0.5)
    server.start()
    stand_in = StandIn(socket_path)
    try:
        stand_in.start()
        wait_for("connected", lambda: server.connected)
        stand_in.silent = True
        with pytest.raises(ZdsError) as caught:
            server.add("slow", WorkloadInfo("p", "ns", "sa"), pod)
        assert caught.value.reason == "ZtunnelTimeout"
        assert not server.connected  # a session that missed a deadline is dropped
    finally:
        stand_in.stop.set()
        server.stop()
