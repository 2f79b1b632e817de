"""The sandbox's Go binaries: etcd, kube-apiserver, kube-controller-manager, kubectl, helm;
and the CNI chain: the containernetworking reference plugins, cni-run and istio-cni.

They are built with the machine's Go toolchain from the modules in tools/gobin,
tools/cnibin and cni-plugin, whose go.mod files pin every version. Builds land
in a cache outside the repository keyed by the modules' go.mod and go.sum (and
Go sources, for the project's own), the Go version and the build recipe, so
they are rebuilt only when one of those changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
HELM_MODULE = "helm.sh/helm/v3"

# Binary name -> Go package. etcd is built on its own because its package
# path ends in a major-version suffix, which `go build -o dir/` would name "server".
KUBE_PACKAGES = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "helm": "helm.sh/helm/v3/cmd/helm",
}
ALL_BINARIES = ("etcd", *KUBE_PACKAGES)

# Bump when the way binaries are built changes, so caches are rebuilt.
RECIPE_VERSION = "2"


class BuildError(RuntimeError):
    """The Go build failed; the message names the step and carries Go's output."""


@dataclass(frozen=True)
class PinnedVersions:
    kubernetes: str
    etcd: str
    helm: str


def gomod_dir() -> Path:
    override = os.environ.get("AMBIENT_CNI_GOMOD_DIR")
    if override:
        return Path(override)
    # sandbox/ambient_cni_sandbox/binaries.py -> repository root
    path = Path(__file__).resolve().parents[2] / "tools" / "gobin"
    if not (path / "go.mod").is_file():
        raise BuildError(
            f"no Go module at {path}: the sandbox needs a source checkout of ambient-cni "
            "(or AMBIENT_CNI_GOMOD_DIR pointing at tools/gobin)"
        )
    return path


def cache_root() -> Path:
    override = os.environ.get("AMBIENT_CNI_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ambient-cni"


def parse_pins(gomod_text: str) -> PinnedVersions:
    """Read the pinned module versions from go.mod text."""

    def version_of(module: str) -> str:
        match = re.search(rf"^\s*{re.escape(module)}\s+(v\S+)", gomod_text, re.MULTILINE)
        if not match:
            raise BuildError(f"go.mod does not require {module}")
        return match.group(1)

    return PinnedVersions(
        kubernetes=version_of(KUBERNETES_MODULE),
        etcd=version_of(ETCD_MODULE),
        helm=version_of(HELM_MODULE),
    )


def kube_ldflags(pins: PinnedVersions, build_date: str) -> list[str]:
    """-X flags that make `--version` and `kubectl version` report the pinned releases.

    The linker ignores -X for packages a binary does not link, so one list
    serves every binary in a single `go build`.
    """
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+.*", pins.kubernetes)
    if not match:
        raise BuildError(f"cannot parse Kubernetes version {pins.kubernetes!r}")
    major, minor = match.groups()
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={pins.kubernetes}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={build_date}",
        ]
    helm_version = "helm.sh/helm/v3/internal/version"
    flags += [f"-X {helm_version}.version={pins.helm}", f"-X {helm_version}.gitTreeState=clean"]
    # Helm's default capabilities (lint, template) should be the cluster's Kubernetes.
    for pkg in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        flags += [f"-X {pkg}.k8sVersionMajor={major}", f"-X {pkg}.k8sVersionMinor={minor}"]
    return flags


def cache_key(gomod: bytes, gosum: bytes, go_version: str) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION.encode(), go_version.encode(), gomod, gosum):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:16]


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never download another toolchain: build with the machine's Go or fail clearly.
    env["GOTOOLCHAIN"] = "local"
    env["GOFLAGS"] = "-mod=readonly -buildvcs=false"
    env.setdefault("CGO_ENABLED", "0")
    return env


def _go_version() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError("the Go toolchain (`go`) is not on PATH; install Go >= 1.26")
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _module_time(module: str, cwd: Path) -> str:
    out = _run(["go", "list", "-m", "-json", module], cwd, f"resolve {module}")
    info = json.loads(out)
    return str(info.get("Time") or "1970-01-01T00:00:00Z")


def _run(cmd: list[str], cwd: Path, step: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(
            f"{step} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def binaries_dir(*, build: bool = True, log: bool = True) -> Path:
    """The directory holding all sandbox binaries, building them first if needed."""
    src = gomod_dir()
    gomod = (src / "go.mod").read_bytes()
    gosum = (src / "go.sum").read_bytes()
    target = cache_root() / "bin" / cache_key(gomod, gosum, _go_version())
    if all((target / name).is_file() for name in ALL_BINARIES):
        return target
    if not build:
        raise BuildError(f"sandbox binaries are not built yet (expected in {target})")
    with _locked(cache_root() / "bin" / ".build.lock"):
        if all((target / name).is_file() for name in ALL_BINARIES):
            return target  # another process built them while we waited
        _build_into(target, src, parse_pins(gomod.decode()), log=log)
    return target


def _build_into(target: Path, src: Path, pins: PinnedVersions, *, log: bool) -> None:
    def say(message: str) -> None:
        if log:
            print(f"[ambient-cni] {message}", file=sys.stderr, flush=True)

    started = time.monotonic()
    say(
        f"building Kubernetes {pins.kubernetes}, etcd {pins.etcd}, helm {pins.helm} with "
        f"{_go_version()} into {target} (first time only; about 10-15 minutes on 2 cores)"
    )
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        build_date = _module_time(KUBERNETES_MODULE, src)
        ldflags = " ".join(["-s", "-w", *kube_ldflags(pins, build_date)])
        _run(
            [
                "go",
                "build",
                "-trimpath",
                "-ldflags",
                ldflags,
                "-o",
                f"{staging}/",
                *KUBE_PACKAGES.values(),
            ],
            src,
            "go build of kube-apiserver, kube-controller-manager, kubectl and helm",
        )
        say(f"Kubernetes binaries and helm built ({time.monotonic() - started:.0f}s)")
        _run(
            [
                "go",
                "build",
                "-trimpath",
                "-ldflags",
                f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-{pins.etcd}",
                "-o",
                str(staging / "etcd"),
                ETCD_MODULE,
            ],
            src,
            "go build of etcd",
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"sandbox binaries ready in {time.monotonic() - started:.0f}s")


# -- the CNI chain: reference plugins, the invoker, and the project's own plugin ---------------

CNI_PACKAGES = {
    "bridge": "github.com/containernetworking/plugins/plugins/main/bridge",
    "ptp": "github.com/containernetworking/plugins/plugins/main/ptp",
    "host-local": "github.com/containernetworking/plugins/plugins/ipam/host-local",
    "loopback": "github.com/containernetworking/plugins/plugins/main/loopback",
    "cni-run": "./cni-run",
}
PLUGIN_BINARY = "istio-cni"
CNI_BINARIES = (*CNI_PACKAGES, PLUGIN_BINARY)


def _repo_root() -> Path:
    # sandbox/ambient_cni_sandbox/binaries.py -> repository root
    return Path(__file__).resolve().parents[2]


def _sources(module: Path) -> list[Path]:
    """What a module's build depends on: go.mod, go.sum and its Go files."""
    return sorted(
        [module / "go.mod", module / "go.sum", *module.rglob("*.go")],
        key=lambda p: str(p.relative_to(module)),
    )


def cni_binaries_dir(*, build: bool = True, log: bool = True) -> Path:
    """The directory holding bridge, ptp, host-local, loopback, cni-run and istio-cni (the
    project's plugin, built from cni-plugin/), building them first if needed. A cached
    directory missing any of them (one built before ptp was added) is built again."""
    tools, plugin = _repo_root() / "tools" / "cnibin", _repo_root() / "cni-plugin"
    digest = hashlib.sha256(f"{RECIPE_VERSION}\0{_go_version()}".encode())
    for module in (tools, plugin):
        for path in _sources(module):
            digest.update(str(path.relative_to(module)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    target = cache_root() / "cni" / digest.hexdigest()[:16]
    if all((target / name).is_file() for name in CNI_BINARIES):
        return target
    if not build:
        raise BuildError(f"CNI binaries are not built yet (expected in {target})")
    with _locked(cache_root() / "cni" / ".build.lock"):
        if not all((target / name).is_file() for name in CNI_BINARIES):
            _build_cni_into(target, tools, plugin, log=log)
    return target


def _build_cni_into(target: Path, tools: Path, plugin: Path, *, log: bool) -> None:
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        ldflags = ["-trimpath", "-ldflags", "-s -w"]
        _run(
            ["go", "build", *ldflags, "-o", f"{staging}/", *CNI_PACKAGES.values()],
            tools,
            "go build of the CNI reference plugins and cni-run",
        )
        _run(
            ["go", "build", *ldflags, "-o", str(staging / PLUGIN_BINARY), "."],
            plugin,
            "go build of the istio-cni plugin",
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if log:
        print(
            f"[ambient-cni] CNI plugins built in {time.monotonic() - started:.0f}s into {target}",
            file=sys.stderr,
            flush=True,
        )
