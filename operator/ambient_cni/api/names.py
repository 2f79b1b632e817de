"""Labels, annotations and API names shared by the controller, the agent and Istio."""

from __future__ import annotations

from typing import Final

# -- the AmbientNodeConfig resource ---------------------------------------------------
GROUP: Final = "cni.ambient.dev"
VERSION: Final = "v1alpha1"
KIND: Final = "AmbientNodeConfig"
PLURAL: Final = "ambientnodeconfigs"
SINGULAR: Final = "ambientnodeconfig"
SHORT_NAME: Final = "anc"
CATEGORY: Final = "ambient"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
# On an AmbientNodeConfig whose Node does not exist (the controller deletes it after a grace
# period); `kubectl wait ... -l '!cni.ambient.dev/orphaned'` leaves such objects out.
ORPHANED_LABEL: Final = f"{GROUP}/orphaned"

# Events about a cluster-scoped object (an AmbientNodeConfig) live here: the API server
# refuses them in any other namespace.
CLUSTER_EVENTS_NAMESPACE: Final = "default"

# The controller's leader-election Lease (in its own namespace) says who leads and, in these
# annotations, what that replica runs with: `kubectl ambient` reads them to decide as it does.
CONTROLLER_LEASE: Final = "ambient-cni-controller"
CONTROLLER_VERSION_ANNOTATION: Final = f"{GROUP}/version"
CONTROLLER_EXCLUDED_NAMESPACES_ANNOTATION: Final = f"{GROUP}/excluded-namespaces"
CONTROLLER_SYSTEM_NAMESPACE_ANNOTATION: Final = f"{GROUP}/system-namespace"
CONTROLLER_REDIRECT_MODE_ANNOTATION: Final = f"{GROUP}/redirect-mode"

# -- Istio's selection labels and annotations (reference section 1) -------------------
DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT: Final = "ambient"
DATAPLANE_MODE_NONE: Final = "none"
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
REDIRECTION_DISABLED: Final = "disabled"
REDIRECTION_ENABLED: Final = "enabled"
REDIRECTION_PENDING: Final = "pending"
SIDECAR_STATUS_ANNOTATION: Final = "sidecar.istio.io/status"
DNS_CAPTURE_ANNOTATION: Final = "ambient.istio.io/dns-capture"
BYPASS_INBOUND_CAPTURE_ANNOTATION: Final = "ambient.istio.io/bypass-inbound-capture"
REROUTE_VIRTUAL_INTERFACES_ANNOTATION: Final = "istio.io/reroute-virtual-interfaces"

ZTUNNEL_APP_LABEL: Final = "app"
ZTUNNEL_APP: Final = "ztunnel"
DEFAULT_SYSTEM_NAMESPACE: Final = "istio-system"
DEFAULT_EXCLUDED_NAMESPACES: Final = ("kube-system",)

# The node agent's own pods (the chart's DaemonSet, labelled as Istio labels its
# istio-cni-node pods) are never enrolled.
NODE_AGENT_LABEL: Final = "k8s-app"
NODE_AGENT_APP: Final = "istio-cni-node"

# Nodes may register with this taint (NoSchedule); the controller takes it off once the
# node's AmbientNodeConfig is Ready, when told to (`--untaint-nodes`), as istiod does.
NOT_READY_TAINT_KEY: Final = "cni.istio.io/not-ready"
