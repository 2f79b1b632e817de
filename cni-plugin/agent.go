package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
)

// event is what the agent receives: Istio's plugin event (its Go field names,
// no JSON tags, IPs as the CNI result's IPConfig) plus the pod's UID and the
// container ID, so the agent knows the sandbox without asking the API server.
type event struct {
	Netns        string
	PodName      string
	PodNamespace string
	PodUID       string
	ContainerID  string
	IPs          []*current.IPConfig
}

// How much of the agent's answer goes into an error message.
const maxAnswer = 1 << 20

// errUnreachable marks a call that never got an answer: no socket, refused, timed out.
var errUnreachable = errors.New("the node agent did not answer")

// post sends one event to the agent's path and returns nil only on a 200.
func post(socket, path string, timeout time.Duration, body event) error {
	payload, err := json.Marshal(body)
	if err != nil {
		return err
	}
	client := http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		},
	}
	answer, err := client.Post("http://unix"+path, "application/json", bytes.NewReader(payload))
	if err != nil {
		return fmt.Errorf("%w on %s: %v", errUnreachable, socket, err)
	}
	defer answer.Body.Close()
	said, _ := io.ReadAll(io.LimitReader(answer.Body, maxAnswer))
	if answer.StatusCode != http.StatusOK {
		return fmt.Errorf("the node agent refused it (%s): %s", answer.Status, bytes.TrimSpace(said))
	}
	return nil
}
