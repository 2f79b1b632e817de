"""The `ambient-cni` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .api.names import DEFAULT_EXCLUDED_NAMESPACES, DEFAULT_SYSTEM_NAMESPACE
from .dataplane.constants import BACKENDS

DEFAULT_SANDBOX = "demo"
LOG_LEVELS = ["debug", "info", "warning", "error"]


def _sandbox_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sandbox = sub.add_parser(
        "sandbox",
        help="a real local cluster: kube-apiserver, etcd, simulated nodes and pods",
        description="A local cluster for demos and tests: a real etcd, kube-apiserver and "
        "kube-controller-manager on loopback, nodes and pods simulated with "
        "network namespaces. Needs root.",
    )
    cmds = sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="COMMAND")

    def named(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--name", default=DEFAULT_SANDBOX, help=f"sandbox name (default {DEFAULT_SANDBOX})"
        )
        return parser

    cmds.add_parser(
        "build",
        help="build (or find cached) etcd, kube-apiserver, "
        "kube-controller-manager, kubectl and helm",
    )
    up = named(cmds.add_parser("up", help="start a sandbox and wait until its nodes are Ready"))
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    down = named(cmds.add_parser("down", help="stop a sandbox and remove everything it made"))
    down.add_argument("--all", action="store_true", help="every sandbox on this machine")
    named(cmds.add_parser("status", help="control plane health, nodes and pods"))
    named(cmds.add_parser("env", help="print shell exports for KUBECONFIG and the kubectl PATH"))
    ex = named(cmds.add_parser("exec", help="run a command inside a pod's network namespace"))
    ex.add_argument("-n", "--namespace", default="default")
    ex.add_argument("pod")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- command [args...]")
    kubelet = named(cmds.add_parser("kubelet", help=argparse.SUPPRESS))
    kubelet.add_argument("--node", required=True)
    named(cmds.add_parser("scheduler", help=argparse.SUPPRESS))


def _controller_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ctl = sub.add_parser(
        "controller", help="run the cluster controller (writes AmbientNodeConfig specs)"
    )
    ctl.add_argument("--kubeconfig", type=Path, help="default: in-cluster, then $KUBECONFIG")
    ctl.add_argument("--redirect-mode", choices=["inpod", "node"], default="inpod")
    ctl.add_argument(
        "--dns-capture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture DNS by default (pods may override by annotation)",
    )
    ctl.add_argument(
        "--exclude-namespaces",
        default=",".join(DEFAULT_EXCLUDED_NAMESPACES),
        help="comma-separated namespaces never enrolled (default: %(default)s)",
    )
    ctl.add_argument("--system-namespace", default=DEFAULT_SYSTEM_NAMESPACE)
    ctl.add_argument("--listen-address", default="0.0.0.0")  # noqa: S104 - in a pod
    ctl.add_argument("--metrics-port", type=int, default=15014)
    ctl.add_argument("--health-port", type=int, default=8081)
    ctl.add_argument("--leader-election", action=argparse.BooleanOptionalAction, default=True)
    ctl.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", DEFAULT_SYSTEM_NAMESPACE),
        help="namespace of the leader-election Lease (default: $POD_NAMESPACE or istio-system)",
    )
    ctl.add_argument("--min-write-interval", type=float, default=1.0, help="seconds per node")
    ctl.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def _agent_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser("agent", help="run the node agent for one node")
    agent.add_argument(
        "--node", default=os.environ.get("NODE_NAME"), help="this node (default: $NODE_NAME)"
    )
    agent.add_argument("--kubeconfig", type=Path, help="default: in-cluster, then $KUBECONFIG")
    agent.add_argument("--zds-socket", type=Path, default=Path("/var/run/ztunnel/ztunnel.sock"))
    agent.add_argument(
        "--host-netns", type=Path, help="the node's network namespace (default: the agent's own)"
    )
    agent.add_argument("--netns-dir", type=Path, default=Path("/var/run/netns"))
    agent.add_argument("--proc", type=Path, default=Path("/proc"), help="the host's /proc")
    agent.add_argument(
        "--daemonset",
        help="NAMESPACE/NAME of the agent's DaemonSet: when it is being deleted at SIGTERM, "
        "the agent removes the host's rules and ipsets (an uninstall)",
    )
    agent.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    agent.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="iptables flavour; auto follows the one the host's rules already use",
    )
    agent.add_argument(
        "--netns-prefix", default="", help="only consider named namespaces starting with this"
    )
    agent.add_argument("--drift-interval", type=float, default=10.0, help="seconds")
    agent.add_argument("--workers", type=int, default=4, help="pods reconciled at once (default 4)")
    agent.add_argument("--listen-address", default="0.0.0.0")  # noqa: S104 - in a pod
    agent.add_argument("--metrics-port", type=int, default=15014)
    agent.add_argument("--health-port", type=int, default=8000)
    agent.add_argument(
        "--uninstall",
        action="store_true",
        help="remove the host's probe rules and ipsets, then exit (chart uninstall)",
    )


def _run_agent(args: argparse.Namespace) -> int:
    from .agent.app import run, uninstall
    from .agent.reconciler import AgentOptions

    if not args.node:
        print("ambient-cni agent: give --node or set NODE_NAME", file=sys.stderr)
        return 2
    options = AgentOptions(
        node=args.node,
        zds_socket=args.zds_socket,
        host_netns=args.host_netns,
        netns_dir=args.netns_dir,
        proc=args.proc,
        netns_prefix=args.netns_prefix,
        daemonset=args.daemonset,
        backend=args.backend,
        drift_interval=args.drift_interval,
        workers=args.workers,
    )
    if args.uninstall:
        return uninstall(options)
    return run(
        options,
        kubeconfig=args.kubeconfig,
        listen_address=args.listen_address,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        log_level=args.log_level,
    )


def _run_controller(args: argparse.Namespace) -> int:
    from .controller.app import ControllerOptions, run
    from .controller.planner import PlannerConfig
    from .selection import SelectionConfig

    excluded = frozenset(n.strip() for n in args.exclude_namespaces.split(",") if n.strip())
    options = ControllerOptions(
        kubeconfig=args.kubeconfig,
        planner=PlannerConfig(
            selection=SelectionConfig(
                excluded_namespaces=excluded, system_namespace=args.system_namespace
            ),
            redirect_mode=args.redirect_mode,
            dns_capture=args.dns_capture,
        ),
        listen_address=args.listen_address,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        leader_election=args.leader_election,
        lease_namespace=args.lease_namespace,
        min_write_interval=args.min_write_interval,
        log_level=args.log_level,
    )
    return run(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient-cni",
        description="Ambient mesh traffic redirection as a Kubernetes operator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _sandbox_commands(sub)
    ready = sub.add_parser(
        "check-ready", help="wait until every AmbientNodeConfig is Ready (the chart's helm test)"
    )
    ready.add_argument("--kubeconfig", type=Path, help="default: in-cluster, then $KUBECONFIG")
    ready.add_argument("--timeout", type=float, default=120.0, help="seconds")
    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    crds.add_argument(
        "--chart", action="store_true", help="the Helm chart's copy (kept on uninstall)"
    )
    _controller_command(sub)
    _agent_command(sub)
    demo = sub.add_parser("demo", help="run the demo on a local sandbox cluster")
    demo.add_argument("--name", default=DEFAULT_SANDBOX)
    demo.add_argument("--keep", action="store_true", help="leave the sandbox running afterwards")
    return parser


def _run_sandbox(args: argparse.Namespace) -> int:
    # Imported here so `ambient-cni --help` stays fast and needs no root.
    from .sandbox import lifecycle

    command = args.sandbox_command
    if command == "build":
        from .sandbox.binaries import binaries_dir

        print(binaries_dir())
        return 0
    if command == "up":
        state = lifecycle.up(args.name, args.nodes)
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
        from .sandbox.status import show_status

        return show_status(args.name)
    if command == "env":
        state = lifecycle.require_state(args.name)
        print(f"export KUBECONFIG={state.kubeconfig}")
        print(f"export PATH={state.bin_dir}:$PATH")
        return 0
    if command == "exec":
        return _exec_in_pod(args)
    if command == "kubelet":
        from .sandbox import kubelet

        kubelet.main(args.name, args.node)
        return 0
    if command == "scheduler":
        from .sandbox import scheduler

        scheduler.main(args.name)
        return 0
    raise AssertionError(command)


def _exec_in_pod(args: argparse.Namespace) -> int:  # noqa: RET503 - ends in execvp
    from .sandbox.cluster import SandboxCluster

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sandbox":
            return _run_sandbox(args)
        if args.command == "check-ready":
            from .readiness import check_ready

            return check_ready(args.kubeconfig, args.timeout)
        if args.command == "agent":
            return _run_agent(args)
        if args.command == "controller":
            return _run_controller(args)
        if args.command == "crds":
            from .api.crd import crd_yaml

            print(crd_yaml(for_chart=args.chart), end="")
            return 0
        if args.command == "demo":
            from .sandbox.demo import run_demo

            return run_demo(args.name, keep=args.keep)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"ambient-cni: error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
