package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestNbdkitSocketActivation: the benchmark's nbdkit baseline serves on the
// socket the harness opened for it (socket activation), not on a port
// found free and bound later.
func TestNbdkitSocketActivation(t *testing.T) {
	if _, err := exec.LookPath("nbdkit"); err != nil {
		t.Skip("nbdkit not installed")
	}
	b := &bench{work: t.TempDir()}
	n, err := b.startNbdkit(filepath.Join(b.work, "disk"), 1<<20)
	if n != nil {
		defer n.stop()
	}
	if err != nil {
		logs, _ := filepath.Glob(filepath.Join(b.work, "nbdkit-*.log"))
		for _, l := range logs {
			out, _ := os.ReadFile(l)
			t.Logf("%s:\n%s", l, out)
		}
		t.Fatal(err)
	}
	if !processAlive(n.exited) {
		t.Fatal("nbdkit exited")
	}
}

// TestPairsServe: the harness's pairs (one backup, and a writer of three
// backups) accept writes and reach sync. Before the harness initialized its
// new primaries, the agents refused them the writer role (a new replica
// holds no data of the pair), and every fio section failed.
func TestPairsServe(t *testing.T) {
	b := &bench{work: t.TempDir()}
	withAgents(t, b)
	ag := []*agentProc{b.newAgent("node-a"), b.newAgent("node-b"), b.newAgent("node-c"), b.newAgent("node-d")}
	for _, a := range ag {
		if err := a.start(); err != nil {
			t.Fatal(err)
		}
	}
	const size = 4 << 20
	if err := pair(ag[0], ag[1], "two", size, agentapi.ModeSync, 1); err != nil {
		t.Fatal(err)
	}
	if err := members(ag[0], ag[1:], "four", size, agentapi.ModeAsync, 1); err != nil {
		t.Fatal(err)
	}
	if err := testkit.Wait(30*time.Second, "pair in sync", inSync(ag[0], ag[1], "two")); err != nil {
		t.Fatal(err)
	}
	if err := testkit.Wait(30*time.Second, "three backups in sync", allInSync(ag[0], ag[1:], "four")); err != nil {
		t.Fatal(err)
	}
	for _, vol := range []string{"two", "four"} {
		if st, err := ag[0].status(vol); err != nil || !st.Writable {
			t.Fatalf("%s: writer status %+v, %v", vol, st, err)
		}
	}
}

// withAgents gives b a token file and an agent binary built from this
// tree in its work directory, and cleans b up after the test.
func withAgents(t *testing.T, b *bench) {
	t.Helper()
	b.tokenFile = filepath.Join(b.work, "token")
	if err := os.WriteFile(b.tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	b.agentBin = filepath.Join(b.work, "agent")
	if out, err := exec.Command("go", "build", "-o", b.agentBin, "../../cmd/agent").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Cleanup(b.cleanup)
}
