from __future__ import annotations

import pytest

from ambient_cni.cli import build_parser, main
from ambient_cni.dataplane import factory
from ambient_cni.dataplane.constants import BACKEND_CHOICES
from ambient_cni.dataplane.iptables_pod import IptablesPodDataplane
from ambient_cni.kube import in_cluster_server


def test_sandbox_defaults() -> None:
    args = build_parser().parse_args(["sandbox", "up"])
    assert (args.sandbox_command, args.name, args.nodes) == ("up", "demo", 2)
    assert (args.pod_network, args.ip_family) == ("bridge", "dual")


@pytest.mark.parametrize("family", ["dual", "ipv4", "ipv6"])
def test_sandbox_up_takes_an_ip_family(family: str) -> None:
    args = build_parser().parse_args(["sandbox", "up", "--ip-family", family])
    assert args.ip_family == family


def test_exec_keeps_the_command_after_double_dash() -> None:
    args = build_parser().parse_args(
        ["sandbox", "exec", "-n", "demo", "echo-1", "--", "curl", "-s", "x"]
    )
    assert (args.namespace, args.pod, args.argv) == ("demo", "echo-1", ["curl", "-s", "x"])


def test_invalid_sandbox_name_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "env", "--name", "Bad-Name"]) == 1
    assert "invalid sandbox name" in capsys.readouterr().err


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "sandbox" in out
    assert "demo" in out


@pytest.mark.parametrize(
    ("backend", "tool"),
    [("iptables-nft", "iptables-nft-restore"), ("iptables-legacy", "iptables-legacy-restore")],
)
def test_an_explicit_backend_picks_its_iptables_flavour(backend: str, tool: str) -> None:
    args = build_parser().parse_args(["agent", "--node=n1", f"--backend={backend}"])
    dataplane = factory.build(args.backend)
    assert dataplane.backend == backend
    assert isinstance(dataplane.pods, IptablesPodDataplane)
    assert dataplane.pods.flavour.tool(4, "restore") == tool


def test_the_backend_choices_are_the_factorys_backends() -> None:
    assert ("auto", *factory.BACKENDS) == BACKEND_CHOICES


def test_an_unknown_backend_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--node=n1", "--backend=ebpf"])
    assert "invalid choice: 'ebpf'" in capsys.readouterr().err


def test_the_agents_redirect_modes_default_to_both_and_refuse_unknown_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["agent", "--node", "n"])
    assert args.redirect_modes == ("inpod", "node")
    args = build_parser().parse_args(["agent", "--node", "n", "--redirect-modes", "inpod"])
    assert args.redirect_modes == ("inpod",)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--node", "n", "--redirect-modes", "inpod,sidecar"])
    assert "redirect modes are inpod and node, not sidecar" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "server"),
    [
        (
            {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            "https://10.96.0.1:443",
        ),
        (
            {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"},
            "https://[fd00::1]:6443",
        ),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None),
        ({}, None),
    ],
)
def test_in_a_pod_the_api_server_is_where_the_kubelets_env_says(
    env: dict[str, str], server: str | None
) -> None:
    assert in_cluster_server(env) == server


def test_controller_writes_in_flight_default_and_bound(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["controller"]).max_concurrent_writes == 8
    assert (
        build_parser().parse_args(["controller", "--max-concurrent-writes=2"]).max_concurrent_writes
        == 2
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["controller", "--max-concurrent-writes=0"])  # no writer at all
    assert "at least 1" in capsys.readouterr().err
