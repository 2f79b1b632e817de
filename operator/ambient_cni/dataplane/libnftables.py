"""libnftables, the netfilter project's own library, through its official Python binding.

A context binds to the network namespace of the thread that creates it, so
one is made inside the namespace for each operation, on the thread that
entered it; no process is started. What the kernel reports back is read as
the text `nft list` prints, with the counters taken out (they change with
traffic), per table; set elements are taken out of table listings too (they
are compared on their own).

A context is freed on a thread of its own (_Reaper says why).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Iterable
from typing import Any

import nftables

from .errors import DataplaneError, first_error
from .iptables_state import Tables

_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


class _Reaper:
    """Frees libnftables contexts off the threads that used them.

    Closing a context's netlink socket makes the kernel first finish releasing
    whatever any transaction on the host deleted, which waits for an RCU grace
    period (12 ms a context on this project's test machine): on the thread that
    took a pod's tables out, that wait would stall every pod queued behind it
    (250 pods' un-enrolment took 3 s, not 0.2 s). Here the wait happens off the
    pods' path, and contexts freed together share one.
    """

    def __init__(self) -> None:
        self._pending: list[nftables.Nftables] = []
        self._wake = threading.Condition()  # reentrant: bury() may run in a finaliser
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="nft-free", daemon=True)
                self._thread.start()

    def bury(self, ctx: nftables.Nftables) -> None:
        with self._wake:
            self._pending.append(ctx)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                batch, self._pending = self._pending, []
            batch.clear()  # the binding frees each context here (nft_ctx_free)


_REAPER = _Reaper()


class Nft:
    """One libnftables context in the calling thread's namespace."""

    def __init__(self) -> None:
        _REAPER.start()
        self._ctx = nftables.Nftables()
        self._ctx.set_handle_output(False)

    def __del__(self) -> None:
        ctx = getattr(self, "_ctx", None)  # None: the library failed to make one
        if ctx is not None:
            _REAPER.bury(ctx)

    def run(self, script: str, *, rejected: str = "RuleRejected") -> None:
        """One transaction: all of `script` is applied, or none of it."""
        code, _, error = self._ctx.cmd(script)
        if code != 0:
            raise DataplaneError(rejected, first_error(error, "nft"))

    def listing(self, command: str) -> str | None:
        """What `nft <command>` prints; None when the object does not exist."""
        code, output, error = self._ctx.cmd(command)
        if code != 0:
            if "No such file or directory" in error:
                return None
            raise DataplaneError("RuleReadFailed", first_error(error, "nft"), retryable=True)
        return str(output)

    def json(self, command: str) -> list[dict[str, Any]]:
        """`nft -j <command>`, as the list under "nftables" ([] when it does not exist)."""
        self._ctx.set_json_output(True)
        try:
            text = self.listing(command)
        finally:
            self._ctx.set_json_output(False)
        if text is None:
            return []
        found: list[dict[str, Any]] = json.loads(text).get("nftables", [])
        return found

    def tables(self) -> list[tuple[str, str]]:
        """(family, name) of every table in the namespace."""
        return [
            (item["table"]["family"], item["table"]["name"])
            for item in self.json("list tables")
            if "table" in item
        ]

    def ruleset(self) -> Listing:
        """The whole ruleset as `nft list ruleset` prints it (one dump of the kernel's)."""
        return Listing(self.listing("list ruleset") or "")

    def read(self, names: Iterable[str]) -> Tables:
        """Our `inet` tables among `names` that exist, each as its normalised listing lines."""
        return self.ruleset().tables(names)


@dataclasses.dataclass(frozen=True)
class Listing:
    """One listing of a namespace's ruleset, cut into what the callers compare."""

    text: str

    def tables(self, names: Iterable[str]) -> Tables:
        """The `inet` tables among `names` that exist, each as its normalised lines."""
        wanted = {f"table inet {name} {{": name for name in names}
        found: Tables = {}
        current: list[str] | None = None
        for line in self.text.splitlines():
            if line.startswith("table "):
                name = wanted.get(line.strip())
                current = found.setdefault(name, []) if name else None
            if current is not None:
                current.append(line)
        return {name: normalise("\n".join(lines)) for name, lines in found.items()}

    def chains(self, families: Iterable[str]) -> set[str]:
        """The names of the chains in tables of these families (e.g. iptables-nft's `ip`)."""
        heads = tuple(f"table {family} " for family in families)
        found: set[str] = set()
        inside = False
        for line in self.text.splitlines():
            if line.startswith("table "):
                inside = line.startswith(heads)
            elif inside and line.startswith("\tchain "):
                found.add(line.split()[1])
        return found


def normalise(listing: str) -> list[str]:
    """A table listing without counters' values and set elements, one stripped line each."""
    lines: list[str] = []
    in_elements = False
    for raw in listing.splitlines():
        line = raw.strip()
        if in_elements:
            in_elements = not line.endswith("}")
            continue
        if line.startswith("elements = {"):
            in_elements = not line.endswith("}")
            continue
        if line:
            lines.append(_COUNTER.sub("counter", line))
    return lines
