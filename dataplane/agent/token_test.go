package agent_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/internal/testkit"
	agenttoken "github.com/tandem-storage/tandem/internal/token"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestTokenRotation (issue #18): the shared token is rotated through the
// token files of two replicating agents, neither of which restarts for it:
// both accept the new token once the file lists it, the writer presents the
// new one when its link reconnects, and the old one is refused once the
// files drop it. The backup's restart below only forces the link to
// reconnect.
func TestTokenRotation(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{"a": filepath.Join(dir, "token-a"), "b": filepath.Join(dir, "token-b")}
	write := func(node, content string) {
		t.Helper()
		tmp := files[node] + ".tmp"
		if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, files[node]); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	source := func(node string) *agenttoken.Source {
		t.Helper()
		s, err := agenttoken.FromFile(files[node])
		if err != nil {
			t.Fatal(err)
		}
		go s.Watch(ctx, 10*time.Millisecond, logr.Discard())
		return s
	}
	write("a", "old\n")
	write("b", "old\n")
	bDir := t.TempDir()
	a := startAgent(t, agent.Options{Config: agent.Config{Node: "node-a", Tokens: source("a")}})
	b := startAgent(t, agent.Options{Config: agent.Config{Node: "node-b", DataDir: bDir, Tokens: source("b")}})

	// answers: the control API's reply to tok (nil: accepted).
	answers := func(r *runningAgent, tok string) error {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := agentapi.NewClient(r.ep.Control, tok).List(c)
		return err
	}
	accepts := func(what string, r *runningAgent, tok string, want bool) {
		t.Helper()
		testkit.Eventually(t, 5*time.Second, what, func() (bool, string) {
			err := answers(r, tok)
			return (err == nil) == want, fmt.Sprint(err)
		}, testkit.Every(10*time.Millisecond))
	}
	put := func(r *runningAgent, tok string, spec agentapi.Spec) {
		t.Helper()
		spec.Mode, spec.PairUID = agentapi.ModeAsync, "uid-1"
		if _, err := agentapi.NewClient(r.ep.Control, tok).Put(context.Background(), "ns", "vol",
			agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10, Spec: spec}); err != nil {
			t.Fatal(err)
		}
	}
	inSync := func(what string) {
		t.Helper()
		testkit.Eventually(t, 20*time.Second, what, func() (bool, string) {
			for _, tok := range []string{"old", "new"} {
				st, err := agentapi.NewClient(a.ep.Control, tok).Get(context.Background(), "ns", "vol")
				if err == nil {
					return st.PeerConnected && st.OutOfSyncRegions == 0, fmt.Sprintf("%+v", st)
				}
			}
			return false, "node-a refuses both tokens"
		}, testkit.Every(20*time.Millisecond))
	}
	put(b, "old", agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a"})
	put(a, "old", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication, Initialize: true})
	inSync("replicating with the old token")
	accepts("node-a refuses the new token at first", a, "new", false)

	// 1. Both accept the new token; both still present the old one.
	write("a", "old\nnew\n")
	write("b", "old\nnew\n")
	accepts("node-a accepts the new token", a, "new", true)
	accepts("node-b accepts the new token", b, "new", true)
	accepts("node-a still accepts the old one", a, "old", true)
	// 2. Both present the new token.
	write("a", "new\nold\n")
	write("b", "new\nold\n")
	// 3. The old token is gone.
	write("a", "new\n")
	write("b", "new\n")
	accepts("node-a refuses the old token", a, "old", false)
	accepts("node-b refuses the old token", b, "old", false)
	inSync("still replicating after the rotation")

	// The link reconnects (node-b restarts, reading its file as its
	// process would): node-a, never restarted, presents the new token, and
	// node-b admits it.
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "node-a without its link", func() (bool, string) {
		st, err := agentapi.NewClient(a.ep.Control, "new").Get(context.Background(), "ns", "vol")
		return err == nil && !st.PeerConnected, fmt.Sprintf("%+v %v", st, err)
	}, testkit.Every(20*time.Millisecond))
	b = startAgent(t, agent.Options{Config: agent.Config{Node: "node-b", DataDir: bDir, Tokens: source("b")}})
	put(b, "new", agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a"})
	put(a, "new", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication})
	inSync("replicating again over a link opened with the new token")
}
