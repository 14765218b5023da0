package agent_test

// Integration tests: two agent processes on loopback, driven only through
// their control API, carry a volume through PAIR → SWAP → COPY → failback
// with real NBD clients (qemu-io, nbdcopy, nbdinfo), and a crash test
// SIGKILLs a primary during async writes.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/nbd/nbdtest"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

const (
	token   = "integration-token"
	ns      = "apps"
	volName = "db"
	volSize = 256 << 20
	region  = 64 << 10
)

var (
	agentBin  string
	buildOnce sync.Once
	buildErr  error
)

// TestMain removes the agent binary buildAgent compiled (82 MiB with the
// race detector): every run of the package left one in the temporary
// directory before.
func TestMain(m *testing.M) {
	code := m.Run()
	if agentBin != "" {
		_ = os.RemoveAll(filepath.Dir(agentBin))
	}
	os.Exit(code)
}

// buildAgent compiles cmd/agent once, with the race detector when this test
// binary has it.
func buildAgent(t *testing.T) string {
	t.Helper()
	testkit.SkipIfShort(t, "builds cmd/agent and runs agent processes")
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		dir, err := os.MkdirTemp("", "tandem-agent-bin-")
		if err != nil {
			buildErr = err
			return
		}
		agentBin = filepath.Join(dir, "agent")
		args := []string{"build", "-o", agentBin}
		if raceEnabled {
			args = append(args, "-race")
		}
		args = append(args, "./cmd/agent")
		cmd := exec.Command("go", args...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build agent: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return agentBin
}

// proc is an agent process on loopback. Its first start binds ports from
// testkit.ListenRestartable and reads back what it serves from its
// --addresses-file; a restart binds the same ports again, since the peer's
// spec names them.
type proc struct {
	t                   *testing.T
	node, dir           string
	ctrl, repl, nbdAddr string // set by the first start
	cmd                 *exec.Cmd
	exited              chan struct{} // closed when cmd has exited
	exitErr             error         // cmd.Wait's, once exited is closed
	log                 *os.File
	c                   *agent.Client
	// tlsDir, when set, is passed as --tls-dir; the control API is then
	// called with tlsClient.
	tlsDir    string
	tlsClient *tls.Config
}

func newProc(t *testing.T, node string) *proc {
	p := &proc{t: t, node: node, dir: t.TempDir()}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(p.dir, "agent.log"))
			t.Logf("---- %s agent log (tail) ----\n%s", node, tail(string(b), 60))
		}
	})
	return p
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (p *proc) start() {
	t := p.t
	t.Helper()
	tokenFile := filepath.Join(p.dir, "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lf, err := os.OpenFile(filepath.Join(p.dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	p.log = lf
	ctrl, repl, nbdAddr := p.ctrl, p.repl, p.nbdAddr
	if ctrl == "" {
		// A restart binds these ports again: ports below the ephemeral
		// range, which no connection or port-0 listener of another test
		// is given meanwhile. Chosen by holding them, released for the
		// process to bind (only another test's pick could take one in
		// between, at random among 10000).
		var lns []net.Listener
		for _, a := range []*string{&ctrl, &repl, &nbdAddr} {
			l := testkit.ListenRestartable(t)
			*a = l.Addr().String()
			lns = append(lns, l)
		}
		for _, l := range lns {
			l.Close()
		}
	}
	addrFile := filepath.Join(p.dir, "addresses.json")
	if err := os.Remove(addrFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	args := []string{"--node", p.node, "--data-dir", filepath.Join(p.dir, "data"),
		"--control-address", ctrl, "--replication-address", repl, "--nbd-address", nbdAddr,
		"--addresses-file", addrFile, "--token-file", tokenFile, "--zap-log-level", "info"}
	if p.tlsDir != "" {
		args = append(args, "--tls-dir", p.tlsDir)
	}
	p.cmd = exec.Command(buildAgent(t), args...)
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited, cmd := make(chan struct{}), p.cmd
	p.exited = exited
	go func() { p.exitErr = cmd.Wait(); close(exited) }()
	var addrs agentapi.ListenAddresses
	testkit.Eventually(t, 30*time.Second, p.node+" serving", func() (bool, error) {
		select {
		case <-exited:
			t.Fatalf("agent %s exited at start: %v", p.node, p.exitErr)
		default:
		}
		var err error
		addrs, err = agentapi.ReadListenAddresses(addrFile)
		return err == nil, err
	}, testkit.Every(50*time.Millisecond))
	p.ctrl, p.repl, p.nbdAddr = strings.TrimPrefix(strings.TrimPrefix(addrs.Control, "http://"), "https://"), addrs.Replication, addrs.NBD
	p.c = agent.NewClient(addrs.Control, token)
	if p.tlsClient != nil {
		p.c.HTTP.Transport = agentapi.TLSTransport(p.tlsClient)
	}
	if _, err := p.c.Info(context.Background()); err != nil {
		t.Fatalf("%s control API: %v", p.node, err)
	}
}

func (p *proc) kill() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGCONT)
	_ = p.cmd.Process.Kill()
	<-p.exited
	p.cmd = nil
	if p.log != nil {
		p.log.Close()
	}
}

// waitExit waits up to d for the process to exit by itself; it returns
// cmd.Wait's error, or fails the test.
func (p *proc) waitExit(d time.Duration) error {
	p.t.Helper()
	select {
	case <-p.exited:
		p.cmd = nil
		p.log.Close()
		return p.exitErr
	case <-time.After(d):
		p.t.Fatalf("%s did not exit within %v", p.node, d)
		return nil
	}
}

func (p *proc) signal(s syscall.Signal) {
	if err := p.cmd.Process.Signal(s); err != nil {
		p.t.Fatalf("signal %v to %s: %v", s, p.node, err)
	}
}

func (p *proc) url() string { return "nbd://" + p.nbdAddr + "/" + ns + "/" + volName }

func (p *proc) dataPath() string {
	return filepath.Join(p.dir, "data", "volumes", ns, volName, "data")
}

func (p *proc) put(spec volume.Spec) volume.Status {
	p.t.Helper()
	st, err := p.c.Put(context.Background(), ns, volName, agent.VolumeRequest{Size: volSize, RegionSize: region, Spec: spec})
	if err != nil {
		p.t.Fatalf("PUT %s on %s: %v", spec.Role, p.node, err)
	}
	return st
}

func (p *proc) status() volume.Status {
	p.t.Helper()
	st, err := p.c.Get(context.Background(), ns, volName)
	if err != nil {
		p.t.Fatalf("GET status on %s: %v", p.node, err)
	}
	return st
}

func (p *proc) bitmapRegions() map[uint32]bool {
	p.t.Helper()
	b, err := p.c.Bitmap(context.Background(), ns, volName)
	if err != nil {
		p.t.Fatalf("GET bitmap on %s: %v", p.node, err)
	}
	out := map[uint32]bool{}
	for _, r := range b.Runs {
		for i := r[0]; ; i++ {
			out[i] = true
			if i == r[1] {
				break
			}
		}
	}
	return out
}

func qemuIO(t *testing.T, url string, cmds ...string) string {
	t.Helper()
	bin := nbdtest.Require(t, "qemu-io")
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, url)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("failed")) || bytes.Contains(out, []byte("Pattern verification failed")) {
		t.Fatalf("qemu-io %v on %s: %v\n%s", cmds, url, err, out)
	}
	return string(out)
}

// diffRegions lists the regions whose bytes differ between two files.
func diffRegions(t *testing.T, a, b string) []uint32 {
	t.Helper()
	da, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	var out []uint32
	for off := 0; off < volSize; off += region {
		if !bytes.Equal(da[off:off+region], db[off:off+region]) {
			out = append(out, uint32(off/region))
		}
	}
	return out
}

func waitInSync(t *testing.T, primary, backup *proc) {
	t.Helper()
	// OldestUnreplicatedSeconds is 0 once the backup acknowledged every
	// client frame as applied, which it does after writing it to its
	// replica file: the files can be compared as soon as this holds.
	testkit.Eventually(t, 60*time.Second, "pair in sync", func() (bool, string) {
		ps, bs := primary.status(), backup.status()
		ok := ps.PeerConnected && ps.OutOfSyncRegions == 0 && !ps.Copy.Running && bs.DataState == volume.UpToDate && ps.OldestUnreplicatedSeconds == 0
		return ok, fmt.Sprintf("primary %+v; backup %+v", ps, bs)
	}, testkit.Every(50*time.Millisecond))
}

func TestPairStory(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeAsync, volume.ModeSync} {
		t.Run(string(mode), func(t *testing.T) { pairStory(t, mode) })
	}
}

func pairStory(t *testing.T, mode volume.Mode) {
	nbdtest.Require(t, "qemu-io")
	nbdcopy := nbdtest.Require(t, "nbdcopy")
	nbdinfo := nbdtest.Require(t, "nbdinfo")
	a, b := newProc(t, "node-a"), newProc(t, "node-b")
	a.start()
	b.start()

	// PAIR: a primary, b backup, epoch 1. Fresh stores: nothing to copy.
	b.put(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "node-a"})
	a.put(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: "node-b", PeerAddress: b.repl})
	waitInSync(t, a, b)
	if st := a.status(); st.Copy.CopiedBytesTotal != 0 {
		t.Fatalf("a brand-new pair copied %d bytes; want 0", st.Copy.CopiedBytesTotal)
	}

	// A non-writer refuses the export and says why.
	if out, err := exec.Command(nbdinfo, b.url()).CombinedOutput(); err == nil {
		t.Fatalf("nbdinfo on the backup succeeded; want a refusal:\n%s", out)
	}
	if lg, _ := os.ReadFile(filepath.Join(b.dir, "agent.log")); !strings.Contains(string(lg), "member node-b is Backup at epoch 1") {
		t.Fatal("the backup's refusal of the export is not logged with its reason")
	}
	out, err := exec.Command(nbdinfo, "--size", a.url()).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != fmt.Sprint(volSize) {
		t.Fatalf("nbdinfo --size: %v %q", err, out)
	}

	// Random data through nbdcopy, then patterns through qemu-io.
	src := filepath.Join(t.TempDir(), "src")
	rnd := make([]byte, 8<<20)
	_, _ = rand.Read(rnd)
	if err := os.WriteFile(src, rnd, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(nbdcopy, src, a.url()).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy into the volume: %v\n%s", err, out)
	}
	qemuIO(t, a.url(), "write -P 0x11 16M 1M", "write -z 17M 64k", "discard 18M 128k", "flush", "read -P 0x11 16M 1M")
	waitInSync(t, a, b)
	if ha, hb := testkit.FileSHA256(t, a.dataPath()), testkit.FileSHA256(t, b.dataPath()); ha != hb {
		t.Fatalf("PAIR: replicas differ: %v", diffRegions(t, a.dataPath(), b.dataPath()))
	}

	// First diff (async only): writes acked by a that never reach b.
	if mode == volume.ModeAsync {
		b.signal(syscall.SIGSTOP)
		qemuIO(t, a.url(), "write -P 0xa1 40M 256k")
	}
	a.kill() // primary lost
	if mode == volume.ModeAsync {
		b.signal(syscall.SIGCONT)
	}

	// SWAP: the backup is promoted at epoch 2 and records its second diff.
	b.put(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: mode, PeerNode: "node-a", PeerAddress: a.repl})
	if mode == volume.ModeSync {
		// Invariant 2: a sync write without its peer is held until the
		// controller records the peer Outdated.
		done := make(chan string, 1)
		go func() { done <- qemuIOErr(b.url(), "write -P 0xb2 20M 512k") }()
		testkit.Eventually(t, 20*time.Second, "sync write held for peer outdating", func() (bool, string) {
			st := b.status()
			return st.WaitingForPeerOutdated > 0, fmt.Sprint(st.WaitingForPeerOutdated)
		}, testkit.Every(50*time.Millisecond))
		select {
		case out := <-done:
			t.Fatalf("sync write completed without its peer and before outdating: %s", out)
		case <-time.After(300 * time.Millisecond):
		}
		if _, err := b.c.PeerOutdated(context.Background(), ns, volName, 2); err != nil {
			t.Fatal(err)
		}
		select {
		case out := <-done:
			if out != "" {
				t.Fatalf("held sync write failed: %s", out)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("held sync write not released after peer-outdated")
		}
	} else {
		qemuIO(t, b.url(), "write -P 0xb2 20M 512k")
	}
	qemuIO(t, b.url(), "read -P 0xb2 20M 512k")

	// The old primary returns fenced, with its recovered bitmap.
	a.start()
	if st := a.status(); st.Role != volume.RoleNone || st.Writable {
		t.Fatalf("restarted member is not fenced: %+v", st)
	}
	first := a.bitmapRegions()
	second := b.bitmapRegions()
	if mode == volume.ModeAsync && !first[40<<20/region] {
		t.Fatalf("recovered first diff lacks region %d of the unreplicated write (has %d regions)", 40<<20/region, len(first))
	}
	for r := uint32(20 << 20 / region); r < (20<<20+512<<10)/region; r++ {
		if !second[r] {
			t.Fatalf("second diff lacks region %d", r)
		}
	}
	union := map[uint32]bool{}
	for r := range first {
		union[r] = true
	}
	for r := range second {
		union[r] = true
	}
	before := b.status().Copy.CopiedBytesTotal

	// COPY: a rejoins as backup; b copies first ∪ second.
	a.put(volume.Spec{Role: volume.RoleBackup, Epoch: 2, Mode: mode, PeerNode: "node-b"})
	waitInSync(t, b, a)
	copied := b.status().Copy.CopiedBytesTotal - before
	if want := int64(len(union)) * region; copied != want {
		t.Fatalf("resync copied %d bytes, want the union of both diffs: %d regions = %d bytes (first %d, second %d)",
			copied, len(union), want, len(first), len(second))
	}
	if copied >= volSize/8 {
		t.Fatalf("resync copied %d of %d bytes; it must copy only the diffs", copied, volSize)
	}
	t.Logf("%s resync: copied %d bytes = %d regions (first diff %d, second diff %d) of a %d-byte volume (%.2f%%)",
		mode, copied, len(union), len(first), len(second), volSize, 100*float64(copied)/volSize)
	if ha, hb := testkit.FileSHA256(t, a.dataPath()), testkit.FileSHA256(t, b.dataPath()); ha != hb {
		t.Fatalf("after COPY replicas differ in regions %v", diffRegions(t, a.dataPath(), b.dataPath()))
	}

	// Failback (DELPAIR): hold, drain, switch with a new epoch; the held
	// write completes on the new writer.
	b.put(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: mode, PeerNode: "node-a", PeerAddress: a.repl, Hold: true})
	held := make(chan string, 1)
	go func() { held <- qemuIOErr(b.url(), "write -P 0xc3 30M 64k") }()
	testkit.Eventually(t, 20*time.Second, "write held and pair drained", func() (bool, string) {
		st := b.status()
		return st.HeldWrites > 0 && st.Drained, fmt.Sprintf("held=%d drained=%v", st.HeldWrites, st.Drained)
	}, testkit.Every(50*time.Millisecond))
	b.put(volume.Spec{Role: volume.RoleBackup, Epoch: 3, Mode: mode, PeerNode: "node-a"})
	a.put(volume.Spec{Role: volume.RolePrimary, Epoch: 3, Mode: mode, PeerNode: "node-b", PeerAddress: b.repl})
	select {
	case out := <-held:
		if out != "" {
			t.Fatalf("held write failed across failback: %s", out)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("held write did not complete after failback")
	}
	hold := b.status().LastHoldSeconds
	t.Logf("%s failback: write hold %.3fs", mode, hold)
	waitInSync(t, a, b)
	qemuIO(t, a.url(), "read -P 0xc3 30M 64k", "read -P 0xb2 20M 512k", "read -P 0x11 16M 1M")
	if ha, hb := testkit.FileSHA256(t, a.dataPath()), testkit.FileSHA256(t, b.dataPath()); ha != hb {
		t.Fatalf("after failback replicas differ in regions %v", diffRegions(t, a.dataPath(), b.dataPath()))
	}
	got := make([]byte, 8<<20)
	f, err := os.Open(a.dataPath())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, rnd) {
		t.Fatal("the nbdcopy data did not survive the story")
	}
}

// qemuIOErr runs qemu-io and returns "" on success or the failure text.
func qemuIOErr(url string, cmds ...string) string {
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, url)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("failed")) {
		return fmt.Sprintf("%v: %s", err, out)
	}
	return ""
}

// TestCrashRecoveredBitmapCovers SIGKILLs an async primary in the middle of
// writes, several times; each time the bitmap it recovers must cover every
// region that differs from its backup (invariant 3).
func TestCrashRecoveredBitmapCovers(t *testing.T) {
	nbdtest.Require(t, "qemu-io")
	a, b := newProc(t, "node-a"), newProc(t, "node-b")
	a.start()
	b.start()
	epoch := uint64(1)
	b.put(volume.Spec{Role: volume.RoleBackup, Epoch: epoch, Mode: volume.ModeAsync, PeerNode: "node-a"})
	a.put(volume.Spec{Role: volume.RolePrimary, Epoch: epoch, Initialize: true, Mode: volume.ModeAsync, PeerNode: "node-b", PeerAddress: b.repl})
	rng := mrand.New(mrand.NewPCG(1, 2))
	const trials = 4
	for trial := range trials {
		waitInSync(t, a, b)
		stopBackup := trial%2 == 0
		if stopBackup {
			b.signal(syscall.SIGSTOP)
		}
		var cmds []string
		for range 300 {
			off := rng.Int64N(volSize/4096-16) * 4096
			cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", 1+rng.IntN(250), off, 4096*(1+rng.Int64N(16))))
		}
		w := exec.Command("qemu-io", append(append([]string{"-f", "raw"}, interleave("-c", cmds)...), a.url())...)
		if err := w.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(100+rng.IntN(400)) * time.Millisecond)
		a.kill()
		_ = w.Wait()
		if stopBackup {
			b.signal(syscall.SIGCONT)
		}
		// The backup applies what was on its socket, then sees the
		// stream end.
		testkit.Eventually(t, 20*time.Second, "the backup's stream ended", func() (bool, string) {
			st := b.status()
			return !st.PeerConnected, fmt.Sprintf("%+v", st)
		}, testkit.Every(50*time.Millisecond))

		a.start()
		recovered := a.bitmapRegions()
		diff := diffRegions(t, a.dataPath(), b.dataPath())
		for _, r := range diff {
			if !recovered[r] {
				t.Fatalf("trial %d: region %d differs from the backup but the recovered bitmap (%d regions) does not cover it", trial, r, len(recovered))
			}
		}
		t.Logf("trial %d (backup stopped: %v): %d regions differ, recovered bitmap covers them with %d regions", trial, stopBackup, len(diff), len(recovered))
		// Same roles again with the recovered bitmap: the resync must make
		// them identical.
		epoch++
		b.put(volume.Spec{Role: volume.RoleBackup, Epoch: epoch, Mode: volume.ModeAsync, PeerNode: "node-a"})
		a.put(volume.Spec{Role: volume.RolePrimary, Epoch: epoch, Mode: volume.ModeAsync, PeerNode: "node-b", PeerAddress: b.repl})
		waitInSync(t, a, b)
		if d := diffRegions(t, a.dataPath(), b.dataPath()); len(d) != 0 {
			t.Fatalf("trial %d: after resync %d regions still differ: %v", trial, len(d), d)
		}
	}
}

func interleave(flag string, vals []string) []string {
	out := make([]string, 0, 2*len(vals))
	for _, v := range vals {
		out = append(out, flag, v)
	}
	return out
}
