package main

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
)

// requireNbdClients is the environment variable under which the NBD tools'
// absence fails a test instead of skipping it (.ci/run sets it; the same
// as the dataplane's interop tests).
const requireNbdClients = "TANDEM_REQUIRE_NBD_CLIENTS"

// TestQemuMirror: the benchmark's real peer mirrors. A pattern written
// through qemu-storage-daemon's export is in the nbdkit backup's file: at
// once in write-blocking mode (a write completes once the target has it),
// once the job has copied every dirty chunk in background mode.
func TestQemuMirror(t *testing.T) {
	for _, c := range []string{"qemu-storage-daemon", "nbdkit", "nbdcopy"} {
		if _, err := exec.LookPath(c); err != nil {
			if os.Getenv(requireNbdClients) != "" {
				t.Fatalf("%s not installed (%s is set)", c, requireNbdClients)
			}
			t.Skipf("%s not installed", c)
		}
	}
	for _, mode := range []string{mirrorWriteBlocking, mirrorBackground} {
		t.Run(mode, func(t *testing.T) { testQemuMirror(t, mode) })
	}
}

func testQemuMirror(t *testing.T, mode string) {
	b := &bench{work: t.TempDir()}
	t.Cleanup(b.cleanup)
	const size = 16 << 20
	dir := filepath.Join(b.work, "mirror")
	q, err := b.startQemuMirror(dir, size, mode, place{}, place{})
	if err != nil {
		logFiles(t, b.work, "*.log")
		t.Fatal(err)
	}
	pattern := make([]byte, size)
	_, _ = rand.Read(pattern)
	in := filepath.Join(b.work, "pattern")
	if err := os.WriteFile(in, pattern, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nbdcopy", in, q.url()).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy to %s: %v\n%s", q.url(), err, out)
	}
	if mode == mirrorBackground {
		if err := testkit.Wait(30*time.Second, "the background job copied every write", q.drained); err != nil {
			t.Fatal(err)
		}
	}
	if err := q.healthy(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"source.img", "backup.img"} {
		got, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pattern) {
			t.Fatalf("%s differs from what was written through the export", f)
		}
	}
}

func logFiles(t *testing.T, dir, glob string) {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(dir, glob))
	for _, l := range logs {
		out, _ := os.ReadFile(l)
		t.Logf("%s:\n%s", l, out)
	}
}
