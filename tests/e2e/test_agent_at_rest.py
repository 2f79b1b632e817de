"""The agent at rest (issue 20): drift found from the kernel's own announcements, not by
re-reading every pod on a clock.

First the source alone, in namespaces of the test's own: a change is told for the namespace
where it happens and no other, the agent's own writes are not told. Then the agent on the
sandbox with its clocks set beyond the test (`--drift-interval` and `--resync-interval`
600 s): a rule flushed, or an `ip rule` deleted, in a pod's namespace can only be put back
because the kernel said so, and it is, within 2 s; meanwhile the agent starts no process.
"""

from __future__ import annotations

import queue
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient_cni.api import names
from ambient_cni.dataplane.libnftables import Nft
from ambient_cni.dataplane.nft_changes import NftablesChanges
from ambient_cni.dataplane.runner import SubprocessRunner
from ambient_cni.netns import NetnsWorkers
from ambient_cni_sandbox.cluster import SandboxCluster, wait_for
from ambient_cni_sandbox.components import Mesh
from benchmarks.idle import Forks
from tests.e2e.conftest import agent_args
from tests.e2e.test_nft_dataplane import new_netns
from tests.e2e.test_trust import holds_for

REPAIR_WITHIN = 2.0
QUIET = 0.5  # how long "nothing was told" is watched for


@pytest.fixture
def netns() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], check=False)


def foreign(*argv: str) -> None:
    """Run `argv` as someone else's process: not a child of this one, which the source
    (here in the test's own process) would rightly take for its own writer. The shell stays
    its parent (`; exit`)."""
    subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *argv], check=True)


def test_a_change_is_told_for_its_namespace_only_and_the_agents_own_are_not(
    netns: list[str],
) -> None:
    a, b = new_netns(netns), new_netns(netns)
    told: queue.SimpleQueue[str] = queue.SimpleQueue()
    changes = NftablesChanges()
    changes.start(told.put)

    def nothing_told() -> None:
        try:
            got = told.get(timeout=QUIET)
        except queue.Empty:
            return
        pytest.fail(f"a change told for {got}")

    try:
        assert changes.watch("a", Path("/run/netns", a))
        assert changes.watch("b", Path("/run/netns", b))
        foreign("ip", "netns", "exec", a, "nft", "add", "table", "inet", "t")
        assert told.get(timeout=5) == "a"
        nothing_told()
        rule = ["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-j", "ACCEPT"]
        foreign("ip", "netns", "exec", b, *rule)
        assert told.get(timeout=5) == "b"
        nothing_told()
        foreign("ip", "-n", b, "rule", "add", "pref", "32764", "lookup", "100")
        assert told.get(timeout=5) == "b"
        nothing_told()
        # The agent's own writes: libnftables on a thread of its own, and iptables-restore
        # started by its runner.
        workers = NetnsWorkers(1, name="own")
        workers.run(Path("/run/netns", a), lambda: Nft().run("add table inet own\n"))
        SubprocessRunner().run(
            ["iptables-nft-restore", "--noflush"],
            netns=Path("/run/netns", a),
            stdin="*nat\n-A OUTPUT -j ACCEPT\nCOMMIT\n",
        )
        workers.close()
        nothing_told()
        changes.unwatch("a")
        foreign("ip", "netns", "exec", a, "nft", "add", "table", "inet", "u")
        nothing_told()
    finally:
        changes.close()


@pytest.fixture(scope="module")
def resting(sandbox: SandboxCluster, backend: str) -> Iterator[Mesh]:
    running = Mesh(
        sandbox,
        "--drift-interval=600",
        "--resync-interval=600",
        "--redirect-modes=inpod",
        *agent_args(backend),
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


FLUSH = {
    "iptables-nft": ["iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"],
    "nftables": ["nft", "flush", "chain", "inet", "istio-ambient-nat", "istio-output"],
}
LIST = {
    "iptables-nft": ["iptables", "-t", "nat", "-S", "ISTIO_OUTPUT"],
    "nftables": ["nft", "list", "chain", "inet", "istio-ambient-nat", "istio-output"],
}


def _listed(netns: str, backend: str) -> str:
    argv = ["ip", "netns", "exec", netns, *LIST[backend]]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _enrolled(sandbox: SandboxCluster, namespace: str, *pods: str) -> list[dict[str, object]]:
    for pod in pods:
        sandbox.create_pod(namespace, pod, node="node-1")
    made = [sandbox.wait_running(namespace, pod) for pod in pods]
    sandbox.label_namespace(namespace, names.DATAPLANE_MODE_LABEL, "ambient")
    wait_for(
        "enabled",
        lambda: all(
            sandbox.pod_annotation(namespace, pod, names.REDIRECTION_ANNOTATION) == "enabled"
            for pod in pods
        ),
    )
    return made


def test_a_rule_flushed_in_a_pod_is_repaired_within_2_s_without_a_periodic_pass(
    sandbox: SandboxCluster, resting: Mesh, namespace: str, backend: str
) -> None:
    victim, *_ = _enrolled(sandbox, namespace, "victim", "calm-1", "calm-2")
    agent = resting.agents["node-1"]
    assert agent.metric("ambient_cni_agent_drift_announced") == 1
    passes = 'ambient_cni_agent_pod_reconciles_total{state="Enrolled"}'
    before = agent.metric(passes)
    netns = sandbox.pod_netns(victim)
    rules = _listed(netns, backend)
    flushed = time.monotonic()
    subprocess.run(["ip", "netns", "exec", netns, *FLUSH[backend]], check=True)
    wait_for("the flushed chain back", lambda: _listed(netns, backend) == rules, timeout=5)
    assert time.monotonic() - flushed <= REPAIR_WITHIN
    repair = wait_for(
        "the repair in status",
        lambda: (resting.workload("node-1", "victim") or {}).get("lastRepair"),
    )
    assert "missing" in repair["message"]
    # Only the victim was re-checked: one pass (two at most, if the agent could not tell its
    # own repair from someone's change), not one per pod.
    assert agent.metric(passes) - before <= 2
    for calm in ("calm-1", "calm-2"):
        assert "lastRepair" not in (resting.workload("node-1", calm) or {})


def test_a_deleted_ip_rule_in_a_pod_is_repaired_within_2_s(
    sandbox: SandboxCluster, resting: Mesh, namespace: str
) -> None:
    (pod,) = _enrolled(sandbox, namespace, "routed")
    netns = sandbox.pod_netns(pod)
    rule = ["ip", "-n", netns, "-4", "rule", "show", "pref", "32764"]

    def rule_there() -> bool:
        return bool(subprocess.run(rule, capture_output=True, text=True, check=True).stdout)

    deleted = time.monotonic()
    subprocess.run(["ip", "-n", netns, "-4", "rule", "del", "pref", "32764"], check=True)
    wait_for("the ip rule back", rule_there, timeout=5)
    assert time.monotonic() - deleted <= REPAIR_WITHIN
    repair = wait_for(
        "the repair in status",
        lambda: (resting.workload("node-1", "routed") or {}).get("lastRepair"),
    )
    assert "ip rule" in repair["message"]


def test_at_rest_the_agent_starts_no_process(
    sandbox: SandboxCluster, resting: Mesh, namespace: str
) -> None:
    _enrolled(sandbox, namespace, "quiet-1", "quiet-2")
    agent = resting.agents["node-1"]
    forks = Forks(agent.pid or 0)
    try:
        holds_for("no process started", lambda: forks.counts()[0] == 0, seconds=3.0)
    finally:
        forks.close()
