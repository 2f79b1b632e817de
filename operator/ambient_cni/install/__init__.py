"""install-cni: puts the istio-cni plugin into the node's CNI configuration and keeps it there."""
