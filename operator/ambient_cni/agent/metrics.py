"""Prometheus metrics of the node agent."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POD_RECONCILES = Counter(
    "ambient_cni_agent_pod_reconciles_total",
    "Pod reconcile passes, by the state they left the pod in",
    ["state"],
)
WORKLOADS = Gauge("ambient_cni_agent_workloads", "Workloads on this node by state", ["state"])
ZTUNNEL_CONNECTED = Gauge("ambient_cni_agent_ztunnel_connected", "1 while a ztunnel is connected")
POD_RECONCILE_SECONDS = Histogram(
    "ambient_cni_agent_pod_reconcile_seconds",
    "Time of one pod reconcile pass (kernel, ZDS, ipset, annotation)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STATUS_WRITES = Counter("ambient_cni_agent_status_writes_total", "AmbientNodeConfig status patches")
WATCH_OBJECTS = Counter(
    "ambient_cni_agent_watch_objects_total",
    "AmbientNodeConfig objects received from the API server (list items and watch events)",
)
WATCH_BYTES = Counter(
    "ambient_cni_agent_watch_bytes_total",
    "Bytes of AmbientNodeConfig lists and watch events received from the API server",
)
REPAIRS = Counter(
    "ambient_cni_agent_repairs_total",
    "Redirection found changed behind the agent's back and put right, by what was changed",
    ["kind"],  # rules | routing | host-rules
)
KERNEL_CHANGES = Counter(
    "ambient_cni_agent_kernel_changes_total",
    "Changes the kernel announced in a watched namespace (not the agent's own), each re-checked",
    ["where"],  # pod | host
)
DRIFT_ANNOUNCED = Gauge(
    "ambient_cni_agent_drift_announced",
    "1: the backend's kernel announces rule changes (re-checked as they come, every pod "
    "every --resync-interval); 0: every pod polled every --drift-interval",
)
WATCHED_NAMESPACES = Gauge(
    "ambient_cni_agent_watched_namespaces",
    "Namespaces whose rule changes the kernel announces to the agent (pods and the node)",
)
OBJECT_MISSING = Gauge(
    "ambient_cni_agent_object_missing",
    "1 while this node's AmbientNodeConfig does not exist (every pod is held as it is)",
)
OBJECT_MISSING_SECONDS = Counter(
    "ambient_cni_agent_object_missing_seconds_total",
    "Seconds this node's AmbientNodeConfig did not exist, counted when it comes back",
)
