"""The API server where pods and nodes can reach it: a TCP relay listening on the
underlay's API endpoint (inside the sandbox's underlay namespace) that connects, from this
machine's namespace, to the loopback API server. TLS passes through untouched: a pod
verifies the API server's own certificate (it names the endpoint) and authenticates with
its own token, as it would through a Service.

Why by hand: the listening socket is made in one network namespace and the connections in
another; no relay tool on the machine opens sockets in two namespaces.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from pathlib import Path

from ambient_cni.netns import run_in_netns

from .state import load_state
from .topology import API_ENDPOINT_IPS, API_ENDPOINT_PORT
from .ztunnel import relay

log = logging.getLogger("apiproxy")


def _listen(address: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, API_ENDPOINT_PORT))
    server.listen(128)
    return server


def _relay(client: socket.socket, target: tuple[str, int]) -> None:
    upstream = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET)
    try:
        relay(client, upstream, target, timeout=10)
    except OSError as exc:
        log.warning("cannot reach the API server at %s:%d: %s", *target, exc)
    finally:
        client.close()


def _serve(server: socket.socket, target: tuple[str, int]) -> None:
    while True:
        client, _ = server.accept()
        threading.Thread(target=_relay, args=(client, target), daemon=True).start()


def main(sandbox: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    state = load_state(sandbox)
    if state is None:
        raise SystemExit(f"sandbox {sandbox!r} has no state file; is it up?")
    host, port = _apiserver(state.kubeconfig)
    versions = sorted({v for node in state.topology.nodes for v in node.ip_versions})
    servers = [
        run_in_netns(state.topology.underlay_netns, functools.partial(_listen, API_ENDPOINT_IPS[v]))
        for v in versions
    ]
    for server in servers[1:]:
        threading.Thread(target=_serve, args=(server, (host, port)), daemon=True).start()
    log.info(
        "relaying %s port %d to the API server at %s:%d",
        ", ".join(API_ENDPOINT_IPS[v] for v in versions),
        API_ENDPOINT_PORT,
        host,
        port,
    )
    _serve(servers[0], (host, port))


def _apiserver(kubeconfig: str) -> tuple[str, int]:
    """The loopback API server's address, from the sandbox's own kubeconfig."""
    import yaml  # noqa: PLC0415 - only this process reads it

    config = yaml.safe_load(Path(kubeconfig).read_text())
    server = str(config["clusters"][0]["cluster"]["server"])
    hostport = server.split("://", 1)[1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)
