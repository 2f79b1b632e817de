"""The image, built for real from the unchanged Dockerfile (buildah, its Debian base made
locally with mmdebstrap) and run for real (podman with runc): what it runs, as whom, with
what, and that it can write a pod's rules in a network namespace made after it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ambient_cni_sandbox import images

REPO = Path(__file__).resolve().parents[2]
NON_ROOT = "65532"


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def image() -> str:
    """The image of the repository's Dockerfile (layers cached: seconds when unchanged)."""
    images.build(REPO)
    return images.IMAGE


def run(image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` of the image: as its default user unless `args` say otherwise."""
    return images.run_tool(
        "podman",
        "run",
        "--rm",
        *([f"--entrypoint={entrypoint}"] if entrypoint else []),
        image,
        *args,
        check=False,
        timeout=120,
    )


def test_each_command_runs_as_the_images_non_root_user(image: str) -> None:
    whoami = run(image, "-u", entrypoint="id")
    assert whoami.stdout.strip() == NON_ROOT, whoami.stderr
    for command in ("controller", "agent", "install-cni", "check-ready"):
        # The entrypoint is ambient-cni: the chart passes only the command and its flags.
        shown = run(image, command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert f"usage: ambient-cni {command}" in shown.stdout
    listing = run(image, "--help").stdout
    assert "controller" in listing
    # The sandbox is test machinery: neither it, its commands nor its dependencies ship.
    assert "sandbox" not in listing
    assert "demo" not in listing


def test_the_image_holds_what_the_agent_drives_and_nothing_to_build_with(image: str) -> None:
    tools = [
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "ip6tables-nft-restore",
        "ip6tables-legacy-restore",
        "ipset",
        "nft",
        "ip",
        "nsenter",
    ]
    script = "; ".join(f"command -v {tool} || echo MISSING {tool}" for tool in tools)
    found = run(image, "-c", script, entrypoint="sh")
    assert "MISSING" not in found.stdout, found.stdout
    # libnftables through Debian's own binding, from the image's Python.
    nft = run(
        image,
        "-c",
        "import nftables; n = nftables.Nftables(); print(n.get_json_output() is not None)",
        entrypoint="python",
    )
    assert nft.stdout.strip() == "True", nft.stderr
    for name in ("gcc", "cc", "go", "pip", "pip3"):
        assert run(image, "-c", f"command -v {name}", entrypoint="sh").returncode != 0, name
    for module in ("ambient_cni_sandbox", "cryptography", "pip", "pytest"):
        imported = run(image, "-c", f"import {module}", entrypoint="python")
        assert imported.returncode != 0, f"{module} is in the image"


def test_the_cni_plugin_in_the_image_answers_version(image: str) -> None:
    version = images.run_tool(
        "podman",
        "run",
        "--rm",
        "--env=CNI_COMMAND=VERSION",
        "--entrypoint=/opt/ambient-cni/bin/istio-cni",
        image,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]


def test_as_the_chart_runs_the_agent_it_writes_rules_in_a_netns_made_after_it_started(
    image: str,
) -> None:
    """Root with NET_ADMIN and SYS_ADMIN, the host's netns directory mounted with slave
    propagation (the chart's HostToContainer): a namespace made after the container
    started is visible in it, and its rules are the kernel's."""
    name = f"acni-image-live-{os.getpid()}"
    started = images.run_tool(
        "podman",
        "run",
        "--detach",
        f"--name={name}",
        "--user=0",
        "--network=host",
        "--cap-drop=all",
        "--cap-add=NET_ADMIN,NET_RAW,SYS_ADMIN",
        "--volume=/var/run/netns:/var/run/netns:rslave",
        "--entrypoint=sleep",
        image,
        "120",
    )
    try:
        assert started.returncode == 0, started.stderr
        later = f"acni-image-test-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", later], check=True)
        try:
            wrote = images.run_tool(
                "podman",
                "exec",
                name,
                "nsenter",
                f"--net=/var/run/netns/{later}",
                "iptables-nft",
                "-t",
                "nat",
                "-N",
                "ISTIO_IMAGE_TEST",
                check=False,
            )
            assert wrote.returncode == 0, wrote.stderr
            seen = subprocess.run(
                ["ip", "netns", "exec", later, "iptables-nft", "-t", "nat", "-S"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "-N ISTIO_IMAGE_TEST" in seen
        finally:
            subprocess.run(["ip", "netns", "delete", later], check=False)
    finally:
        images.run_tool("podman", "rm", "--force", "--time=0", name, check=False)
