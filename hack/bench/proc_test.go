package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
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
