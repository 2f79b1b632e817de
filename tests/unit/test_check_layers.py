"""The layer check must fail on direct and indirect forbidden imports, and pass on clean code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from check_layers import find_violations, imported_names

REPO = Path(__file__).resolve().parents[2]


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def chains(root: Path, core: list[str]) -> list[str]:
    found = find_violations(root, "pkg", core, ["kopf", "kubernetes", "pyroute2"])
    return [str(v) for v in found]


def test_direct_import_is_reported(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"__init__.py": "", "pure.py": "import kopf\n"})
    assert chains(root, ["pkg.pure"]) == ["pkg.pure -> kopf"]


def test_import_inside_a_function_is_reported(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {"__init__.py": "", "pure.py": "def f():\n    from kubernetes.client import CoreV1Api\n"},
    )
    assert chains(root, ["pkg.pure"]) == ["pkg.pure -> kubernetes"]


def test_transitive_import_through_relative_imports_is_reported(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/plan.py": "from . import helpers\n",
            "core/helpers.py": "from ..edge import netlink\n",
            "edge/__init__.py": "",
            "edge/netlink.py": "from pyroute2 import IPRoute\n",
        },
    )
    assert chains(root, ["pkg.core"]) == [
        "pkg.core.helpers -> pkg.edge.netlink -> pyroute2",
        "pkg.core.plan -> pkg.core.helpers -> pkg.edge.netlink -> pyroute2",
    ]


def test_package_init_side_effects_count(tmp_path: Path) -> None:
    # Importing pkg.edge.util runs pkg/edge/__init__.py, which imports kopf.
    root = write_tree(
        tmp_path,
        {
            "__init__.py": "",
            "pure.py": "from pkg.edge.util import x\n",
            "edge/__init__.py": "import kopf\n",
            "edge/util.py": "x = 1\n",
        },
    )
    assert chains(root, ["pkg.pure"]) == ["pkg.pure -> pkg.edge -> kopf"]


def test_clean_core_passes_even_if_edges_import_forbidden(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "__init__.py": "",
            "pure.py": "import json\nfrom .models import M\n",
            "models.py": "import pydantic\nM = 1\n",
            "edge.py": "import kopf\nfrom .pure import *\n",
        },
    )
    assert chains(root, ["pkg.pure", "pkg.models"]) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from . import a", {"pkg.sub", "pkg.sub.a"}),
        ("from .. import b", {"pkg", "pkg.b"}),
        ("from ..x import c", {"pkg.x", "pkg.x.c"}),
        ("import os.path", {"os.path"}),
    ],
)
def test_relative_imports_resolve(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    assert imported_names("pkg.sub.m", path) == expected


def test_project_core_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_layers.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
