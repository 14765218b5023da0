package volume_test

import (
	"bufio"
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/testkit"
)

const (
	size   = 16 << 20
	region = 64 << 10
)

// member is one in-process replica with a replication listener on loopback.
type member struct {
	v    *volume.Volume
	st   *store.Mem
	addr string
	dir  string
	node string
	logs *syncBuf
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) add(line string) {
	s.mu.Lock()
	s.b.WriteString(line + "\n")
	s.mu.Unlock()
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newMember(t testing.TB, node string) *member {
	t.Helper()
	return openMember(t, node, t.TempDir(), store.NewMem(size))
}

// reopen opens m's replica again after m.v was closed, as an agent
// restart would: same directory, same store contents.
func reopen(t testing.TB, m *member) *member {
	t.Helper()
	m.st.Reopen()
	return openMember(t, m.node, m.dir, m.st)
}

func openMember(t testing.TB, node, dir string, st *store.Mem) *member {
	t.Helper()
	return openMemberWith(t, node, dir, st, nil)
}

// openMemberWith is openMember with the options adjusted by opt (nil:
// none).
func openMemberWith(t testing.TB, node, dir string, st *store.Mem, opt func(*volume.Options)) *member {
	t.Helper()
	m := &member{st: st, logs: &syncBuf{}, dir: dir, node: node}
	log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
	o := volume.Options{Name: "ns/vol", Node: node, Dir: dir, Size: size, RegionSize: region,
		Store: m.st, CheckpointInterval: 100 * time.Millisecond, Log: log}
	if opt != nil {
		opt(&o)
	}
	v, err := volume.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	ln := serveReplication(t, v)
	m.addr = ln.Addr().String()
	t.Cleanup(func() {
		ln.Close()
		if err := v.Close(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("---- %s log ----\n%s", node, m.logs)
		}
	})
	return m
}

// waitFor is testkit.Eventually with this package's timeout.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	testkit.Eventually(t, 20*time.Second, what, cond)
}

func inSync(p, b *member) func() bool {
	return func() bool {
		ps, bs := p.v.Status(), b.v.Status()
		return ps.PeerConnected && ps.OutOfSyncRegions == 0 && !ps.Copy.Running && bs.DataState == volume.UpToDate && ps.OldestUnreplicatedSeconds == 0
	}
}

func same(t *testing.T, a, b *member) {
	t.Helper()
	x, y := make([]byte, size), make([]byte, size)
	if _, err := a.st.ReadAt(x, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.st.ReadAt(y, 0); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < size; off += region {
		if !bytes.Equal(x[off:off+region], y[off:off+region]) {
			t.Fatalf("replicas differ in region %d", off/region)
		}
	}
}

func write(t *testing.T, v *volume.Volume, rng *rand.Rand, n int) {
	t.Helper()
	buf := make([]byte, 64<<10)
	for range n {
		l := 512 * (1 + rng.IntN(128))
		off := rng.Int64N((size-int64(l))/512) * 512
		for i := range buf[:l] {
			buf[i] = byte(rng.Uint32())
		}
		if err := v.WriteAt(context.Background(), buf[:l], off, rng.IntN(10) == 0); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
	}
}

// TestResyncWithLiveWrites: a primary that wrote alone has a large diff; it
// resyncs to its backup while clients keep writing to the same regions. The
// copy must never overwrite a newer live write, and both end identical.
func TestResyncWithLiveWrites(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeAsync, volume.ModeSync} {
		t.Run(string(mode), func(t *testing.T) {
			p, b := newMember(t, "a"), newMember(t, "b")
			rng := rand.New(rand.NewPCG(3, 4))
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
				t.Fatal(err)
			}
			write(t, p.v, rng, 400) // alone: sticky regions
			if p.v.Status().OutOfSyncRegions == 0 {
				t.Fatal("writes without a peer left no dirty regions")
			}
			if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			// Throttle the copy so live writes overlap it.
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: "b", PeerAddress: b.addr, MaxBytesPerSecond: 8 << 20}); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			for w := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					write(t, p.v, rand.New(rand.NewPCG(uint64(w), 9)), 150)
				}()
			}
			wg.Wait()
			waitFor(t, "resync and live writes to converge", inSync(p, b))
			same(t, p, b)
			if st := p.v.Status(); st.Copy.CopiedBytesTotal == 0 {
				t.Fatal("no resync copy happened")
			}
		})
	}
}

// TestStaleEpochRefused: a backup at a higher epoch refuses a stale primary.
func TestStaleEpochRefused(t *testing.T) {
	p, b := newMember(t, "a"), newMember(t, "b")
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 3, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "refusal", func() bool { return b.v.Status().Counters.RejectedFrames > 0 })
	if p.v.Status().PeerConnected {
		t.Fatal("a stale primary must not stream to a newer backup")
	}
	waitFor(t, "refusal reason in the primary's log", func() bool {
		return strings.Contains(p.logs.String(), "epoch mismatch: primary a is at epoch 2, member b at epoch 3")
	})
}

// TestNoPromotionOfInconsistent: a member whose copy did not finish refuses
// to become primary unless explicitly overridden.
func TestNoPromotionOfInconsistent(t *testing.T) {
	p, b := newMember(t, "a"), newMember(t, "b")
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	write(t, p.v, rand.New(rand.NewPCG(1, 1)), 200)
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	// A very slow copy, so the backup stays Inconsistent.
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr, MaxBytesPerSecond: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "backup Inconsistent", func() bool { return b.v.Status().DataState == volume.Inconsistent })
	if err := p.v.Apply(volume.Spec{Role: volume.RoleNone, Epoch: 2}); err != nil {
		t.Fatal(err)
	}
	err := b.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync})
	if err == nil || !strings.Contains(err.Error(), "Inconsistent") {
		t.Fatalf("promotion of an Inconsistent member: %v", err)
	}
	if err := b.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, AllowPromoteInconsistent: true}); err != nil {
		t.Fatalf("explicit override refused: %v", err)
	}
}

// TestPairWritesReachBackupInOrder: overlapping writes from many goroutines
// end identical on both sides, in both modes.
func TestPairWritesReachBackupInOrder(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeAsync, volume.ModeSync} {
		t.Run(string(mode), func(t *testing.T) {
			p, b := newMember(t, "a"), newMember(t, "b")
			if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: mode}); err != nil {
				t.Fatal(err)
			}
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: "b", PeerAddress: b.addr}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "link up", func() bool { return p.v.Status().PeerConnected })
			var wg sync.WaitGroup
			for w := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 7))
					// All writers hammer the same 8 regions.
					buf := make([]byte, 4096)
					for range 300 {
						for i := range buf {
							buf[i] = byte(rng.Uint32())
						}
						off := rng.Int64N(8*region/4096) * 4096
						if err := p.v.WriteAt(context.Background(), buf, off, false); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if err := p.v.Trim(context.Background(), 0, 4096, false); err != nil {
				t.Fatal(err)
			}
			if err := p.v.WriteZeroes(context.Background(), 8192, 4096, true); err != nil {
				t.Fatal(err)
			}
			if err := p.v.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "in sync", inSync(p, b))
			same(t, p, b)
			if got := b.v.Status().Counters.FramesApplied; got < 1200 {
				t.Fatalf("backup applied %d frames, want ≥ 1200", got)
			}
		})
	}
}

// serveReplication listens on loopback and hands every replication stream
// that opens with a valid Hello to v (the backup side of a pair). The
// caller closes the listener.
func serveReplication(t testing.TB, v *volume.Volume) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				br := bufio.NewReader(c)
				rd := repl.NewReader(br, 0)
				f, err := rd.Next()
				if err != nil || f.Type != repl.TypeHello {
					c.Close()
					return
				}
				h, err := repl.ParseHello(f.Payload)
				if err != nil {
					c.Close()
					return
				}
				_ = v.ServePrimary(c, br, rd, h)
			}()
		}
	}()
	return ln
}
