package volume_test

// Shutdown with writes in flight: Close must not
// write its final checkpoint while admitted writes are still between their
// write-intent mark and their dirty bit, or a region that differs from the
// peer comes back clean after a restart and is never resynced (invariant 3).

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// closablePrimary is a primary over a store.Mem that a test closes and
// opens again from the same directory and data, as an agent restart would.
type closablePrimary struct {
	t    *testing.T
	dir  string
	mem  *store.Mem
	st   *landingStore
	v    *volume.Volume
	logs *syncBuf
	// ckptInterval is the periodic checkpoint's interval.
	ckptInterval time.Duration
}

// landingStore is a store.Faulty (whose hook can hold writes inside the
// store, as a slow disk does) that also lets the writes still inside it
// land before it closes, as writes already issued to a real disk do when
// their file is closed: with onClose set, Close runs it, then waits for
// them.
type landingStore struct {
	*store.Faulty
	inside  atomic.Int64
	onClose func()
}

func (s *landingStore) WriteAt(p []byte, off int64) (int, error) {
	s.inside.Add(1)
	defer s.inside.Add(-1)
	return s.Faulty.WriteAt(p, off)
}

func (s *landingStore) Close() error {
	if s.onClose != nil {
		s.onClose()
		deadline := time.Now().Add(5 * time.Second)
		for s.inside.Load() > 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	return s.Faulty.Close()
}

func newClosablePrimary(t *testing.T, closeTimeout, ckptInterval time.Duration) *closablePrimary {
	p := &closablePrimary{t: t, dir: t.TempDir(), mem: store.NewMem(size), logs: &syncBuf{}, ckptInterval: max(ckptInterval, 100*time.Millisecond)}
	p.open(closeTimeout)
	t.Cleanup(func() {
		if p.v != nil {
			_ = p.v.Close()
		}
		if t.Failed() {
			t.Logf("---- primary log ----\n%s", p.logs)
		}
	})
	return p
}

func (p *closablePrimary) open(closeTimeout time.Duration) {
	p.t.Helper()
	p.mem.Reopen()
	p.st = &landingStore{Faulty: store.NewFaulty(p.mem)}
	log := funcr.New(func(prefix, args string) { p.logs.add(prefix + " " + args) }, funcr.Options{})
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: p.dir, Size: size, RegionSize: region,
		Store: p.st, CheckpointInterval: p.ckptInterval, CloseTimeout: closeTimeout, Log: log})
	if err != nil {
		p.t.Fatal(err)
	}
	p.v = v
}

func (p *closablePrimary) member() *member { return &member{v: p.v, st: p.mem, logs: p.logs} }

// uncovered lists the regions whose bytes differ between a and b but are
// clean in dirty.
func uncovered(t *testing.T, a, b *store.Mem, dirty [][2]uint32) []int {
	t.Helper()
	isDirty := map[uint32]bool{}
	for _, r := range dirty {
		for i := r[0]; ; i++ {
			isDirty[i] = true
			if i == r[1] {
				break
			}
		}
	}
	x, y := make([]byte, size), make([]byte, size)
	if _, err := a.ReadAt(x, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.ReadAt(y, 0); err != nil {
		t.Fatal(err)
	}
	var out []int
	for off := 0; off < size; off += region {
		if string(x[off:off+region]) != string(y[off:off+region]) && !isDirty[uint32(off/region)] {
			out = append(out, off/region)
		}
	}
	return out
}

// TestCloseDuringWrites: writers keep a primary with a connected backup
// busy; some of their writes are inside the local store (past their
// write-intent mark) when Close starts, and land while it runs. After a
// reopen every region that differs from the backup is in the recovered
// bitmap, and a resync makes the replicas identical.
func TestCloseDuringWrites(t *testing.T) {
	for _, mode := range faultModes {
		t.Run(string(mode), func(t *testing.T) {
			for trial := range 3 {
				closeDuringWritesTrial(t, mode, uint64(trial))
			}
		})
	}
}

func closeDuringWritesTrial(t *testing.T, mode volume.Mode, seed uint64) {
	// No periodic checkpoint during the trial: one due while writes are
	// held would wait for them (v.ckpt) and hide the race with Close.
	p := newClosablePrimary(t, 5*time.Second, time.Hour)
	bNode := fmt.Sprintf("b%d", seed)
	b := newMember(t, bNode)
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: bNode, PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "pair in sync", inSync(p.member(), b))

	// Local writes go through until hold is set; then they wait inside the
	// store until the gate opens: 50 ms after Close began, or when Close
	// closes the store, after its final checkpoint (then they land before
	// the store closes, as writes issued to a disk do).
	var hold atomic.Bool
	var held atomic.Int64
	gate := make(chan struct{})
	var gateOnce sync.Once
	open := func() { gateOnce.Do(func() { close(gate) }) }
	p.st.onClose = open
	p.st.SetHook(func(op store.Op, off, n int64) error {
		if op == store.OpWrite && hold.Load() {
			held.Add(1)
			<-gate
		}
		return nil
	})

	var wg sync.WaitGroup
	var acked atomic.Int64
	for w := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			buf := make([]byte, 16<<10)
			for {
				n := 4096 * (1 + rng.IntN(4))
				off := rng.Int64N((size-int64(n))/4096) * 4096
				for i := range buf[:n] {
					buf[i] = byte(rng.Uint32())
				}
				if err := p.v.WriteAt(context.Background(), buf[:n], off, rng.IntN(8) == 0); err != nil {
					return // closed
				}
				acked.Add(1)
			}
		})
	}
	waitFor(t, "writes flowing", func() bool { return acked.Load() > 100 })
	hold.Store(true)
	waitFor(t, "writes inside the store", func() bool { return held.Load() >= 1 })
	// Let more writers reach the store: those not queued behind a
	// checkpoint, which waits for the held writes (v.ckpt).
	time.Sleep(20 * time.Millisecond)

	closed := make(chan error, 1)
	go func() { closed <- p.v.Close() }()
	time.AfterFunc(50*time.Millisecond, open)
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	p.v = nil
	wg.Wait()

	// The restart: the recovered bitmap must cover every difference.
	p.open(5 * time.Second)
	recovered := p.v.DirtyRanges()
	if un := uncovered(t, p.mem, b.st, recovered); len(un) > 0 {
		t.Fatalf("trial %d: %d regions differ from the backup but are clean in the recovered bitmap (%d runs): %v",
			seed, len(un), len(recovered), un)
	}
	// And the resync carries them over.
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 2, Mode: mode, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: mode, PeerNode: bNode, PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "resynced", inSync(p.member(), b))
	same(t, p.member(), b)
	t.Logf("%s trial %d: %d writes acknowledged, %d held in the store at close, %d dirty runs recovered", mode, seed, acked.Load(), held.Load(), len(recovered))
}

// TestCloseGivesUpOnStuckWrite: a write that never leaves the store (a
// stalled disk) does not hold Close forever: it gives up after its timeout,
// says so, and leaves the write-intent journal, so the stuck write's region
// is dirty after a reopen (it may have reached the disk).
func TestCloseGivesUpOnStuckWrite(t *testing.T) {
	p := newClosablePrimary(t, 300*time.Millisecond, 0)
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	var stuck atomic.Bool
	p.st.SetHook(func(op store.Op, off, n int64) error {
		if op == store.OpWrite && off == 8*region {
			stuck.Store(true)
			<-gate
		}
		return nil
	})
	wrote := make(chan error, 1)
	go func() { wrote <- p.v.WriteAt(context.Background(), make([]byte, 4096), 8*region, false) }()
	waitFor(t, "the write stuck in the store", stuck.Load)

	start := time.Now()
	err := p.v.Close()
	took := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "still in progress") {
		t.Fatalf("Close with a stuck write: %v; want an error saying a write is still in progress", err)
	}
	if took < 300*time.Millisecond || took > 5*time.Second {
		t.Fatalf("Close took %v with a 300ms timeout", took)
	}
	if !strings.Contains(p.logs.String(), "Closing with writes in flight") {
		t.Fatal("the give-up is not logged")
	}
	close(gate)
	if err := <-wrote; err == nil {
		t.Fatal("a write that finished after Close was acknowledged")
	}
	p.v = nil

	p.open(time.Second)
	covered := false
	for _, r := range p.v.DirtyRanges() {
		if r[0] <= 8 && 8 <= r[1] {
			covered = true
		}
	}
	if !covered {
		t.Fatalf("region 8 (the stuck write) is clean after the reopen: %v", p.v.DirtyRanges())
	}
}
