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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from ambient_cni.netns import NetnsError, NetnsWorkers, new_netns_fd

from .errors import DataplaneError
from .interfaces import Completed, Exec

T = TypeVar("T")
COMMAND_TIMEOUT = 30.0
HOST_LOCK = "/run/ambient-cni-host.xtables.lock"
SCRATCH_LOCK = str(Path(tempfile.gettempdir()) / "ambient-cni-scratch.xtables.lock")


# Threads that enter namespaces for the dataplane's commands and netlink calls: reused, not
# one started per call (a pod's drift check used to start one, and a process, per pass).
_WORKERS = NetnsWorkers(4, name="netns")


def in_netns(netns: Path | None, fn: Callable[[], T]) -> T:
    """Call `fn` inside `netns` (None: right here); a namespace that is gone is NetnsNotFound."""
    if netns is None:
        return fn()
    try:
        return _WORKERS.run(netns, fn)
    except NetnsError as exc:
        raise DataplaneError("NetnsNotFound", f"network namespace {netns}: {exc.strerror}") from exc


class Children:
    """The PIDs of the processes the runner started, kept a while after they exit: the
    kernel announces what one changed (nft_changes.py) maybe after it is gone and reaped,
    and the agent's own changes are no news to it."""

    KEEP = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._exited: dict[int, float] = {}  # pid -> when it was reaped

    def started(self, pid: int) -> None:
        with self._lock:
            self._running.add(pid)

    def exited(self, pid: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._running.discard(pid)
            self._exited[pid] = now
            if len(self._exited) > 1024:  # forget those past KEEP (a PID may be reused)
                self._exited = {p: t for p, t in self._exited.items() if now - t < self.KEEP}

    def __contains__(self, pid: object) -> bool:
        with self._lock:
            if pid in self._running:
                return True
            reaped = self._exited.get(pid)  # type: ignore[call-overload]
        return reaped is not None and time.monotonic() - reaped < self.KEEP


CHILDREN = Children()


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
                process = subprocess.Popen(
                    list(argv),
                    stdin=None if stdin is None else subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            except FileNotFoundError as exc:
                raise DataplaneError("CommandNotFound", f"{argv[0]} is not installed") from exc
            CHILDREN.started(process.pid)
            try:
                stdout, stderr = process.communicate(stdin, timeout=self.timeout)
            except subprocess.TimeoutExpired as exc:
                process.kill()
                process.communicate()
                raise DataplaneError(
                    "CommandTimeout", f"{argv[0]} took over {self.timeout:.0f}s", retryable=True
                ) from exc
            finally:
                CHILDREN.exited(process.pid)
            return Completed(process.returncode, stdout, stderr)

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
