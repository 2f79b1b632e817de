// The istio-cni CNI plugin: a thin chained plugin that hands each pod's ADD to
// the node agent and waits for its answer. Every decision is the agent's.
module ambient-cni.dev/cni-plugin

go 1.24

require github.com/containernetworking/cni v1.3.0

require (
	github.com/vishvananda/netns v0.0.4 // indirect
	golang.org/x/sys v0.23.0 // indirect
)
