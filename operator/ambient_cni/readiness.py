"""`ambient-cni check-ready`: is every node's redirection Ready? (The chart's helm test.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kubernetes.client import CustomObjectsApi

from ambient_cni.api import names
from ambient_cni.kube import new_api_client, raw


def _orphans(items: list[dict[str, Any]]) -> list[str]:
    """Objects whose Node does not exist: the controller deletes them, nothing to wait for."""
    return [
        item["metadata"]["name"]
        for item in items
        if (item["metadata"].get("labels") or {}).get(names.ORPHANED_LABEL) == "true"
    ]


def _problems(items: list[dict[str, Any]]) -> list[str]:
    problems = []
    orphans = set(_orphans(items))
    for item in items:
        name = item["metadata"]["name"]
        if name in orphans:
            continue
        status = item.get("status") or {}
        ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
        if status.get("observedGeneration") != item["metadata"].get("generation"):
            problems.append(f"{name}: status is behind the spec (not reconciled yet)")
        elif not ready or ready[0].get("status") != "True":
            message = ready[0].get("message", "") if ready else "no Ready condition"
            problems.append(f"{name}: not Ready: {message}")
    return problems


def check_ready(kubeconfig: Path | None, timeout: float) -> int:
    custom = CustomObjectsApi(new_api_client(kubeconfig))
    deadline = time.monotonic() + timeout
    while True:
        items = raw(
            custom.list_cluster_custom_object(
                names.GROUP, names.VERSION, names.PLURAL, _preload_content=False
            )
        )["items"]
        orphans = _orphans(items)
        nodes = len(items) - len(orphans)
        problems = ["no AmbientNodeConfig exists: is the controller running?"] if not nodes else []
        problems += _problems(items)
        if not problems:
            print(f"all {nodes} nodes Ready")
            for name in orphans:
                print(
                    f"{name}: its Node does not exist (the controller deletes it); not waited for"
                )
            return 0
        if time.monotonic() >= deadline:
            print("\n".join(problems))
            return 1
        time.sleep(2)
