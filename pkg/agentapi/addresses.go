package agentapi

import (
	"encoding/json"
	"fmt"
	"os"
)

// ListenAddresses is what the agent writes to its --addresses-file once it
// serves: the endpoints it advertises, with the ports it was given or, for
// port 0, the ones the kernel chose. Test harnesses start agent processes
// with port 0 and read this back instead of guessing free ports (a port
// found free and released may be taken by anyone before the agent binds
// it).
type ListenAddresses struct {
	// Control is the control API's base URL ("http://host:port").
	Control string `json:"control"`
	// Replication and NBD are "host:port".
	Replication string `json:"replication"`
	NBD         string `json:"nbd"`
	// Pprof is the profiling listener's "host:port", when there is one.
	Pprof string `json:"pprof,omitempty"`
}

// ReadListenAddresses reads an agent's --addresses-file. Until the agent
// has written it the error wraps os.ErrNotExist. The agent replaces the
// file atomically, so a reader never sees half of it.
func ReadListenAddresses(path string) (ListenAddresses, error) {
	var a ListenAddresses
	b, err := os.ReadFile(path)
	if err != nil {
		return a, fmt.Errorf("agent addresses: %w", err)
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("agent addresses in %s: %w", path, err)
	}
	if a.Control == "" || a.Replication == "" || a.NBD == "" {
		return a, fmt.Errorf("agent addresses in %s: incomplete: %s", path, b)
	}
	return a, nil
}
