"""Numbers ztunnel and Istio's node agent agree on (reference section 2)."""

from __future__ import annotations

from typing import Final, Literal, get_args

from ambient_cni.api.models import Backend

Family = Literal[4, 6]

ZTUNNEL_MARK: Final = 0x539  # 1337: every ztunnel socket carries it
MARK_MASK: Final = 0xFFF
CONN_MARK: Final = 0x111
ROUTE_TABLE: Final = 100
RULE_PRIORITY: Final = 32764

OUTBOUND_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
HBONE_PORT: Final = 15008
DNS_PORT: Final = 15053

PROBE_SOURCE: Final[dict[Family, str]] = {
    4: "169.254.7.127",
    6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
}
LOOPBACK: Final[dict[Family, str]] = {4: "127.0.0.1/32", 6: "::1/128"}
PROBE_IPSET: Final[dict[Family, str]] = {4: "istio-inpod-probes-v4", 6: "istio-inpod-probes-v6"}

PREROUTING_CHAIN: Final = "ISTIO_PRERT"
OUTPUT_CHAIN: Final = "ISTIO_OUTPUT"
POSTROUTING_CHAIN: Final = "ISTIO_POSTRT"

# The agent's --backend choices: auto follows what the node's rules already use; the others
# are the backends of dataplane/factory.py (a unit test keeps the two lists equal).
BACKEND_CHOICES = ("auto", *get_args(Backend))
