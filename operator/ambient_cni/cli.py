"""The `ambient-cni` command line.

Other installed distributions may add commands through the `ambient_cni.commands`
entry point group (the sandbox adds `sandbox` and `demo`): each entry is a
function that adds its subparsers and sets `run` on them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from .api.names import DEFAULT_EXCLUDED_NAMESPACES, DEFAULT_SYSTEM_NAMESPACE, NOT_READY_TAINT_KEY
from .dataplane.constants import BACKEND_CHOICES

COMMAND_PLUGINS = "ambient_cni.commands"
LOG_LEVELS = ["debug", "info", "warning", "error"]


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


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
    ctl.add_argument(
        "--max-concurrent-writes",
        type=_at_least_one,
        default=8,
        help="AmbientNodeConfig writes in flight at once (never two for one node)",
    )
    ctl.add_argument(
        "--orphan-grace",
        type=float,
        default=60.0,
        help="seconds an AmbientNodeConfig whose Node does not exist is kept before deletion",
    )
    ctl.add_argument(
        "--untaint-nodes",
        action="store_true",
        help="take the --taint-key taint off each node once its AmbientNodeConfig is Ready",
    )
    ctl.add_argument("--taint-key", default=NOT_READY_TAINT_KEY)
    ctl.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    ctl.set_defaults(run=_run_controller)


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
        choices=BACKEND_CHOICES,
        default="auto",
        help="dataplane backend; auto follows what the node's rules already use "
        "(iptables-nft when it has none)",
    )
    agent.add_argument(
        "--netns-prefix", default="", help="only consider named namespaces starting with this"
    )
    agent.add_argument(
        "--drift-interval",
        type=float,
        default=10.0,
        help="seconds between re-checks of every pod where the kernel announces no rule "
        "changes (iptables-legacy, or a namespace that cannot be watched); default 10",
    )
    agent.add_argument(
        "--resync-interval",
        type=float,
        default=90.0,
        help="seconds between re-checks of every pod where the kernel announces rule changes "
        "(nftables, iptables-nft: each namespace is re-checked as it changes); default 90",
    )
    agent.add_argument(
        "--redirect-modes",
        type=_redirect_modes,
        default=("inpod", "node"),
        help="comma-separated redirect modes this agent applies (default: inpod,node); a spec "
        "asking for another is refused in status and every pod kept as it is",
    )
    agent.add_argument(
        "--kubelet-uid",
        type=int,
        help="the user kubelet runs as (the nftables backend's probe rule matches it); "
        "default: found in --proc",
    )
    agent.add_argument("--workers", type=int, default=4, help="pods reconciled at once (default 4)")
    agent.add_argument("--listen-address", default="0.0.0.0")  # noqa: S104 - in a pod
    agent.add_argument("--metrics-port", type=int, default=15014)
    agent.add_argument("--health-port", type=int, default=8000)
    agent.add_argument(
        "--cni-run-dir",
        type=Path,
        help="serve the istio-cni plugin on RUN_DIR/pluginevent.sock (Istio's "
        "/var/run/istio-cni); off when not given",
    )
    agent.add_argument(
        "--exclude-namespaces",
        default=",".join(DEFAULT_EXCLUDED_NAMESPACES),
        help="for CNI ADD decisions: as the controller's flag (default: %(default)s)",
    )
    agent.add_argument("--system-namespace", default=DEFAULT_SYSTEM_NAMESPACE)
    agent.add_argument(
        "--uninstall",
        action="store_true",
        help="remove the host's probe rules and ipsets, then exit (chart uninstall)",
    )
    agent.set_defaults(run=_run_agent)


def _install_cni_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    install = sub.add_parser(
        "install-cni",
        help="install the istio-cni plugin into the node's CNI configuration and keep it there",
    )
    install.add_argument("--bin-dir", type=Path, default=Path("/host/opt/cni/bin"))
    install.add_argument("--conf-dir", type=Path, default=Path("/host/etc/cni/net.d"))
    install.add_argument(
        "--plugin-binary",
        type=Path,
        default=Path("/opt/ambient-cni/bin/istio-cni"),
        help="the plugin to install (default: the image's)",
    )
    install.add_argument(
        "--agent-run-dir",
        default="/var/run/istio-cni",
        help="where the agent serves the plugin, as the host sees it",
    )
    install.add_argument(
        "--exclude-namespaces",
        default=",".join(DEFAULT_EXCLUDED_NAMESPACES),
        help="namespaces the plugin passes through without asking the agent",
    )
    install.add_argument(
        "--pod-namespace",
        default=DEFAULT_SYSTEM_NAMESPACE,
        help="the agent's namespace (its own pods pass through)",
    )
    install.add_argument("--agent-pod-prefix", default="ambient-cni-node-")
    install.add_argument(
        "--chained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="chain into the primary conflist; --no-chained: a copy of it, with istio-cni, "
        "in a file of its own that runtimes take first",
    )
    install.add_argument("--listen-address", default="0.0.0.0")  # noqa: S104 - in a pod
    install.add_argument("--health-port", type=int, default=8010, help="/readyz once installed")
    install.add_argument(
        "--daemonset",
        help="NAMESPACE/NAME of the DaemonSet it runs in: when it is being deleted at SIGTERM, "
        "istio-cni is uninstalled; otherwise (an upgrade) it stays",
    )
    install.add_argument(
        "--kubeconfig", type=Path, help="for --daemonset; default: in-cluster, then $KUBECONFIG"
    )
    install.add_argument(
        "--uninstall",
        action="store_true",
        help="take istio-cni out of every conflist and the bin dir, then exit",
    )
    install.add_argument(
        "--absent",
        action="store_true",
        help="keep istio-cni out of the node's CNI configuration (the plugin is turned off)",
    )
    install.set_defaults(run=_run_install_cni)


def _run_install_cni(args: argparse.Namespace) -> int:
    from .install.app import run, uninstall
    from .install.conflist import PluginSettings
    from .install.installer import InstallOptions

    options = InstallOptions(
        bin_dir=args.bin_dir,
        conf_dir=args.conf_dir,
        plugin_binary=args.plugin_binary,
        settings=PluginSettings(
            agent_run_dir=args.agent_run_dir,
            exclude_namespaces=tuple(sorted(_namespaces(args.exclude_namespaces))),
            pod_namespace=args.pod_namespace,
            agent_pod_prefix=args.agent_pod_prefix,
        ),
        chained=args.chained,
    )
    if args.uninstall:
        return uninstall(options)
    return run(
        options,
        listen_address=args.listen_address,
        health_port=args.health_port,
        daemonset=args.daemonset,
        kubeconfig=args.kubeconfig,
        absent=args.absent,
    )


def _run_agent(args: argparse.Namespace) -> int:
    from .agent.app import run, uninstall
    from .agent.reconciler import AgentOptions
    from .selection import SelectionConfig

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
        resync_interval=args.resync_interval,
        redirect_modes=args.redirect_modes,
        workers=args.workers,
        kubelet_uid=args.kubelet_uid,
        cni_run_dir=args.cni_run_dir,
        selection=SelectionConfig(
            excluded_namespaces=_namespaces(args.exclude_namespaces),
            system_namespace=args.system_namespace,
        ),
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


def _namespaces(flag: str) -> frozenset[str]:
    return frozenset(n.strip() for n in flag.split(",") if n.strip())


def _run_controller(args: argparse.Namespace) -> int:
    from .controller.app import ControllerOptions, run
    from .controller.planner import PlannerConfig
    from .selection import SelectionConfig

    excluded = _namespaces(args.exclude_namespaces)
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
        max_concurrent_writes=args.max_concurrent_writes,
        orphan_grace=args.orphan_grace,
        untaint_nodes=args.untaint_nodes,
        taint_key=args.taint_key,
        log_level=args.log_level,
    )
    return run(options)


def _run_check_ready(args: argparse.Namespace) -> int:
    from .readiness import check_ready

    return check_ready(args.kubeconfig, args.timeout)


def _run_crds(args: argparse.Namespace) -> int:
    from .api.crd import crd_yaml

    print(crd_yaml(for_chart=args.chart), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient-cni",
        description="Ambient mesh traffic redirection as a Kubernetes operator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ready = sub.add_parser(
        "check-ready", help="wait until every AmbientNodeConfig is Ready (the chart's helm test)"
    )
    ready.add_argument("--kubeconfig", type=Path, help="default: in-cluster, then $KUBECONFIG")
    ready.add_argument("--timeout", type=float, default=120.0, help="seconds")
    ready.set_defaults(run=_run_check_ready)
    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    crds.add_argument(
        "--chart", action="store_true", help="the Helm chart's copy (kept on uninstall)"
    )
    crds.set_defaults(run=_run_crds)
    _controller_command(sub)
    _agent_command(sub)
    _install_cni_command(sub)
    for plugin in entry_points(group=COMMAND_PLUGINS):
        plugin.load()(sub)
    return parser


def _redirect_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in ("inpod", "node")]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"redirect modes are inpod and node, not {', '.join(unknown) or 'none'}"
        )
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"ambient-cni: error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
