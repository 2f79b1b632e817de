package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// Plugin-specific error code (100+): the agent answered and said no.
const errAgentRefused = 100

func logf(format string, args ...any) {
	// stdout carries the result; logs go to stderr, which the runtime keeps.
	fmt.Fprintf(os.Stderr, "istio-cni: "+format+"\n", args...)
}

func newEvent(args *skel.CmdArgs, pod podArgs, prev *current.Result) event {
	ev := event{
		Netns:        args.Netns,
		PodName:      string(pod.K8S_POD_NAME),
		PodNamespace: string(pod.K8S_POD_NAMESPACE),
		PodUID:       string(pod.K8S_POD_UID),
		ContainerID:  args.ContainerID,
	}
	if prev != nil {
		ev.IPs = prev.IPs
	}
	return ev
}

// passThrough answers with the previous result unchanged, in the config's version.
func passThrough(conf *Config, prev *current.Result) error {
	if prev == nil {
		return types.PrintResult(&current.Result{CNIVersion: current.ImplementedSpecVersion}, conf.CNIVersion)
	}
	return types.PrintResult(prev, conf.CNIVersion)
}

// asCNIError turns a failed call into a CNI error whose message names the cause.
func asCNIError(what string, err error) error {
	if errors.Is(err, errUnreachable) {
		return types.NewError(types.ErrTryAgainLater, what+": "+err.Error(), "")
	}
	return types.NewError(errAgentRefused, what+": "+err.Error(), "")
}

// wanted says whether a call concerns the agent at all: a Kubernetes pod, not in
// an excluded namespace, not one of the agent's own pods.
func wanted(conf *Config, pod podArgs) (bool, string) {
	switch {
	case pod.K8S_POD_NAME == "" || pod.K8S_POD_NAMESPACE == "":
		return false, "not a Kubernetes pod"
	case conf.excluded(string(pod.K8S_POD_NAMESPACE)):
		return false, "namespace excluded"
	case conf.isAgentPod(pod):
		return false, "the node agent's own pod"
	}
	return true, ""
}

// parse reads what every command needs: the config (with prevResult) and the pod.
func parse(args *skel.CmdArgs) (*Config, *current.Result, podArgs, error) {
	conf, prev, err := parseConfig(args.StdinData)
	if err != nil {
		return nil, nil, podArgs{}, err
	}
	pod, err := parseArgs(args.Args)
	return conf, prev, pod, err
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, prev, pod, err := parse(args)
	if err != nil {
		return err
	}
	if ok, why := wanted(conf, pod); !ok {
		logf("ADD %s/%s: passed through (%s)", pod.K8S_POD_NAMESPACE, pod.K8S_POD_NAME, why)
		return passThrough(conf, prev)
	}
	if err := post(conf.socket(), "/cmdadd", conf.timeout(), newEvent(args, pod, prev)); err != nil {
		what := fmt.Sprintf("istio-cni ADD for pod %s/%s", pod.K8S_POD_NAMESPACE, pod.K8S_POD_NAME)
		return asCNIError(what, err)
	}
	return passThrough(conf, prev)
}

// cmdDel tells the agent the sandbox is gone and never fails: DEL must succeed
// when things are already gone, and the agent also learns it from the API.
func cmdDel(args *skel.CmdArgs) error {
	conf, prev, pod, err := parse(args)
	if err != nil {
		logf("DEL %s: %v (ignored)", args.ContainerID, err)
		return nil
	}
	if ok, _ := wanted(conf, pod); !ok {
		return nil
	}
	if err := post(conf.socket(), "/cmddel", conf.timeout(), newEvent(args, pod, prev)); err != nil {
		logf("DEL %s/%s: %v (ignored)", pod.K8S_POD_NAMESPACE, pod.K8S_POD_NAME, err)
	}
	return nil
}

// cmdCheck asks the agent whether the pod is as it should be.
func cmdCheck(args *skel.CmdArgs) error {
	conf, prev, pod, err := parse(args)
	if err != nil {
		return err
	}
	if ok, _ := wanted(conf, pod); !ok {
		return nil
	}
	if err := post(conf.socket(), "/cmdcheck", conf.timeout(), newEvent(args, pod, prev)); err != nil {
		what := fmt.Sprintf("istio-cni CHECK for pod %s/%s", pod.K8S_POD_NAMESPACE, pod.K8S_POD_NAME)
		return asCNIError(what, err)
	}
	return nil
}
