package agent_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestVolumeClientsFence: a volume's client restriction (Spec.Clients)
// refuses other clients at the handshake, fails the requests of a client
// whose node was removed with EPERM, is reported in the status, and
// survives a restart; a damaged record admits nobody.
func TestVolumeClientsFence(t *testing.T) {
	dir := t.TempDir()
	r := startAgent(t, agent.Options{Config: agent.Config{DataDir: dir, Token: "tok"}})
	ctx := context.Background()
	put := func(c *agentapi.Clients) agentapi.Status {
		t.Helper()
		st, err := r.c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10,
			Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Initialize: true, Mode: agentapi.ModeAsync, Clients: c}})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	here := &agentapi.Clients{Nodes: []string{"node-x"}, Addresses: []string{"127.0.0.1"}}
	if st := put(here); !st.Clients.Equal(here) {
		t.Fatalf("status clients %+v, want %+v", st.Clients, here)
	}
	c, err := nbd.Dial(ctx, r.ep.NBD, "ns/vol")
	if err != nil {
		t.Fatalf("an admitted client: %v", err)
	}
	defer c.Close()
	if err := c.WriteAt(ctx, []byte("x"), 0, false); err != nil {
		t.Fatal(err)
	}

	// The volume moves to another node's Pod: this client is fenced.
	put(&agentapi.Clients{Nodes: []string{"node-y"}, Addresses: []string{"198.18.0.99"}})
	if err := c.WriteAt(ctx, []byte("y"), 0, false); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write of a fenced client: %v, want EPERM", err)
	}
	if _, err := nbd.Dial(ctx, r.ep.NBD, "ns/vol"); err == nil || !strings.Contains(err.Error(), "the volume is used from node-y now") {
		t.Fatalf("a fenced client's new connection: %v, want a refusal naming node-y", err)
	}

	// Across a restart the fence holds, before any word from a controller.
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	rb := startAgent(t, agent.Options{Config: agent.Config{DataDir: dir, Token: "tok"}})
	st, err := rb.c.Get(ctx, "ns", "vol")
	if err != nil || st.Clients == nil || len(st.Clients.Nodes) != 1 || st.Clients.Nodes[0] != "node-y" {
		t.Fatalf("after a restart the status reports clients %+v (%v), want node-y", st.Clients, err)
	}
	if err := rb.stop(); err != nil {
		t.Fatal(err)
	}

	// A damaged record admits nobody and reports so.
	rec := filepath.Join(agentapi.ReplicaDir(dir, "ns", "vol"), "clients.json")
	if err := os.WriteFile(rec, []byte(`{"version":1,"nodes":["node-x"],"addresses":["127.0.0.1"],"crc32c":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	r2 := startAgent(t, agent.Options{Config: agent.Config{DataDir: dir, Token: "tok"}})
	st2, err := r2.c.Get(ctx, "ns", "vol")
	if err != nil || st2.Clients == nil || len(st2.Clients.Addresses) != 0 {
		t.Fatalf("a damaged record reports %+v (%v), want a restriction admitting nobody", st2.Clients, err)
	}
	// Unrestricted again once the controller says so.
	if _, err := r2.c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10,
		Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Mode: agentapi.ModeAsync}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(rec); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the record of a lifted restriction: %v, want it removed", err)
	}
}
