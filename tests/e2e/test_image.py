"""The Dockerfile without a Docker engine: hadolint lints it, and its install
steps run here, in a clean virtualenv, exactly as written."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
NON_ROOT = "65532"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def build_stage() -> list[tuple[str, str]]:
    """The instructions of the first stage (up to the second FROM)."""
    steps = instructions()
    froms = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    return steps[froms[0] : froms[1]]


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_the_debian_packages_bootstrap_installs() -> None:
    apt = next(args for keyword, args in instructions() if "apt-get install" in args)
    install = apt.split("apt-get install", 1)[1].split("&&", 1)[0]
    in_image = {word for word in shlex.split(install) if not word.startswith("-")}
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    listed = re.search(r"^DEB_PACKAGES=\((.*)\)$", bootstrap, re.MULTILINE)
    assert listed is not None
    assert in_image == set(listed.group(1).split())
    # What the agent runs, in both iptables flavours; these packages provide them here.
    for tool in (
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "ip6tables-nft-restore",
        "ip6tables-legacy-restore",
        "ipset",
        "nft",
        "ip",
    ):
        assert shutil.which(tool), f"{tool} is not installed"


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """A world-readable stand-in for the image's filesystem root."""
    with tempfile.TemporaryDirectory(prefix="ambient-cni-image-") as root:
        Path(root).chmod(0o755)
        yield Path(root)


def test_the_build_stage_runs_and_installs_both_commands(image_root: Path) -> None:
    src = image_root / "src"
    src.mkdir()
    venv = image_root / "opt" / "ambient-cni"
    for keyword, args in build_stage():
        if keyword == "COPY":
            *sources, _dest = shlex.split(args)
            for source in sources:
                origin = REPO / source
                if origin.is_dir():
                    shutil.copytree(
                        origin, src / source, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(origin, src / origin.name)
        elif keyword == "RUN":
            # The image's paths, mapped into image_root; `python` is this machine's.
            command = args.replace("/opt/ambient-cni", str(venv)).replace("/src", str(src))
            command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
            result = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, check=False, timeout=600
            )
            assert result.returncode == 0, result.stdout + result.stderr
    entrypoint = venv / "bin" / "ambient-cni"
    for command in ("controller", "agent", "install-cni", "check-ready"):
        # As the image's default user: the controller runs non-root.
        result = subprocess.run(
            [
                "setpriv",
                f"--reuid={NON_ROOT}",
                f"--regid={NON_ROOT}",
                "--clear-groups",
                str(entrypoint),
                command,
                "--help",
            ],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: ambient-cni {command}" in result.stdout
    # The sandbox is test machinery: neither it, its commands nor its dependencies ship.
    listing = subprocess.run(
        [str(entrypoint), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "controller" in listing
    assert "sandbox" not in listing
    assert "demo" not in listing
    python = venv / "bin" / "python"
    for module in ("ambient_cni_sandbox", "cryptography"):
        found = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, text=True, check=False
        )
        assert found.returncode != 0, f"{module} is in the image"
