"""The version of this operator, as installed: one answer for the agent, the controller and
the kubectl plugin."""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTION = "ambient-cni"
UNKNOWN = "unknown"


@functools.cache
def operator_version() -> str:
    """The installed `ambient-cni` distribution's version; "unknown" when it runs from a
    source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN
