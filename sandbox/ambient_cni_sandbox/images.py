"""Container images without a Docker engine: the project's image built from its unchanged
Dockerfile with buildah, run with podman and runc.

Everything lives under the cache (`~/.cache/ambient-cni/containers`): the engine's own
configuration (runc, cgroupfs, lowered default ulimits: the stock ones need
CAP_SYS_RESOURCE here), its image store, and the base images the Dockerfile names, made
locally so nothing is pulled:

- `debian:bookworm-slim`, from Debian's packages with mmdebstrap (minbase, docs and locales
  left out as the published slim image leaves them), remade when its recipe changes;
- `golang:<go>-bookworm`, that base with this machine's Go toolchain, for the plugin stage.

A build takes the host's package-client configuration when there is one (its apt
configuration on a Debian host of the same release, its CA bundle and pip settings) as
read-only mounts of the build steps, never as layers of the image.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .binaries import BuildError, cache_root

IMAGE = "localhost/ambient-cni:dev"
SUITE = "bookworm"
BASE_IMAGE = f"docker.io/library/debian:{SUITE}-slim"
MIRROR = "http://deb.debian.org/debian"
RECIPE_LABEL = "dev.ambient-cni.recipe"
# As the published slim images: no documentation, manuals or locales.
SLIM = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/host-ca-certificates.crt"
ENGINE_CONF = """\
[containers]
# The stock limits need CAP_SYS_RESOURCE to set; these are plenty.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun refuses this kind of host's hybrid cgroups; runc runs.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
REGISTRIES_CONF = """\
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
"""

Log = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def containers_dir() -> Path:
    return cache_root() / "containers"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def engine_env() -> dict[str, str]:
    """The environment that points podman and buildah at the project's own configuration
    and image store (written on first use)."""
    root = containers_dir()
    root.mkdir(parents=True, exist_ok=True)
    _write_if_changed(root / "containers.conf", ENGINE_CONF)
    _write_if_changed(root / "registries.conf", REGISTRIES_CONF)
    _write_if_changed(
        root / "storage.conf",
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\n'
        'runroot = "/run/ambient-cni-containers"\n',
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
        "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
    }


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BuildError(f"`{name}` is not installed (scripts/bootstrap.sh installs it)")
    return found


def run_tool(
    name: str, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """podman, buildah or mmdebstrap with the project's engine configuration."""
    done = subprocess.run(
        [_tool(name), *args],
        env=engine_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise BuildError(f"{name} {' '.join(args[:3])} failed: {done.stderr.strip()[-4000:]}")
    return done


def label(image: str, key: str) -> str | None:
    """A label of a local image; None when the image is not in the store."""
    found = run_tool(
        "podman",
        "image",
        "inspect",
        "--format",
        f'{{{{ index .Labels "{key}" }}}}',
        image,
        check=False,
    )
    if found.returncode != 0:
        return None
    value = found.stdout.strip()
    return None if value in ("", "<no value>") else value


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def base_recipe() -> list[str]:
    return [
        "--variant=minbase",
        *(f"--dpkgopt={option}" for option in SLIM),
        SUITE,
    ]


def ensure_base(log: Log = _quiet) -> None:
    """The Debian base image, made with mmdebstrap unless the store holds its recipe's."""
    recipe = _digest(*base_recipe(), MIRROR)
    if label(BASE_IMAGE, RECIPE_LABEL) == recipe:
        return
    log(f"making {BASE_IMAGE} from Debian's packages with mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="ambient-cni-base-") as scratch:
        tarball = Path(scratch) / "rootfs.tar"
        run_tool("mmdebstrap", "--quiet", *base_recipe(), str(tarball), MIRROR)
        run_tool(
            "podman",
            "import",
            "--quiet",
            "--change",
            f"LABEL {RECIPE_LABEL}={recipe}",
            "--change",
            'CMD ["bash"]',
            str(tarball),
            BASE_IMAGE,
        )


def _go() -> tuple[Path, str]:
    """This machine's Go: its GOROOT and its major.minor version."""
    go = _tool("go")
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    out = subprocess.run(
        [go, "env", "GOROOT", "GOVERSION"], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    version = out[1].removeprefix("go")
    return Path(out[0]), ".".join(version.split(".")[:2])


def go_image_tag() -> str:
    return f"docker.io/library/golang:{_go()[1]}-{SUITE}"


def ensure_go_image(log: Log = _quiet) -> str:
    """`golang:<go>-bookworm`: the base with this machine's Go toolchain, as the published
    image has it (in /usr/local/go, with CA certificates and git); remade when either
    changes. Returns its tag."""
    goroot, _ = _go()
    tag = go_image_tag()
    version = (goroot / "VERSION").read_text().splitlines()[0]
    recipe = _digest(version, label(BASE_IMAGE, RECIPE_LABEL) or "")
    if label(tag, RECIPE_LABEL) == recipe:
        return tag
    log(f"making {tag} from {BASE_IMAGE} and this machine's {version}")
    with tempfile.TemporaryDirectory(prefix="ambient-cni-go-") as scratch:
        containerfile = Path(scratch) / "Containerfile"
        containerfile.write_text(
            f"FROM {BASE_IMAGE}\n"
            "RUN apt-get update && apt-get install -y --no-install-recommends "
            "ca-certificates git && rm -rf /var/lib/apt/lists/*\n"
            "COPY . /usr/local/go\n"
            "ENV PATH=/usr/local/go/bin:/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
            "/usr/bin:/sbin:/bin GOPATH=/go GOTOOLCHAIN=local\n"
            f"LABEL {RECIPE_LABEL}={recipe}\n"
        )
        run_tool(
            "buildah",
            "bud",
            "--quiet",
            "--network=host",
            *host_package_config(Path(scratch)),
            "-f",
            str(containerfile),
            "-t",
            tag,
            str(goroot),
        )
    return tag


def _debian_release() -> str | None:
    try:
        fields = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
    except OSError:
        return None
    return fields.get("VERSION_CODENAME", "").strip('"') if fields.get("ID") == "debian" else None


def host_package_config(scratch: Path) -> list[str]:
    """Read-only mounts that give build steps the host's package clients' configuration:
    its apt configuration (a Debian host of the image's release only), its CA bundle, and
    its pip settings pointed at that bundle. Nothing of it is committed to a layer."""
    mounts = []
    if _debian_release() == SUITE and Path("/etc/apt").is_dir():
        mounts.append("--volume=/etc/apt:/etc/apt:ro")
    pip = configparser.ConfigParser()
    pip.read(["/etc/pip.conf", "/etc/xdg/pip/pip.conf"])
    if HOST_CA.is_file():
        mounts.append(f"--volume={HOST_CA}:{BUILD_CA}:ro")
        if not pip.has_section("global"):
            pip.add_section("global")
        pip.set("global", "cert", BUILD_CA)
    if pip.sections():
        conf = scratch / "pip.conf"
        with conf.open("w") as handle:
            pip.write(handle)
        mounts.append(f"--volume={conf}:/etc/pip.conf:ro")
    return mounts


def _go_module_cache() -> Path | None:
    go = shutil.which("go")
    if go is None:
        return None
    out = subprocess.run(
        [go, "env", "GOMODCACHE"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "GOTOOLCHAIN": "local"},
    )
    path = Path(out.stdout.strip())
    return path if out.returncode == 0 and path.is_dir() else None


def build(
    context: Path, *, tag: str = IMAGE, log: Log = _quiet, build_args: Sequence[str] = ()
) -> str:
    """The image of `context`'s Dockerfile, unchanged, tagged `tag`; returns its ID. Layers
    are cached in the store, so an unchanged tree rebuilds in seconds."""
    ensure_base(log)
    go_image = ensure_go_image(log)
    replaced = _image_id(tag)
    log(f"building {tag} from {context / 'Dockerfile'} with buildah")
    with tempfile.TemporaryDirectory(prefix="ambient-cni-build-") as scratch:
        mounts = host_package_config(Path(scratch))
        cache = _go_module_cache()
        if cache is not None:  # the plugin's modules, already fetched on this machine
            mounts.append(f"--volume={cache}:/go/pkg/mod")
        run_tool(
            "buildah",
            "bud",
            "--quiet",
            "--layers",
            "--network=host",
            "--pull=never",
            f"--build-arg=GO_IMAGE={go_image}",
            *(f"--build-arg={arg}" for arg in build_args),
            *mounts,
            "-f",
            str(context / "Dockerfile"),
            "-t",
            tag,
            str(context),
        )
    built = run_tool("podman", "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    if replaced is not None and replaced != built:
        _forget(replaced)
    return built


def _image_id(tag: str) -> str | None:
    found = run_tool("podman", "image", "inspect", "--format", "{{.Id}}", tag, check=False)
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def _forget(image: str) -> None:
    """The image a rebuilt tag no longer names, with the build layers only it used (rmi
    takes untagged parents along): every build of a changed tree would otherwise leave
    ~300 MB in the store for good. Kept while a container (a sandbox's chart pod) still
    runs it, or another tag names it: then rmi refuses, and that is fine."""
    run_tool("podman", "rmi", image, check=False)


def repo_root() -> Path:
    # sandbox/ambient_cni_sandbox/images.py -> the repository, whose Dockerfile this builds
    return Path(__file__).resolve().parents[2]


def size(tag: str = IMAGE) -> int:
    """The image's size in bytes, as `podman images` reports it."""
    return int(run_tool("podman", "image", "inspect", "--format", "{{.Size}}", tag).stdout)
