package agent_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// handoverPair starts two agents on one fake API server, node-a the writer of
// ns/vol at epoch 1 streaming to node-b, and waits until they are in sync.
func handoverPair(t *testing.T, timeout time.Duration) (a, b *runningAgent, cs *fake.Clientset) {
	t.Helper()
	cs = fake.NewClientset()
	opts := func(node string) agent.Options {
		return agent.Options{Config: agent.Config{Node: node, Token: "tok"}, Leases: cs.CoordinationV1(),
			Namespace: "tandem-system", HandoverTimeout: timeout, HandoverClientGrace: 200 * time.Millisecond}
	}
	a, b = startAgent(t, opts("node-a")), startAgent(t, opts("node-b"))
	l, err := authority.NewLease("tandem-system", authority.Pair{Namespace: "ns", Name: "vol", UID: "uid-1"}, "node-a", 1, 6*time.Second, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoordinationV1().Leases("tandem-system").Create(context.Background(), l, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	put := func(r *runningAgent, spec agentapi.Spec) {
		t.Helper()
		spec.Mode, spec.PairUID = agentapi.ModeAsync, "uid-1"
		if _, err := r.c.Put(context.Background(), "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10, Spec: spec}); err != nil {
			t.Fatal(err)
		}
	}
	put(b, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a", Initialize: true})
	put(a, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication, Initialize: true})
	testkit.Eventually(t, 10*time.Second, "node-a streaming to node-b", func() (bool, error) {
		st, err := a.c.Get(context.Background(), "ns", "vol")
		return err == nil && st.PeerConnected && st.Writable, err
	})
	return a, b, cs
}

func readyz(t *testing.T, r *runningAgent) (int, string) {
	t.Helper()
	resp, err := http.Get(r.ep.Control + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// TestStoppingAgentHandsOver: an agent asked to stop while it is a pair's
// writer reports Stopping (and is not ready) and does not shut down until
// its writer role has moved to the peer; then it stops at once.
func TestStoppingAgentHandsOver(t *testing.T) {
	testkit.SkipIfShort(t, "two agents and a handover")
	a, b, cs := handoverPair(t, 20*time.Second)
	if code, body := readyz(t, a); code != http.StatusOK {
		t.Fatalf("node-a /readyz before stopping: %d %s", code, body)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- a.stop() }()
	testkit.Eventually(t, 5*time.Second, "node-a to report Stopping", func() (bool, error) {
		st, err := a.c.Get(context.Background(), "ns", "vol")
		return err == nil && st.Stopping, err
	})
	if code, body := readyz(t, a); code != http.StatusServiceUnavailable || body != "stopping" {
		t.Fatalf("node-a /readyz while stopping: %d %q, want 503 \"stopping\"", code, body)
	}
	select {
	case err := <-stopped:
		t.Fatalf("node-a stopped (%v) while still the writer of ns/vol", err)
	case <-time.After(500 * time.Millisecond):
	}
	// What the controller does for a stopping writer: authority to node-b
	// at epoch 2, node-a backup first, then node-b the writer.
	leases := cs.CoordinationV1().Leases("tandem-system")
	name, err := authority.LeaseName("uid-1")
	if err != nil {
		t.Fatal(err)
	}
	l, err := leases.Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	authority.Move(l, "node-b", 2, false, 6*time.Second, time.Now())
	if _, err := leases.Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := a.c.Put(context.Background(), "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10,
		Spec: agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 2, PeerNode: "node-b", Mode: agentapi.ModeAsync, PairUID: "uid-1"}}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("node-a: %v", err)
		}
		t.Logf("node-a stopped %v after handing over", time.Since(start).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("node-a did not stop within 10s of handing over its writer role")
	}
	if !strings.Contains(a.log.String(), "Writer roles handed over") {
		t.Errorf("node-a's log does not say it handed over:\n%s", tail(a.log.String(), 20))
	}
	if st, err := b.c.Get(context.Background(), "ns", "vol"); err != nil || st.Stopping {
		t.Errorf("node-b (not stopping) reports %+v (%v)", st, err)
	}
}

// TestStoppingAgentHandoverTimeout: when the writer role does not move in
// time, the agent stops anyway (the pair fails over as for a lost node).
func TestStoppingAgentHandoverTimeout(t *testing.T) {
	testkit.SkipIfShort(t, "two agents")
	a, _, _ := handoverPair(t, 400*time.Millisecond)
	start := time.Now()
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Errorf("node-a stopped after %v, before its 400ms handover timeout", d)
	}
	if !strings.Contains(a.log.String(), "Stopping without handing over") {
		t.Errorf("node-a's log does not say it stopped without handing over:\n%s", tail(a.log.String(), 20))
	}
}

// TestStoppingAgentWithoutPeerDoesNotWait: a writer whose peer is away has
// nobody to hand over to, and stops at once.
func TestStoppingAgentWithoutPeerDoesNotWait(t *testing.T) {
	cs := fake.NewClientset()
	a := startAgent(t, agent.Options{Config: agent.Config{Token: "tok"}, Leases: cs.CoordinationV1(), Namespace: "tandem-system"})
	if _, err := a.c.Put(context.Background(), "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10,
		Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Initialize: true, Mode: agentapi.ModeAsync, PairUID: "uid-1", PeerNode: "node-b", PeerAddress: testkit.RefusingAddr(t)}}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a writer without a peer took %v to stop", d)
	}
	if !strings.Contains(a.log.String(), "no writer role to hand over") {
		t.Errorf("log:\n%s", tail(a.log.String(), 20))
	}
}

// TestReadyzCatchingUp: a backup that is being copied to (a new replica
// getting its full copy, slowly) is not ready until the copy is done.
func TestReadyzCatchingUp(t *testing.T) {
	testkit.SkipIfShort(t, "two agents and a copy")
	a := startAgent(t, agent.Options{Config: agent.Config{Node: "node-a", Token: "tok"}})
	b := startAgent(t, agent.Options{Config: agent.Config{Node: "node-b", Token: "tok"}})
	put := func(r *runningAgent, spec agentapi.Spec) {
		t.Helper()
		spec.Mode, spec.PairUID = agentapi.ModeAsync, "uid-1"
		if _, err := r.c.Put(context.Background(), "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10, Spec: spec}); err != nil {
			t.Fatal(err)
		}
	}
	if code, body := readyz(t, b); code != http.StatusOK {
		t.Fatalf("node-b without volumes: /readyz %d %s", code, body)
	}
	// node-a holds 4 MiB of data; node-b is new (no Initialize): it needs a
	// full copy, at 1 MiB/s.
	put(a, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication, Initialize: true, MaxBytesPerSecond: 1 << 20})
	qemuIO(t, "nbd://"+a.ep.NBD+"/ns/vol", "write -P 0xab 0 4M")
	put(b, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a"})
	testkit.Eventually(t, 10*time.Second, "node-b catching up (not ready)", func() (bool, error) {
		code, body := readyz(t, b)
		return code == http.StatusServiceUnavailable && strings.HasPrefix(body, "catching up: ns/vol"), nil
	})
	testkit.Eventually(t, 30*time.Second, "node-b ready once the copy is done", func() (bool, error) {
		code, _ := readyz(t, b)
		return code == http.StatusOK, nil
	})
	st, err := b.c.Get(context.Background(), "ns", "vol")
	if err != nil || st.DataState != agentapi.UpToDate {
		t.Fatalf("node-b ready but %+v (%v)", st, err)
	}
}
