// Command cni-run runs a node's CNI network for one pod sandbox the way a
// container runtime does, through libcni: the lexicographically first config
// in the conf dir (a single .conf becomes a one-plugin list), its plugins in
// order for ADD and in reverse for DEL, results cached per sandbox so DEL and
// CHECK get the ADD result as prevResult. It prints the ADD result on stdout;
// on failure the plugin's own message goes to stderr and the exit code is 1.
//
// Written here rather than using cnitool because cnitool picks the network by
// name, derives the container ID from the netns path and caches in
// /var/lib/cni; a runtime picks by position and the sandbox keeps its state in
// its own directory.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func firstNetwork(confDir string) (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(confDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, err
	}
	sort.Strings(files)
	for _, file := range files {
		if strings.HasSuffix(file, ".conflist") {
			list, err := libcni.ConfListFromFile(file)
			if err != nil {
				fmt.Fprintf(os.Stderr, "cni-run: skipping %s: %v\n", file, err)
				continue
			}
			return list, nil
		}
		conf, err := libcni.ConfFromFile(file)
		if err != nil {
			fmt.Fprintf(os.Stderr, "cni-run: skipping %s: %v\n", file, err)
			continue
		}
		list, err := libcni.ConfListFromConf(conf)
		if err != nil {
			fmt.Fprintf(os.Stderr, "cni-run: skipping %s: %v\n", file, err)
			continue
		}
		return list, nil
	}
	return nil, fmt.Errorf("no network configuration in %s", confDir)
}

func parseArgs(raw string) [][2]string {
	var pairs [][2]string
	for _, item := range strings.Split(raw, ";") {
		if key, value, ok := strings.Cut(item, "="); ok {
			pairs = append(pairs, [2]string{key, value})
		}
	}
	return pairs
}

func main() {
	confDir := flag.String("conf-dir", "/etc/cni/net.d", "the node's CNI config dir")
	binDir := flag.String("bin-dir", "/opt/cni/bin", "where the plugin binaries are")
	cacheDir := flag.String("cache-dir", "/var/lib/cni", "where results are cached")
	netns := flag.String("netns", "", "the sandbox's network namespace path")
	containerID := flag.String("container-id", "", "the sandbox's ID")
	ifName := flag.String("ifname", "eth0", "the interface name in the sandbox")
	args := flag.String("args", "", "CNI_ARGS, K=V pairs joined by ;")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: cni-run [flags] add|del|check\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 || *containerID == "" {
		flag.Usage()
		os.Exit(2)
	}
	list, err := firstNetwork(*confDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		os.Exit(1)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{*binDir}, *cacheDir, nil)
	rt := &libcni.RuntimeConf{
		ContainerID: *containerID,
		NetNS:       *netns,
		IfName:      *ifName,
		Args:        parseArgs(*args),
	}
	ctx := context.Background()
	switch flag.Arg(0) {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err == nil {
			err = result.Print()
		}
		exit(err)
	case "del":
		exit(cni.DelNetworkList(ctx, list, rt))
	case "check":
		exit(cni.CheckNetworkList(ctx, list, rt))
	default:
		flag.Usage()
		os.Exit(2)
	}
}

func exit(err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		os.Exit(1)
	}
}
