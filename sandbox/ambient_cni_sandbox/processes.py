"""Starting, finding and stopping the sandbox's processes.

Every process a sandbox starts carries `AMBIENT_CNI_SANDBOX=<name>` in its
environment, which children inherit. `sandbox down` finds them all through
/proc with no state file at all, so a crashed `sandbox up` still cleans up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

TAG_ENV = "AMBIENT_CNI_SANDBOX"


def tagged_env(sandbox: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env[TAG_ENV] = sandbox
    return env


def spawn_daemon(
    argv: Sequence[str],
    *,
    sandbox: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session, logging to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=tagged_env(sandbox, env),
            close_fds=True,
        )


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): (pid, start) names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _tags() -> Iterator[tuple[int, str]]:
    """(pid, sandbox) for every live process carrying a sandbox tag, this one excepted."""
    prefix = f"{TAG_ENV}=".encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(prefix) and is_running(int(entry)):
                yield int(entry), var[len(prefix) :].decode(errors="replace")
                break


def tagged_pids(sandbox: str) -> list[int]:
    """Every live process whose environment names this sandbox."""
    return sorted(pid for pid, tag in _tags() if tag == sandbox)


def tagged_sandboxes() -> set[str]:
    return {tag for _, tag in _tags()}


def _reap(pid: int) -> None:
    # Our own children become zombies until waited for; others are reaped by init.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(pids: Iterable[int], *, grace: float = 5.0) -> list[int]:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the pids still alive."""
    pending = [p for p in pids if is_running(p)]
    _signal_all(pending, signal.SIGTERM)
    pending = _wait_gone(pending, grace)
    _signal_all(pending, signal.SIGKILL)
    return _wait_gone(pending, 5.0)


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Reap and poll until the processes are gone or `timeout` passes; the ones left."""
    deadline = time.monotonic() + timeout
    while pids:
        for pid in pids:
            _reap(pid)
        pids = [p for p in pids if is_running(p)]
        if not pids or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return pids


def terminate_group(pgid: int, *, grace: float) -> None:
    """Signal a whole process group (a pod's process and its children)."""
    members = _group_members(pgid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(p) for p in _group_members(pgid)):
        for pid in members:
            _reap(pid)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    terminate(_group_members(pgid), grace=0)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def listens_on(pid: int, port: int) -> bool:
    """Whether a TCP socket in `pid`'s network namespace listens on `port` (any address)."""
    listen_state = "0A"
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == listen_state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False
