"""Fixtures for end-to-end tests: one sandbox cluster per test session.

`sandbox` yields a SandboxCluster (kubeconfig, kubectl, node and pod helpers)
for a two-node sandbox named `e2e`; `namespace` gives each test its own
namespace, deleted afterwards. When a test fails, the tails of the sandbox's
component logs are attached to its report.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from ambient_cni_sandbox import lifecycle
from ambient_cni_sandbox.cluster import SandboxCluster, wait_for
from ambient_cni_sandbox.state import paths_for

SANDBOX = "e2e"
LOG_TAIL_LINES = 30


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxCluster]:
    if os.geteuid() != 0:
        pytest.fail("e2e tests need root: they create network namespaces and run a control plane")
    lifecycle.up(SANDBOX, nodes=2)
    try:
        yield SandboxCluster.open(SANDBOX)
    finally:
        lifecycle.down(SANDBOX)
    left = lifecycle.leftovers(SANDBOX)
    assert left.empty, f"sandbox {SANDBOX} left things behind: {left}"


# The in-pod tests that drive rules and traffic run once per dataplane backend.
BACKENDS = ("iptables-nft", "nftables")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def agent_args(backend: str) -> list[str]:
    """Agent flags for a backend on the sandbox; the nftables backend finds the sandbox
    kubelet's UID in /proc, as on a real node."""
    return [f"--backend={backend}"]


@contextlib.contextmanager
def namespace_for_test(cluster: SandboxCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace named after the test, deleted with everything in it afterwards."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50].rstrip("-")
    cluster.create_namespace(name)
    try:
        yield name
    finally:
        cluster.delete_namespace(name)
        # The namespace controller deletes the pods; the kubelets tear them down.
        wait_for(
            f"namespace {name} to be gone", lambda: cluster.namespace(name) is None, timeout=60
        )


@pytest.fixture
def namespace(sandbox: SandboxCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    with namespace_for_test(sandbox, request) as name:
        yield name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed and item.get_closest_marker("e2e"):
        log_dir = paths_for(SANDBOX).log_dir
        for log in sorted([*log_dir.glob("*.log"), *log_dir.glob("*.jsonl")]):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"sandbox log {log.name}", "\n".join(lines)))
    return report
