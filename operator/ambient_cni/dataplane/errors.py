"""The one error type of the dataplane: what the kernel or a tool refused, in its own words."""

from __future__ import annotations


class DataplaneError(RuntimeError):
    """`reason` is CamelCase for status (`RuleRejected`, `NetnsNotFound`, ...); `message` is the
    kernel's or the tool's own words; `retryable` says whether trying again may help."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


def first_error(stderr: str, tool: str = "iptables-restore") -> str:
    """The first lines of a tool's complaint, joined: what status shows a person."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return "; ".join(lines[:3]) or f"{tool} failed without a message"


class UnsafeInput(ValueError):
    """A renderer was handed something it will not put into a rule (a name that is not a
    kernel interface name, say): it emits only tokens it constructed or checked itself."""
