"""The local cluster for ambient-cni's demo and tests: a real control plane, simulated nodes
and pods made of network namespaces, a ztunnel stand-in. Not part of the shipped operator."""
