"""`python -m benchmarks`: run the benchmarks on dedicated sandboxes, print the
results, and (with --write) rewrite the tables of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ambient_cni_sandbox import lifecycle
from ambient_cni_sandbox.cluster import SandboxCluster

from . import cni_add, controller_scale, enroll, event_to_kernel, idle, report
from .measure import machine

SANDBOX = "bench"


def _on_sandbox(
    nodes: int,
    body: Callable[[SandboxCluster], dict[str, Any]],
    name: str = SANDBOX,
    profiling: bool = False,
) -> dict[str, Any]:
    """A fresh sandbox per benchmark: none inherits another's objects or load. IPv4 only, as
    every figure in BENCHMARKS.md was measured (a dual-stack pod costs a second address and
    ruleset: compare like with like)."""
    lifecycle.up(name, nodes=nodes, ip_family="ipv4", apiserver_profiling=profiling)
    try:
        return body(SandboxCluster.open(name))
    finally:
        lifecycle.down(name)


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("node counts, e.g. 1000,2000,5000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--pods", type=int, default=250, help="enrolment: pods on one node")
    parser.add_argument("--event-pods", type=int, default=50, help="label-to-kernel: pods")
    parser.add_argument("--nodes", type=int, default=1000, help="controller scale: nodes")
    parser.add_argument("--scale-pods", type=int, default=20000, help="controller scale: pods")
    parser.add_argument("--relabel", type=int, default=100, help="namespaces labelled at once")
    parser.add_argument(
        "--scale-sizes",
        type=_sizes,
        metavar="NODES[,NODES...]",
        help="controller scale at each of these node counts, side by side (pods per node as "
        "--scale-pods/--nodes; e.g. 1000,2000,5000: `make bench-large`)",
    )
    parser.add_argument("--cni-pods", type=int, default=50, help="CNI ADD: pods per case")
    parser.add_argument(
        "--scale-profiles",
        type=Path,
        help="controller scale: the API server's CPU profile (pprof) of each burst and restart, "
        "and a py-spy profile of the controller's restart, into DIR (the restart runs slower)",
        metavar="DIR",
    )
    parser.add_argument(
        "--idle-window",
        type=float,
        help="agent at rest: seconds measured per size (default: the resync interval, 90)",
    )
    parser.add_argument(
        "--only",
        choices=["enroll", "event", "scale", "cni", "idle"],
        action="append",
        help="repeatable",
    )
    parser.add_argument("--write", type=Path, help="rewrite the tables of this BENCHMARKS.md")
    parser.add_argument(
        "--sandbox",
        default=SANDBOX,
        help=f"the sandboxes' name (default {SANDBOX}): two runs at once need two names",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="enrolment: also sample each agent with py-spy, stacks into DIR (slows it down)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks need root (network namespaces, a sandbox)", file=sys.stderr)
        return 2
    chosen = args.only or ["enroll", "event", "scale", "cni", "idle"]
    on_sandbox = functools.partial(_on_sandbox, name=args.sandbox)
    results: dict[str, dict[str, Any]] = {}
    if "enroll" in chosen:
        results["enroll"] = on_sandbox(1, lambda c: enroll.run(c, args.pods, profile=args.profile))
    if "event" in chosen:
        results["event"] = {"backends": {}}
        for backend in enroll.BACKENDS:
            measure = functools.partial(event_to_kernel.run, pods=args.event_pods, backend=backend)
            results["event"]["backends"][backend] = on_sandbox(2, measure)
    if "cni" in chosen:
        results["cni"] = on_sandbox(1, lambda c: cni_add.run(c, args.cni_pods))
    if "idle" in chosen:
        results["idle"] = on_sandbox(1, lambda c: idle.run(c, window=args.idle_window))
    if "scale" in chosen:
        per_node = max(args.scale_pods // max(args.nodes, 1), 1)
        sizes = args.scale_sizes or [args.nodes]
        runs = []
        for nodes in sizes:  # a fresh sandbox each: no size inherits another's etcd
            pods = args.scale_pods if nodes == args.nodes else nodes * per_node
            measure = functools.partial(
                controller_scale.run,
                nodes=nodes,
                pods=pods,
                relabel=args.relabel,
                profile_dir=args.scale_profiles,
            )
            runs.append(on_sandbox(1, measure, profiling=args.scale_profiles is not None))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # a long run's progress
        results["scale"] = {"sizes": runs}
    print(json.dumps(results, indent=2))
    if args.write:
        document = args.write.read_text()
        command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        document = report.replace_section(
            document, "machine", report.header(machine(), command.strip(), today)
        )
        tables = {
            "enroll": report.enroll_table,
            "event": report.event_table,
            "scale": report.scale_table,
            "cni": report.cni_table,
            "idle": report.idle_table,
        }
        for name, result in results.items():
            document = report.replace_section(document, name, tables[name](result))
        if "scale" in results:
            document = report.replace_section(
                document, "watch", report.watch_table(results["scale"]["sizes"][0])
            )
        args.write.write_text(document)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
