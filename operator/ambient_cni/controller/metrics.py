"""Prometheus metrics of the controller."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SPEC_WRITES = Counter(
    "ambient_cni_controller_spec_writes_total",
    "AmbientNodeConfig writes by the controller",
    ["operation"],  # create | patch
)
WRITE_ERRORS = Counter(
    "ambient_cni_controller_spec_write_errors_total",
    "AmbientNodeConfig writes that failed (and will be retried)",
    ["reason"],
)
COALESCED_EVENTS = Counter(
    "ambient_cni_controller_coalesced_events_total",
    "Watch events folded into a node reconcile that was already pending",
)
INDEX_OBJECTS = Gauge(
    "ambient_cni_controller_index_objects",
    "Objects in the controller's in-memory index",
    ["kind"],
)
RECONCILE_SECONDS = Histogram(
    "ambient_cni_controller_reconcile_seconds",
    "From the first event that made a node's spec stale to its spec being written or confirmed",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
POD_WARNINGS = Counter(
    "ambient_cni_controller_pod_warnings_total",
    "Warnings about a pod's annotations (each a log line and an Event on the pod)",
)
ORPHANS = Counter(
    "ambient_cni_controller_orphans_total",
    "AmbientNodeConfigs found without a Node, by what was done",
    ["action"],  # marked | deleted | adopted (its Node appeared)
)
NODE_UNTAINTS = Counter(
    "ambient_cni_controller_node_untaints_total",
    "Nodes the not-ready taint was taken off once their AmbientNodeConfig was Ready",
)
API_SECONDS = Histogram(
    "ambient_cni_controller_api_seconds",
    "How long the API server took to answer the controller's AmbientNodeConfig writes",
    ["operation"],  # create | patch
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WRITES_IN_FLIGHT = Gauge(
    "ambient_cni_controller_spec_writes_in_flight",
    "AmbientNodeConfig writes sent and not yet answered (at most --max-concurrent-writes)",
)
ECHOES = Counter(
    "ambient_cni_controller_spec_echoes_total",
    "AmbientNodeConfig watch events whose spec was already known (the echo of the "
    "controller's own write, or a status change): no re-plan",
)
