"""Each import contract in pyproject.toml fails when its rule is broken on purpose.

The contracts are checked by import-linter (`lint-imports`, part of `make lint`).
Here each test copies the project's packages, adds one forbidden import to
the copy, and runs the real contracts over it: the named contract must break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = [contract["name"] for contract in CONFIG["contracts"]]

# contract (a distinctive part of its name) -> (module file to change, the import to add)
VIOLATIONS = {
    "operator's layers": ("operator/ambient_cni/kube.py", "import ambient_cni.reflector"),
    "independent of each other": (
        "operator/ambient_cni/controller/metrics.py",
        "import ambient_cni.agent.metrics",
    ),
    "imports the sandbox": ("operator/ambient_cni/logs.py", "import ambient_cni_sandbox.topology"),
    "dataplane imports neither": (
        "operator/ambient_cni/dataplane/runner.py",
        "import ambient_cni.agent.metrics",
    ),
    # Indirect: selection -> kube -> kubernetes.
    "pure core": ("operator/ambient_cni/selection.py", "import ambient_cni.kube"),
    "reconciler reaches neither": (
        "operator/ambient_cni/agent/reconciler.py",
        "from ambient_cni.dataplane import errors",
    ),
    "redirect modes reach": (
        "operator/ambient_cni/agent/inpod.py",
        "from ambient_cni.dataplane.iptables_pod import IptablesPodDataplane",
    ),
}


def copy_project(root: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("operator/ambient_cni", "sandbox/ambient_cni_sandbox"):
        shutil.copytree(REPO / package, root / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def lint_imports(root: Path) -> tuple[int, dict[str, str]]:
    """Run the contracts over the copy; returns the exit code and each contract's verdict."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "lint-imports"),
            "--config",
            "pyproject.toml",
            "--no-cache",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": f"{root / 'operator'}:{root / 'sandbox'}"},
        capture_output=True,
        text=True,
        check=False,
    )
    verdicts = {}
    for name in CONTRACTS:
        for line in result.stdout.splitlines():
            if line.startswith(name + " "):
                verdicts[name] = line.rsplit(" ", 1)[1]
    assert len(verdicts) == len(CONTRACTS), result.stdout + result.stderr
    return result.returncode, verdicts


def test_every_contract_has_a_violation_test() -> None:
    assert sorted(next(c for c in CONTRACTS if key in c) for key in VIOLATIONS) == sorted(CONTRACTS)


def test_the_project_keeps_every_contract(tmp_path: Path) -> None:
    code, verdicts = lint_imports(copy_project(tmp_path))
    assert code == 0
    assert set(verdicts.values()) == {"KEPT"}


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_a_deliberate_violation_breaks_the_contract(tmp_path: Path, contract: str) -> None:
    root = copy_project(tmp_path)
    module, line = VIOLATIONS[contract]
    target = root / module
    target.write_text(target.read_text() + f"\n{line}\n")
    code, verdicts = lint_imports(root)
    name = next(c for c in CONTRACTS if contract in c)
    assert code != 0
    assert verdicts[name] == "BROKEN"
