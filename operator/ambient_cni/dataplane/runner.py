"""Commands inside network namespaces: the one place the dataplane starts a process.

A command for a namespace runs from a short-lived thread that entered it, so
the child inherits the namespace and no shared thread ever changes its own;
`within` runs a whole operation (several commands, netlink calls) on one such
thread.
Each namespace gets its own xtables lock file (the namespace's file itself),
so pods never queue behind each other or the host on /run/xtables.lock.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from ambient_cni.netns import NetnsError, new_netns_fd, run_in_netns

from .errors import DataplaneError
from .interfaces import Completed, Exec

T = TypeVar("T")
COMMAND_TIMEOUT = 30.0
HOST_LOCK = "/run/ambient-cni-host.xtables.lock"
SCRATCH_LOCK = str(Path(tempfile.gettempdir()) / "ambient-cni-scratch.xtables.lock")


def in_netns(netns: Path | None, fn: Callable[[], T]) -> T:
    """Call `fn` inside `netns` (None: right here); a namespace that is gone is NetnsNotFound."""
    if netns is None:
        return fn()
    try:
        return run_in_netns(netns, fn)
    except NetnsError as exc:
        raise DataplaneError("NetnsNotFound", f"network namespace {netns}: {exc.strerror}") from exc


class SubprocessRunner:
    def __init__(self, timeout: float = COMMAND_TIMEOUT):
        self.timeout = timeout
        self._scratch: set[Path] = set()
        self._lock = threading.Lock()

    def _lock_file(self, netns: Path | None) -> str:
        if netns is None:
            return HOST_LOCK
        with self._lock:
            return SCRATCH_LOCK if netns in self._scratch else str(netns)

    def within(self, netns: Path | None, work: Callable[[Exec], T]) -> T:
        env = {**os.environ, "XTABLES_LOCKFILE": self._lock_file(netns)}

        def run(argv: Sequence[str], stdin: str | None) -> Completed:
            try:
                done = subprocess.run(
                    list(argv),
                    input=stdin,
                    capture_output=True,
                    text=True,
                    timeout=self.timeout,
                    env=env,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise DataplaneError("CommandNotFound", f"{argv[0]} is not installed") from exc
            except subprocess.TimeoutExpired as exc:
                raise DataplaneError(
                    "CommandTimeout", f"{argv[0]} took over {self.timeout:.0f}s", retryable=True
                ) from exc
            return Completed(done.returncode, done.stdout, done.stderr)

        return in_netns(netns, lambda: work(run))

    def run(
        self, argv: Sequence[str], *, netns: Path | None = None, stdin: str | None = None
    ) -> Completed:
        return self.within(netns, lambda run: run(argv, stdin))

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A new, empty namespace held only by an fd of ours: it vanishes when the fd closes,
        so nothing is left behind, even by a crash."""
        fd = new_netns_fd()
        path = Path(f"/proc/self/fd/{fd}")
        with self._lock:
            self._scratch.add(path)
        try:
            yield path
        finally:
            with self._lock:
                self._scratch.discard(path)
            os.close(fd)
