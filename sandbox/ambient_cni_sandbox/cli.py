"""`ambient-cni sandbox ...` and `ambient-cni demo`: the sandbox's commands.

They reach the `ambient-cni` command line through the `ambient_cni.commands`
entry point group, so the operator package never imports the sandbox and an
image without the sandbox simply has no such commands. `python -m
ambient_cni_sandbox COMMAND` runs the same sandbox commands directly (the
kubelets and the scheduler are started that way).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SANDBOX = "demo"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `sandbox` and `demo` to the `ambient-cni` command line."""
    sandbox = sub.add_parser(
        "sandbox",
        help="a real local cluster: kube-apiserver, etcd, simulated nodes and pods",
        description="A local cluster for demos and tests: a real etcd, kube-apiserver and "
        "kube-controller-manager on loopback, nodes and pods simulated with "
        "network namespaces. Needs root.",
    )
    _sandbox_commands(sandbox)
    sandbox.set_defaults(run=run_sandbox)
    demo = sub.add_parser("demo", help="run the demo on a local sandbox cluster")
    demo.add_argument("--name", default=DEFAULT_SANDBOX)
    demo.add_argument("--keep", action="store_true", help="leave the sandbox running afterwards")
    demo.set_defaults(run=_run_demo)


def _sandbox_commands(sandbox: argparse.ArgumentParser) -> None:
    cmds = sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="COMMAND")

    def named(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--name", default=DEFAULT_SANDBOX, help=f"sandbox name (default {DEFAULT_SANDBOX})"
        )
        return parser

    cmds.add_parser(
        "build",
        help="build (or find cached) etcd, kube-apiserver, kube-controller-manager, kubectl, "
        "helm, the CNI reference plugins and istio-cni",
    )
    image = cmds.add_parser(
        "image",
        help="build the project's image from its Dockerfile with buildah (no Docker engine); "
        "its base images are made locally, nothing is pulled",
    )
    image.add_argument("--tag", default="localhost/ambient-cni:dev")
    image.add_argument(
        "--push", metavar="DEST", help="then push it, e.g. registry.example.com/ambient-cni:1.0"
    )
    up = named(cmds.add_parser("up", help="start a sandbox and wait until its nodes are Ready"))
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument(
        "--pod-network",
        choices=("bridge", "ptp"),  # topology.POD_NETWORKS, not imported: --help stays fast
        default="bridge",
        help="bridge: pods on a node bridge (default); ptp: a veth per pod, as kindnet",
    )
    up.add_argument(
        "--ip-family",
        choices=("dual", "ipv4", "ipv6"),  # topology.IP_FAMILIES
        default="dual",
        help="dual: an IPv4 and an IPv6 address for every node and pod, IPv4 first (default); "
        "ipv4 or ipv6: that family alone",
    )
    down = named(cmds.add_parser("down", help="stop a sandbox and remove everything it made"))
    down.add_argument("--all", action="store_true", help="every sandbox on this machine")
    named(cmds.add_parser("status", help="control plane health, nodes and pods"))
    named(
        cmds.add_parser(
            "env", help="print shell exports: KUBECONFIG, and PATH for kubectl and kubectl ambient"
        )
    )
    named(
        cmds.add_parser(
            "ztunnel",
            help="run ztunnel's stand-in on every node, as installing Istio's ztunnel would "
            "(a pod labelled app=ztunnel in istio-system, a real ZDS client of the node's agent)",
        )
    )
    logs = named(
        cmds.add_parser(
            "logs",
            help="a container's output, as `kubectl logs` shows it (the sandbox's kubelets "
            "serve no kubelet API, so kubectl logs cannot reach them)",
        )
    )
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", help="default: the pod's only or first container")
    logs.add_argument("pod")
    ex = named(cmds.add_parser("exec", help="run a command inside a pod's network namespace"))
    ex.add_argument("-n", "--namespace", default="default")
    ex.add_argument("pod")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- command [args...]")
    kubelet = named(cmds.add_parser("kubelet", help=argparse.SUPPRESS))
    kubelet.add_argument("--node", required=True)
    named(cmds.add_parser("scheduler", help=argparse.SUPPRESS))
    named(cmds.add_parser("apiproxy", help=argparse.SUPPRESS))


def run_sandbox(args: argparse.Namespace) -> int:
    # Imported here so `ambient-cni --help` stays fast and needs no root.
    from . import lifecycle

    command = args.sandbox_command
    if command == "build":
        from .binaries import binaries_dir, cni_binaries_dir

        print(binaries_dir())
        print(cni_binaries_dir())
        return 0
    if command == "image":
        from . import images

        def say(message: str) -> None:
            print(f"[image] {message}", file=sys.stderr)

        image_id = images.build(images.repo_root(), tag=args.tag, log=say)
        print(f"{args.tag} {image_id[:12]} {images.size(args.tag) / 1e6:.0f} MB")
        if args.push:
            images.run_tool("podman", "push", "--quiet", args.tag, args.push)
            print(f"pushed {args.push}")
        return 0
    if command == "up":
        state = lifecycle.up(
            args.name, args.nodes, pod_network=args.pod_network, ip_family=args.ip_family
        )
        print(f"export KUBECONFIG={state.kubeconfig}")
        return 0
    if command == "down":
        names = lifecycle.known_sandboxes() if args.all else [args.name]
        for name in names:
            lifecycle.down(name)
        if args.all and not names:
            print("no sandboxes on this machine", file=sys.stderr)
        return 0
    if command == "status":
        from .status import show_status

        return show_status(args.name)
    if command == "env":
        state = lifecycle.require_state(args.name)
        print(f"export KUBECONFIG={state.kubeconfig}")
        # The built kubectl, and next to this Python its plugin kubectl-ambient.
        scripts = Path(sys.executable).parent
        print(f"export PATH={state.bin_dir}:$PATH:{scripts}")
        return 0
    if command == "ztunnel":
        from . import components
        from .cluster import SandboxCluster

        cluster = SandboxCluster.open(args.name)
        for node in cluster.node_names:
            print(f"pod/{components.start_ztunnel(cluster, node)} running on {node}")
        return 0
    if command == "logs":
        return _logs(args)
    if command == "exec":
        return _exec_in_pod(args)
    if command == "kubelet":
        from . import kubelet

        kubelet.main(args.name, args.node)
        return 0
    if command == "scheduler":
        from . import scheduler

        scheduler.main(args.name)
        return 0
    if command == "apiproxy":
        from . import apiproxy

        apiproxy.main(args.name)
        return 0
    raise AssertionError(command)


def _logs(args: argparse.Namespace) -> int:
    from .cluster import SandboxCluster

    cluster = SandboxCluster.open(args.name)
    pod = cluster.pod(args.namespace, args.pod)
    if pod is None:
        print(f'error: pod "{args.pod}" not found in namespace {args.namespace}', file=sys.stderr)
        return 1
    containers = [c["name"] for c in pod["spec"]["containers"]]
    container = args.container or containers[0]
    if container not in containers:
        print(
            f"error: container {container} is not valid for pod {args.pod}: "
            f"choose one of {containers}",
            file=sys.stderr,
        )
        return 1
    for line in cluster.container_log(pod, container):
        print(line)
    return 0


def _exec_in_pod(args: argparse.Namespace) -> int:  # noqa: RET503 - ends in execvp
    from .cluster import SandboxCluster

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("ambient-cni sandbox exec: give a command after --", file=sys.stderr)
        return 2
    cluster = SandboxCluster.open(args.name)
    pod = cluster.pod(args.namespace, args.pod)
    if pod is None:
        print(f"no pod {args.namespace}/{args.pod}", file=sys.stderr)
        return 1
    os.execvp("ip", ["ip", "netns", "exec", cluster.pod_netns(pod), *argv])  # noqa: S606


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.name, keep=args.keep)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ambient_cni_sandbox COMMAND ...`: the sandbox commands on their own."""
    parser = argparse.ArgumentParser(prog="python -m ambient_cni_sandbox")
    _sandbox_commands(parser)
    args = parser.parse_args(argv)
    try:
        return run_sandbox(args)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"ambient-cni sandbox: error: {exc}", file=sys.stderr)
        return 1
