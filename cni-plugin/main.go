// Command istio-cni is a chained CNI plugin. It decides nothing: on ADD it
// hands the pod (identity, netns, container ID and the IPs the plugins before
// it assigned) to the node agent over a Unix socket and waits, bounded, for the
// agent's answer, so a pod that should be redirected does not start until it
// is. It is written in Go because the container runtime runs it on the host,
// which may have no Python.
package main

import (
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

func main() {
	failure := skel.PluginMainFuncsWithError(
		skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck},
		// 0.1.0 and 0.2.0 have no prevResult to pass on.
		version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"),
		"CNI plugin istio-cni (ambient-cni)",
	)
	if failure != nil {
		// The CNI error result goes to stdout, where the runtime reads it.
		if err := failure.Print(); err != nil {
			logf("cannot print the error result: %v", err)
		}
		os.Exit(1)
	}
}
