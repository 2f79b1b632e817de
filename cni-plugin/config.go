package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Defaults follow Istio's plugin: its run dir, its socket name, its 5 s call.
const (
	defaultRunDir      = "/var/run/istio-cni"
	eventSocketName    = "pluginevent.sock"
	defaultTimeout     = 5 * time.Second
	defaultAgentPrefix = "ambient-cni-node-"
)

// Config is this plugin's entry in the conflist, with Istio's key names where
// Istio has the same setting.
type Config struct {
	types.NetConf
	AgentRunDir       string   `json:"cni_agent_run_dir"`
	ExcludeNamespaces []string `json:"exclude_namespaces"`
	// The agent's own pods pass through: they cannot wait for themselves.
	PodNamespace   string  `json:"pod_namespace"`
	AgentPodPrefix string  `json:"agent_pod_prefix"`
	TimeoutSeconds float64 `json:"agent_timeout_seconds"`
}

func (c *Config) socket() string {
	return filepath.Join(c.AgentRunDir, eventSocketName)
}

func (c *Config) timeout() time.Duration {
	if c.TimeoutSeconds <= 0 {
		return defaultTimeout
	}
	return time.Duration(c.TimeoutSeconds * float64(time.Second))
}

func (c *Config) excluded(namespace string) bool {
	for _, ns := range c.ExcludeNamespaces {
		if ns == namespace {
			return true
		}
	}
	return false
}

func (c *Config) isAgentPod(pod podArgs) bool {
	return c.PodNamespace != "" && string(pod.K8S_POD_NAMESPACE) == c.PodNamespace &&
		strings.HasPrefix(string(pod.K8S_POD_NAME), c.AgentPodPrefix)
}

// parseConfig reads stdin's config and, when there is one, the previous
// plugin's result as a current (1.x) result.
func parseConfig(stdin []byte) (*Config, *current.Result, error) {
	conf := Config{AgentRunDir: defaultRunDir, AgentPodPrefix: defaultAgentPrefix}
	if err := json.Unmarshal(stdin, &conf); err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, "cannot parse the istio-cni config", err.Error())
	}
	if conf.RawPrevResult == nil {
		return &conf, nil, nil
	}
	if err := version.ParsePrevResult(&conf.NetConf); err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, "cannot parse prevResult", err.Error())
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, nil, types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf("cannot convert prevResult to CNI %s", current.ImplementedSpecVersion), err.Error())
	}
	return &conf, prev, nil
}

// podArgs are the CNI_ARGS a CRI runtime passes for a Kubernetes pod.
type podArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive // the runtime's names
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
}

func parseArgs(args string) (podArgs, error) {
	pod := podArgs{}
	if err := types.LoadArgs(args, &pod); err != nil {
		return pod, types.NewError(types.ErrInvalidEnvironmentVariables, "cannot parse CNI_ARGS", err.Error())
	}
	return pod, nil
}
