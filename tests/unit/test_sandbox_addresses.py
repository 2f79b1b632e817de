"""Addresses of either family as the sandbox's echo server and cluster helpers give them."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from ambient_cni_sandbox.cluster import pod_ip, pod_ips
from ambient_cni_sandbox.echo import DualStackServer, make_server, plain_ip


@pytest.mark.parametrize(
    ("seen", "plain"),
    [
        ("::ffff:10.244.0.2", "10.244.0.2"),
        ("10.244.0.2", "10.244.0.2"),
        ("fd00:10:244::2", "fd00:10:244::2"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
    ],
)
def test_an_ipv4_mapped_peer_is_shown_as_ipv4(seen: str, plain: str) -> None:
    assert plain_ip(seen) == plain


@pytest.fixture
def dual_stack_echo() -> Iterator[ThreadingHTTPServer]:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no IPv6 on this machine")
    server = make_server("", 0)
    assert isinstance(server, DualStackServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(host: str, port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/x")
        reply: dict[str, Any] = json.loads(conn.getresponse().read())
        return reply
    finally:
        conn.close()


@pytest.mark.parametrize("client", ["127.0.0.1", "::1"])
def test_one_socket_answers_both_families_with_plain_addresses(
    dual_stack_echo: ThreadingHTTPServer, client: str
) -> None:
    port = dual_stack_echo.server_address[1]
    reply = get(client, port)
    assert (reply["client_ip"], reply["local_ip"], reply["local_port"]) == (client, client, port)
    # "{ip}:{port}" for either family, unbracketed: the port follows the last colon.
    assert reply["client"] == f"{client}:{reply['client_port']}"
    assert reply["local"].rsplit(":", 1) == [client, str(port)]
    assert reply["path"] == "/x"


def test_an_ipv4_bind_address_listens_on_ipv4_alone() -> None:
    server = make_server("127.0.0.1", 0)
    try:
        assert server.address_family == socket.AF_INET
    finally:
        server.server_close()


def test_pod_ips_lists_every_family_and_pod_ip_picks_one() -> None:
    pod = {
        "metadata": {"name": "web"},
        "status": {
            "podIP": "10.244.0.2",
            "podIPs": [{"ip": "10.244.0.2"}, {"ip": "fd00:10:244::2"}],
        },
    }
    assert pod_ips(pod) == ["10.244.0.2", "fd00:10:244::2"]
    assert (pod_ip(pod), pod_ip(pod, family=4), pod_ip(pod, family=6)) == (
        "10.244.0.2",
        "10.244.0.2",
        "fd00:10:244::2",
    )
    single = {"metadata": {"name": "old"}, "status": {"podIP": "10.244.0.3"}}
    assert pod_ips(single) == ["10.244.0.3"]
    with pytest.raises(KeyError, match="no IPv6"):
        pod_ip(single, family=6)
