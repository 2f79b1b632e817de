"""`kubectl-ambient`: the plugin's command line (kubectl runs it as `kubectl ambient ...`).

Exit codes, for scripts: 0 all is well (status: every node Ready and every selected pod
redirected; why: the decision and the node's state agree and nothing is in flight),
1 it is not, 2 the question could not be answered (usage, no such pod, no cluster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from ambient_cni.api import names
from ambient_cni.selection import SelectionConfig

from . import human
from .listing import pod_rows
from .objects import ControllerInfo, Report
from .overview import overview
from .source import ClusterSource, Kubeconfig, KubeSource, SourceError
from .why import explain

OK, NOT_OK, CANNOT_ANSWER = 0, 1, 2


def _common(parser: argparse.ArgumentParser, *, namespaced: bool, outputs: Sequence[str]) -> None:
    parser.add_argument("--kubeconfig", type=Path, help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--context", help="the kubeconfig context to use (default: current)")
    if namespaced:
        parser.add_argument("-n", "--namespace", help="default: the context's namespace")
    parser.add_argument(
        "-i",
        "--istio-namespace",
        default=names.DEFAULT_SYSTEM_NAMESPACE,
        help="where the controller runs (its Lease says how it selects; default %(default)s)",
    )
    parser.add_argument("-o", "--output", choices=list(outputs), help="output format")
    parser.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="auto: on a terminal, unless NO_COLOR is set",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kubectl ambient",
        description="What ambient redirection does, where, and why: read from the "
        "AmbientNodeConfigs of ambient-cni.",
        epilog="Exit codes: 0 all is well, 1 something is not Ready or disagrees, "
        "2 the question could not be answered.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser(
        "status", help="the cluster at a glance: nodes, pods not yet redirected, orphans"
    )
    _common(status, namespaced=False, outputs=["wide", "json", "yaml"])
    why = sub.add_parser("why", help="why a pod is, or is not, redirected")
    why.add_argument("pod", metavar="POD", help="NAME, NAMESPACE/NAME or pod/NAME")
    _common(why, namespaced=True, outputs=["json", "yaml"])
    pods = sub.add_parser("pods", help="every redirected pod and its state, from the nodes' status")
    pods.add_argument("-A", "--all-namespaces", action="store_true", help="pods of every namespace")
    _common(pods, namespaced=True, outputs=["wide", "json", "yaml"])
    return top


def _colour(choice: str, out: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    # no-color.org: NO_COLOR set to anything but the empty string turns colour off.
    return out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _structured(data: Any, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    return str(yaml.safe_dump(data, sort_keys=False))


def _dump(report: Report) -> dict[str, Any]:
    data: dict[str, Any] = report.model_dump(mode="json", by_alias=True)
    return data


def _selection(
    controller: ControllerInfo, istio_namespace: str
) -> tuple[SelectionConfig, str | None]:
    """How the running controller selects, from its Lease; its defaults, and a note saying
    so, when the Lease says nothing."""
    config = SelectionConfig(system_namespace=istio_namespace)
    update: dict[str, Any] = {}
    if controller.excluded_namespaces is not None:
        update["excluded_namespaces"] = frozenset(controller.excluded_namespaces)
    if controller.system_namespace:
        update["system_namespace"] = controller.system_namespace
    config = config.model_copy(update=update)
    if controller.found and controller.excluded_namespaces is not None:
        return config, None
    why = controller.problem or "its Lease does not say how it selects"
    return config, (
        f"the controller's configuration is unknown ({why}): decided with its defaults, "
        f"excluded namespaces {', '.join(sorted(config.excluded_namespaces))}, "
        f"system namespace {config.system_namespace}"
    )


TYPE_PREFIXES = ("pod/", "pods/", "po/")


def _split_pod(argument: str, namespace: str, explicit: bool) -> tuple[str, str]:
    """NAME, NAMESPACE/NAME or pod/NAME (kubectl's TYPE/NAME; so a namespace named like a
    type needs -n). `explicit`: the namespace came from -n, so NAMESPACE/NAME must agree."""
    name = argument
    for prefix in TYPE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if "/" in name:
        given, _, name = name.partition("/")
        if explicit and given != namespace:
            raise SourceError(f"{argument!r} names namespace {given}, but -n says {namespace}")
        namespace = given
    if not namespace or not name or "/" in name:
        raise SourceError(f"{argument!r}: give a pod as NAME, NAMESPACE/NAME or pod/NAME")
    return namespace, name


def run(
    args: argparse.Namespace,
    source: ClusterSource,
    namespace: str,
    now: datetime.datetime,
    out: TextIO,
) -> int:
    style = human.Style(_colour(args.color, out))
    if args.command == "pods":
        rows = pod_rows(source.node_configs(), None if args.all_namespaces else namespace)
        if args.output in ("json", "yaml"):
            out.write(_structured({"items": [_dump(r) for r in rows]}, args.output))
        else:
            out.write(
                human.pods_text(
                    rows,
                    now,
                    style,
                    all_namespaces=args.all_namespaces,
                    wide=args.output == "wide",
                )
            )
        return OK
    controller = source.controller(args.istio_namespace)
    config, note = _selection(controller, args.istio_namespace)
    if args.command == "why":
        pod_namespace, name = _split_pod(args.pod, namespace, args.namespace is not None)
        pod = source.pod(pod_namespace, name)
        if pod is None:
            raise SourceError(f'pod "{name}" not found in namespace {pod_namespace}')
        node = source.node_config(pod.node_name) if pod.node_name else None
        report = explain(pod, source.namespace_labels(pod.namespace), config, node, note=note)
        if args.output in ("json", "yaml"):
            out.write(_structured(_dump(report), args.output))
        else:
            out.write(human.why_text(report, now, style))
        return OK if report.ok else NOT_OK
    view = overview(
        source.node_configs(),
        node_names=source.node_names(),
        pods=source.pods(),
        namespace_labels=source.all_namespace_labels(),
        config=config,
        controller=controller,
        now=now,
    )
    if args.output in ("json", "yaml"):
        out.write(_structured(_dump(view), args.output))
    else:
        out.write(human.status_text(view, style, wide=args.output == "wide"))
    return OK if view.ready else NOT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        kubeconfig = Kubeconfig(args.kubeconfig, args.context)
        namespace = getattr(args, "namespace", None) or kubeconfig.namespace()
        source = KubeSource(kubeconfig.client())
        return run(args, source, namespace, datetime.datetime.now(datetime.UTC), sys.stdout)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CANNOT_ANSWER
    except BrokenPipeError:
        # `kubectl ambient pods -A | head`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
