"""install-cni's edge: the plugin binary in the host's CNI bin dir and istio-cni in the node's
CNI configuration, level-based, with atomic writes.

Every file is written to a temporary name in its own directory and renamed
over the old one, so a runtime reading the dir never sees half a file (and a
binary being replaced is never "text file busy"). Config files are 0600: they
may carry what the runtime passes plugins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conflist import (
    PLUGIN_TYPE,
    CniConfigError,
    PluginSettings,
    as_list,
    primary,
    with_plugin,
    without_plugin,
)

log = logging.getLogger("ambient_cni.install")

OWN_CONFLIST = "02-istio-cni.conflist"


@dataclass(frozen=True)
class InstallOptions:
    bin_dir: Path  # the host's CNI bin dir, mounted
    conf_dir: Path  # the host's CNI conf dir, mounted
    plugin_binary: Path  # the istio-cni binary shipped in the image
    settings: PluginSettings = field(default_factory=PluginSettings)
    chained: bool = True  # False: a copy of the primary with istio-cni, in OWN_CONFLIST


@dataclass(frozen=True)
class InstallState:
    ready: bool
    changes: tuple[str, ...] = ()
    problem: str = ""
    config: Path | None = None  # the conflist istio-cni is in, when ready


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class ChangedMeanwhile(RuntimeError):
    """The file changed between our read and our write: read it again."""


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return (found.st_ino, found.st_mtime_ns, found.st_size)


def _write_atomically(
    path: Path, data: bytes, mode: int, *, unchanged_since: tuple[int, int, int] | None = None
) -> None:
    """Write to a temporary file with its final mode from the start, then rename it over
    `path`; with `unchanged_since`, only if `path` is still the file read (the primary CNI
    may rewrite it at any time, and its write must not be lost)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    if unchanged_since is not None and _identity(path) != unchanged_since:
        tmp.unlink(missing_ok=True)
        raise ChangedMeanwhile(str(path))
    tmp.replace(path)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CniConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CniConfigError(f"{path}: not a JSON object")
    return data


def _as_text(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


class Installer:
    def __init__(self, options: InstallOptions):
        self.options = options

    @property
    def installed_binary(self) -> Path:
        return self.options.bin_dir / PLUGIN_TYPE

    def ensure(self, tries: int = 3) -> InstallState:
        """Make the bin dir and the conf dir hold what they should; what it changed. A
        config rewritten by someone else while we wrote ours is read again."""
        for _ in range(tries - 1):
            try:
                return self._ensure()
            except ChangedMeanwhile:
                continue
        try:
            return self._ensure()
        except ChangedMeanwhile as exc:
            return InstallState(False, problem=f"{exc} keeps changing; trying again")

    def _ensure(self) -> InstallState:
        changes: list[str] = []
        want = _digest(self.options.plugin_binary)
        if want is None:
            return InstallState(False, problem=f"no plugin binary at {self.options.plugin_binary}")
        if _digest(self.installed_binary) != want:
            _write_atomically(self.installed_binary, self.options.plugin_binary.read_bytes(), 0o755)
            changes.append(f"plugin binary installed as {self.installed_binary}")
        try:
            config, changed = self._chain() if self.options.chained else self._own_conflist()
            changes += changed
        except CniConfigError as exc:
            return InstallState(False, tuple(changes), problem=str(exc))
        except FileNotFoundError as exc:
            return InstallState(False, tuple(changes), problem=f"no primary CNI config: {exc}")
        for change in changes:
            log.info("%s", change)
        return InstallState(True, tuple(changes), config=config)

    def _primary(self) -> Path:
        name = primary(os.listdir(self.options.conf_dir), own=OWN_CONFLIST)
        if name is None:
            raise FileNotFoundError(
                f"none in {self.options.conf_dir} yet (the primary CNI writes it)"
            )
        return self.options.conf_dir / name

    def _chain(self) -> tuple[Path, list[str]]:
        changes = []
        own = self.options.conf_dir / OWN_CONFLIST
        if own.exists():  # from an earlier unchained install
            own.unlink()
            changes.append(f"removed {own}")
        path = self._primary()
        read = _identity(path)
        config = _read_config(path)
        wanted = with_plugin(config, self.options.settings)
        target = path if path.suffix == ".conflist" else path.with_suffix(".conflist")
        if target == path and config == wanted:
            return target, changes
        _write_atomically(
            target, _as_text(wanted), 0o600, unchanged_since=read if target == path else None
        )
        if target != path:
            path.unlink(missing_ok=True)  # a single .conf becomes the .conflist
            changes.append(f"converted {path.name} to {target.name}")
        changes.append(f"istio-cni chained last in {target}")
        return target, changes

    def _own_conflist(self) -> tuple[Path, list[str]]:
        """The primary network with istio-cni last, in a file of ours that sorts first, so
        runtimes take it and the primary CNI's own file is never touched."""
        path = self.options.conf_dir / OWN_CONFLIST
        wanted = with_plugin(_read_config(self._primary()), self.options.settings)
        try:
            if _read_config(path) == wanted:
                return path, []
        except CniConfigError:
            pass
        _write_atomically(path, _as_text(wanted), 0o600)
        return path, [f"wrote {path} (the primary network with istio-cni last)"]

    def uninstall(self) -> list[str]:
        """Take istio-cni out of every config in the conf dir and its binary out of the bin
        dir: nothing of it left behind."""
        removed = []
        conf_dir = self.options.conf_dir
        own = conf_dir / OWN_CONFLIST
        if own.exists():
            own.unlink()
            removed.append(f"removed {own}")
        for path in sorted(conf_dir.glob("*.conflist")):
            try:
                config = _read_config(path)
                if as_list(config) == without_plugin(config):
                    continue
            except CniConfigError:
                continue
            _write_atomically(path, _as_text(without_plugin(config)), 0o600)
            removed.append(f"istio-cni taken out of {path}")
        if self.installed_binary.exists():
            self.installed_binary.unlink()
            removed.append(f"removed {self.installed_binary}")
        for line in removed:
            log.info("%s", line)
        return removed
