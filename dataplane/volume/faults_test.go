package volume_test

// Disk faults: a fault-injecting store (store.Faulty over
// store.Mem) under one member of a pair. Every trial keeps a log of the
// writes the "client" got acknowledged and reads them back from both members
// at the end: whatever the fault, clients get I/O errors rather than silent
// loss, and nothing acknowledged is lost on the other member.
//
// Short by default; TANDEM_STRESS_TRIALS=N runs N randomised trials of each
// case (make stress). Each test logs a machine-readable line
//
//	RELIABILITY suite=disk-faults case=... trials=N faults=F violations=V
//
// that hack/stress collects into docs/reliability.md.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// fmember is a member whose store injects faults.
type fmember struct {
	*member
	f        *store.Faulty
	nodeName string
}

func newFaultyMemberN(t testing.TB, node string) *fmember { return newFaultyMember(t, node, "ns/vol") }

// newFaultyMember is newMember with a store.Faulty over the Mem store and a
// volume name of the caller's choice.
func newFaultyMember(t testing.TB, node, name string) *fmember {
	t.Helper()
	return newFaultyMemberClock(t, node, name, nil)
}

// newFaultyMemberClock is newFaultyMember on clock clk (nil: the real one).
func newFaultyMemberClock(t testing.TB, node, name string, clk clock.WithTicker) *fmember {
	t.Helper()
	mem := store.NewMem(size)
	f := store.NewFaulty(mem)
	m := &member{st: mem, logs: &syncBuf{}}
	log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
	v, err := volume.Open(volume.Options{Name: name, Node: node, Dir: t.TempDir(), Size: size, RegionSize: region,
		Store: f, CheckpointInterval: 100 * time.Millisecond, Clock: clk, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	ln := serveReplication(t, v)
	m.addr = ln.Addr().String()
	t.Cleanup(func() {
		ln.Close()
		f.Heal()
		if err := v.Close(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("---- %s (%s) log ----\n%s", node, name, m.logs)
		}
	})
	return &fmember{member: m, f: f, nodeName: node}
}

// startPair makes p the primary and b the backup at epoch 1 and waits for
// the link.
func startPair(t *testing.T, p, b *fmember, mode volume.Mode) {
	t.Helper()
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: p.node()}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: b.node(), PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link up", inSync(p.member, b.member))
}

func (m *fmember) node() string { return m.nodeName }

const ackBlock = 4096

// ackLog is what the client was told: the content of every 4 KiB block as
// of its last acknowledged write. A block a failed write touched after that
// has undefined content (the client got an error) and is not checked.
type ackLog struct {
	mu      sync.Mutex
	data    map[int64][]byte
	unknown map[int64]bool
	acked   int
	failed  int
}

func newAckLog() *ackLog {
	return &ackLog{data: map[int64][]byte{}, unknown: map[int64]bool{}}
}

// write issues one client write (kind "write", "trim" or "zero") and records
// the outcome. It returns the error the client got.
func (l *ackLog) op(ctx context.Context, v *volume.Volume, kind string, p []byte, off, n int64, fua bool) error {
	var err error
	switch kind {
	case "write":
		err = v.WriteAt(ctx, p, off, fua)
	case "trim":
		err = v.Trim(ctx, off, n, fua)
	case "zero":
		err = v.WriteZeroes(ctx, off, n, fua)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for b := off / ackBlock; b < (off+n+ackBlock-1)/ackBlock; b++ {
		if err != nil {
			l.unknown[b] = true
			continue
		}
		delete(l.unknown, b)
		if kind == "write" {
			l.data[b] = append([]byte(nil), p[(b*ackBlock-off):(b*ackBlock-off)+ackBlock]...)
		} else {
			l.data[b] = make([]byte, ackBlock)
		}
	}
	if err != nil {
		l.failed++
	} else {
		l.acked++
	}
	return err
}

// randomWrite writes 1..16 random blocks somewhere in [lo, hi).
func (l *ackLog) randomWrite(ctx context.Context, v *volume.Volume, rng *rand.Rand, lo, hi int64, fua bool) (off int64, p []byte, err error) {
	n := int64(1+rng.IntN(16)) * ackBlock
	off = lo + rng.Int64N((hi-lo-n)/ackBlock+1)*ackBlock
	p = make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return off, p, l.op(ctx, v, "write", p, off, n, fua)
}

// lost counts acknowledged blocks whose content s does not hold.
func (l *ackLog) lost(t *testing.T, who string, s store.Store) int {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	buf := make([]byte, ackBlock)
	lost := 0
	for b, want := range l.data {
		if l.unknown[b] {
			continue
		}
		if _, err := s.ReadAt(buf, b*ackBlock); err != nil {
			t.Fatalf("read back block %d on %s: %v", b, who, err)
		}
		if !bytes.Equal(buf, want) {
			if lost < 5 {
				t.Errorf("%s lost the acknowledged write to block %d (byte offset %d)", who, b, b*ackBlock)
			}
			lost++
		}
	}
	return lost
}

// holds reports whether s holds p at off.
func holds(s store.Store, p []byte, off int64) bool {
	got := make([]byte, len(p))
	if _, err := s.ReadAt(got, off); err != nil {
		return false
	}
	return bytes.Equal(got, p)
}

// uncoveredDiff returns the regions whose bytes differ between the primary
// and the backup but whose bit is clear in the primary's bitmap: regions the
// resync would never copy (invariant 3). Call it with no write in flight.
func uncoveredDiff(t *testing.T, p, b *fmember) []int {
	t.Helper()
	dirty := map[uint32]bool{}
	for _, r := range p.v.DirtyRanges() { // snapshot the bitmap first
		for i := r[0]; ; i++ {
			dirty[i] = true
			if i == r[1] {
				break
			}
		}
	}
	x, y := make([]byte, size), make([]byte, size)
	if _, err := p.st.ReadAt(x, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.st.ReadAt(y, 0); err != nil {
		t.Fatal(err)
	}
	var out []int
	for off := 0; off < size; off += region {
		if !bytes.Equal(x[off:off+region], y[off:off+region]) && !dirty[uint32(off/region)] {
			out = append(out, off/region)
		}
	}
	return out
}

var faultModes = []volume.Mode{volume.ModeAsync, volume.ModeSync}

// TestDiskFaultPrimaryWrite: EIO on the primary's writes (a bad range, then
// the whole disk, then its fsync). The client's write fails with EIO, the
// status says why, the other writes go on, and in sync mode every
// acknowledged write is on the backup when it is acknowledged. After healing
// both members are identical and hold every acknowledged write.
func TestDiskFaultPrimaryWrite(t *testing.T) {
	for _, mode := range faultModes {
		t.Run(string(mode), func(t *testing.T) {
			tl := stresstest.NewTally(t, "disk-faults")
			for trial := range stresstest.Trials(1) {
				seed := stresstest.Seed(1)*1000 + uint64(trial)
				primaryWriteFaultTrial(t, tl, mode, seed)
				tl.Trials.Add(1)
			}
		})
	}
}

func primaryWriteFaultTrial(t *testing.T, tl *stresstest.Tally, mode volume.Mode, seed uint64) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 11))
	p, b := newFaultyMemberN(t, "a"), newFaultyMemberN(t, "b")
	startPair(t, p, b, mode)
	log := newAckLog()
	onBoth := func(off int64, data []byte, err error) {
		t.Helper()
		if err == nil && mode == volume.ModeSync && !holds(b.st, data, off) {
			tl.Violated.Add(1)
			t.Errorf("seed %d: sync write at %d acknowledged but not on the backup (invariant 2)", seed, off)
		}
	}
	const span = 4 << 20 // writes land in the first 4 MiB so they hit the bad range often
	for range 40 {
		off, data, err := log.randomWrite(ctx, p.v, rng, 0, span, rng.IntN(4) == 0)
		if err != nil {
			t.Fatalf("seed %d: write before any fault: %v", seed, err)
		}
		onBoth(off, data, err)
	}

	// A bad range: writes touching it fail with EIO, the others succeed.
	bad := rng.Int64N(span/region-4) * region
	badLen := int64(1+rng.IntN(4)) * region
	p.f.FailWritesAt(bad, badLen)
	overlaps := func(off, n int64) bool { return off < bad+badLen && bad < off+n }
	hit := 0
	for i := 0; i < 200 || hit == 0; i++ {
		off, data, err := log.randomWrite(ctx, p.v, rng, 0, span, rng.IntN(4) == 0)
		switch {
		case overlaps(off, int64(len(data))):
			hit++
			if !errors.Is(err, syscall.EIO) {
				tl.Violated.Add(1)
				t.Fatalf("seed %d: write at [%d, +%d) over the bad range [%d, +%d): err %v, want EIO", seed, off, len(data), bad, badLen, err)
			}
		case err != nil:
			tl.Violated.Add(1)
			t.Fatalf("seed %d: write at [%d, +%d) away from the bad range failed: %v", seed, off, len(data), err)
		}
		onBoth(off, data, err)
	}
	if st := p.v.Status(); !strings.Contains(st.LastError, "input/output error") || !strings.Contains(st.LastError, "local Write") {
		tl.Violated.Add(1)
		t.Errorf("seed %d: status.LastError %q does not report the local write error", seed, st.LastError)
	}
	if err := log.op(ctx, p.v, "trim", nil, bad, ackBlock, false); !errors.Is(err, syscall.EIO) {
		t.Errorf("seed %d: trim of the bad range: %v, want EIO", seed, err)
	}
	if err := log.op(ctx, p.v, "zero", nil, bad, ackBlock, false); !errors.Is(err, syscall.EIO) {
		t.Errorf("seed %d: write-zeroes of the bad range: %v, want EIO", seed, err)
	}

	// The whole disk fails.
	p.f.FailWrites()
	for range 10 {
		if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, false); !errors.Is(err, syscall.EIO) {
			tl.Violated.Add(1)
			t.Fatalf("seed %d: write to a failed disk: %v, want EIO", seed, err)
		}
	}
	p.f.Heal()

	// fsync fails: FUA writes and flushes report it.
	p.f.FailSync()
	if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, true); !errors.Is(err, syscall.EIO) {
		tl.Violated.Add(1)
		t.Fatalf("seed %d: FUA write with a failing fsync: %v, want EIO", seed, err)
	}
	if err := p.v.Flush(ctx); !errors.Is(err, syscall.EIO) {
		tl.Violated.Add(1)
		t.Fatalf("seed %d: flush with a failing fsync: %v, want EIO", seed, err)
	}
	if st := p.v.Status(); !strings.Contains(st.LastError, "sync") {
		t.Errorf("seed %d: status.LastError %q does not report the failed sync", seed, st.LastError)
	}
	tl.Faults.Add(p.f.Failures(store.OpWrite) + p.f.Failures(store.OpPunch) + p.f.Failures(store.OpZero) + p.f.Failures(store.OpSync))
	p.f.Heal()

	// Healed: the pair goes on and converges.
	for range 40 {
		off, data, err := log.randomWrite(ctx, p.v, rng, 0, size, rng.IntN(4) == 0)
		if err != nil {
			t.Fatalf("seed %d: write after healing: %v", seed, err)
		}
		onBoth(off, data, err)
	}
	waitFor(t, "in sync after healing", inSync(p.member, b.member))
	if d := uncoveredDiff(t, p, b); len(d) > 0 {
		tl.Violated.Add(1)
		t.Errorf("seed %d: regions %v differ between the replicas with a clear bit (invariant 3)", seed, d)
	}
	if n := log.lost(t, "primary", p.st) + log.lost(t, "backup", b.st); n > 0 {
		tl.Violated.Add(int64(n))
	}
	same(t, p.member, b.member)
	t.Logf("seed %d: %d writes acknowledged, %d failed with EIO; injected %d write and %d sync faults",
		seed, log.acked, log.failed, p.f.Failures(store.OpWrite)+p.f.Failures(store.OpPunch)+p.f.Failures(store.OpZero), p.f.Failures(store.OpSync))
}

// TestDiskFaultBackupApply: the backup cannot apply the stream (EIO or
// ENOSPC on its writes, EIO on its fsync). It refuses the stream with a
// Nack; the primary reports the peer disconnected and goes on alone: async
// with the bitmap tracking every region the backup lacks, sync holding
// writes until the peer is recorded Outdated (invariant 2). After healing
// the resync makes both identical and nothing acknowledged is missing on
// the backup.
func TestDiskFaultBackupApply(t *testing.T) {
	faults := []struct {
		name    string
		inject  func(*store.Faulty)
		errText string
	}{
		{"EIO", (*store.Faulty).FailWrites, "input/output error"},
		{"ENOSPC", func(f *store.Faulty) { f.SetNoSpace(true) }, "no space left on device"},
		{"FsyncEIO", (*store.Faulty).FailSync, "input/output error"},
	}
	for _, mode := range faultModes {
		for _, fc := range faults {
			t.Run(string(mode)+"/"+fc.name, func(t *testing.T) {
				tl := stresstest.NewTally(t, "disk-faults")
				for trial := range stresstest.Trials(1) {
					seed := stresstest.Seed(1)*1000 + uint64(trial)
					backupFaultTrial(t, tl, mode, fc.inject, fc.errText, seed)
					tl.Trials.Add(1)
				}
			})
		}
	}
}

func backupFaultTrial(t *testing.T, tl *stresstest.Tally, mode volume.Mode, inject func(*store.Faulty), errText string, seed uint64) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 12))
	p, b := newFaultyMemberN(t, "a"), newFaultyMemberN(t, "b")
	startPair(t, p, b, mode)
	log := newAckLog()
	for range 30 {
		off, data, err := log.randomWrite(ctx, p.v, rng, 0, size, rng.IntN(4) == 0)
		if err != nil {
			t.Fatal(err)
		}
		if mode == volume.ModeSync && !holds(b.st, data, off) {
			tl.Violated.Add(1)
			t.Errorf("seed %d: sync write at %d acknowledged but not on the backup", seed, off)
		}
	}
	waitFor(t, "in sync before the fault", inSync(p.member, b.member))
	reconnects := p.v.Status().Counters.Reconnects

	inject(b.f)
	if mode == volume.ModeSync {
		// The first write the backup cannot apply is held, not
		// acknowledged, until the controller records the peer Outdated.
		done := make(chan error, 1)
		go func() {
			_, _, err := log.randomWrite(ctx, p.v, rng, 0, size, true)
			done <- err
		}()
		held := time.Time{}
		for deadline := time.Now().Add(20 * time.Second); ; {
			select {
			case err := <-done:
				tl.Violated.Add(1)
				t.Fatalf("seed %d: sync write completed (err %v) while the backup could not apply it and before the peer was recorded Outdated (invariant 2)", seed, err)
			case <-time.After(10 * time.Millisecond):
			}
			if held.IsZero() && p.v.Status().WaitingForPeerOutdated > 0 {
				held = time.Now()
			}
			if !held.IsZero() && time.Since(held) > 300*time.Millisecond {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("seed %d: sync write neither held nor completed", seed)
			}
		}
		if st := p.v.Status(); st.Writable != true {
			t.Fatalf("seed %d: primary not writable while holding: %+v", seed, st)
		}
		if err := p.v.PeerOutdated(1); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("seed %d: held sync write failed after peer-outdated: %v", seed, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("seed %d: held sync write not released after peer-outdated", seed)
		}
	}
	// Writes go on (alone); the backup refuses the stream and says why.
	for range 60 {
		if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, rng.IntN(4) == 0); err != nil {
			tl.Violated.Add(1)
			t.Fatalf("seed %d: primary write while the backup's disk fails: %v", seed, err)
		}
	}
	testkit.Eventually(t, 20*time.Second, "backup reports its disk error", func() bool {
		return strings.Contains(b.v.Status().LastError, errText)
	})
	testkit.Eventually(t, 20*time.Second, "primary reports the peer disconnected", func() bool {
		return !p.v.Status().PeerConnected
	})
	// The primary logs why the link went down once the session has ended,
	// a moment after PeerConnected turned false.
	if testkit.Wait(5*time.Second, "the error in the primary's log", func() bool { return strings.Contains(p.logs.String(), errText) }) != nil {
		t.Errorf("seed %d: the primary's log does not give the backup's reason %q", seed, errText)
	}
	if d := uncoveredDiff(t, p, b); len(d) > 0 {
		tl.Violated.Add(1)
		t.Errorf("seed %d: regions %v lack on the backup but are clear in the primary's bitmap (invariant 3)", seed, d)
	}
	_ = testkit.Wait(5*time.Second, "a reconnect", func() bool { return p.v.Status().Counters.Reconnects > reconnects })
	if st := p.v.Status(); st.OutOfSyncRegions == 0 || st.Counters.Reconnects == reconnects {
		t.Errorf("seed %d: primary status after the backup's refusal: %+v", seed, st)
	}
	tl.Faults.Add(b.f.Failures(store.OpWrite) + b.f.Failures(store.OpZero) + b.f.Failures(store.OpSync))

	b.f.Heal()
	for range 20 {
		if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, false); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "resync after healing", inSync(p.member, b.member))
	if n := log.lost(t, "backup", b.st); n > 0 {
		tl.Violated.Add(int64(n))
	}
	same(t, p.member, b.member)
	t.Logf("seed %d %s: backup failed %d writes and %d syncs; primary reconnected %d times; %d writes acknowledged",
		seed, mode, b.f.Failures(store.OpWrite)+b.f.Failures(store.OpZero), b.f.Failures(store.OpSync), p.v.Status().Counters.Reconnects-reconnects, log.acked)
}

// TestDiskFaultSlowBackupFsync: a backup whose fsync takes 30 ms. Sync-mode
// FUA writes are acknowledged only once the backup's data is durable, so
// each takes at least that long; nothing times out and the data is right.
func TestDiskFaultSlowBackupFsync(t *testing.T) {
	const delay = 30 * time.Millisecond
	tl := stresstest.NewTally(t, "disk-faults")
	for trial := range stresstest.Trials(1) {
		ctx := context.Background()
		rng := rand.New(rand.NewPCG(stresstest.Seed(1)*1000+uint64(trial), 13))
		p, b := newFaultyMemberN(t, "a"), newFaultyMemberN(t, "b")
		startPair(t, p, b, volume.ModeSync)
		b.f.SetSyncDelay(delay)
		log := newAckLog()
		fastest := time.Hour
		for i := range 60 {
			fua := i%2 == 0
			start := time.Now()
			off, data, err := log.randomWrite(ctx, p.v, rng, 0, size, fua)
			if err != nil {
				t.Fatal(err)
			}
			if fua {
				fastest = min(fastest, time.Since(start))
			}
			if !holds(b.st, data, off) {
				tl.Violated.Add(1)
				t.Errorf("sync write at %d acknowledged but not on the backup", off)
			}
		}
		if fastest < delay {
			tl.Violated.Add(1)
			t.Errorf("a sync FUA write was acknowledged in %v, before the backup's %v fsync could finish", fastest, delay)
		}
		if err := p.v.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		tl.Faults.Add(b.f.Calls(store.OpSync))
		b.f.Heal()
		waitFor(t, "in sync", inSync(p.member, b.member))
		if st := p.v.Status(); st.Counters.Reconnects != 0 {
			t.Errorf("slow fsync broke the link %d times", st.Counters.Reconnects)
		}
		if n := log.lost(t, "backup", b.st); n > 0 {
			tl.Violated.Add(int64(n))
		}
		same(t, p.member, b.member)
		tl.Trials.Add(1)
		t.Logf("slow fsync: fastest sync FUA write %v with a %v backup fsync", fastest, delay)
	}
}

// TestDiskFaultRead: EIO on reads of a bad range of the primary. The
// client's read fails with EIO and the status says so; reads elsewhere,
// writes, and another volume on the same disk set go on. A resync that
// cannot read a region it must copy leaves the backup Inconsistent (never
// promotable) and retries; after healing it completes.
func TestDiskFaultRead(t *testing.T) {
	tl := stresstest.NewTally(t, "disk-faults")
	for trial := range stresstest.Trials(1) {
		ctx := context.Background()
		rng := rand.New(rand.NewPCG(stresstest.Seed(1)*1000+uint64(trial), 14))
		p, b := newFaultyMemberN(t, "a"), newFaultyMemberN(t, "b")
		op, ob := newFaultyMember(t, "a", "ns/other"), newFaultyMember(t, "b", "ns/other")
		startPair(t, p, b, volume.ModeAsync)
		startPair(t, op, ob, volume.ModeSync)
		log, olog := newAckLog(), newAckLog()
		for range 40 {
			if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, false); err != nil {
				t.Fatal(err)
			}
		}
		bad := rng.Int64N(size/region-2) * region
		p.f.FailReadsAt(bad, region)
		buf := make([]byte, 8192)
		for i := range 50 {
			off := rng.Int64N(size/ackBlock-2) * ackBlock
			if i == 0 {
				off = bad + region/2
			}
			err := p.v.ReadAt(ctx, buf, off)
			hitBad := off < bad+region && bad < off+int64(len(buf))
			switch {
			case hitBad && !errors.Is(err, syscall.EIO):
				tl.Violated.Add(1)
				t.Fatalf("read of the bad range at %d: %v, want EIO", off, err)
			case !hitBad && err != nil:
				tl.Violated.Add(1)
				t.Fatalf("read at %d away from the bad range: %v", off, err)
			case !hitBad && !holds(p.st, buf, off):
				t.Fatalf("read at %d returned wrong data", off)
			}
			// The other volume is not affected.
			if _, _, err := olog.randomWrite(ctx, op.v, rng, 0, size, true); err != nil {
				t.Fatalf("the other volume failed a write: %v", err)
			}
			if err := op.v.ReadAt(ctx, buf, off); err != nil {
				t.Fatalf("the other volume failed a read: %v", err)
			}
		}
		if st := p.v.Status(); !strings.Contains(st.LastError, "input/output error") || !st.Writable {
			t.Errorf("after read errors: lastError %q writable %v", st.LastError, st.Writable)
		}
		// Writes to the bad range still work (only reads fail).
		for range 20 {
			if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, false); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, "in sync with read errors on the primary", inSync(p.member, b.member))

		// A resync that cannot read a region it must copy.
		if err := b.v.Apply(volume.Spec{Role: volume.RoleNone, Epoch: 2}); err != nil {
			t.Fatal(err)
		}
		if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync}); err != nil {
			t.Fatal(err)
		}
		for range 40 {
			if _, _, err := log.randomWrite(ctx, p.v, rng, 0, size, false); err != nil {
				t.Fatal(err)
			}
		}
		if err := log.op(ctx, p.v, "write", bytes.Repeat([]byte{0xee}, ackBlock), bad, ackBlock, false); err != nil {
			t.Fatal(err)
		}
		before := make([]byte, size)
		if _, err := b.st.ReadAt(before, 0); err != nil {
			t.Fatal(err)
		}
		if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
			t.Fatal(err)
		}
		if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 20*time.Second, "resync read error reported", func() bool {
			return strings.Contains(p.v.Status().LastError, "resync read of region")
		})
		time.Sleep(200 * time.Millisecond)
		// Invariant 4: once any copied region has landed, the backup is
		// Inconsistent until the copy completes, and refuses promotion. (If
		// the first read failed before anything was sent, it still holds its
		// old, consistent image.) The data is read before the state: the
		// backup persists Inconsistent before it applies the first copy.
		now := make([]byte, size)
		if _, err := b.st.ReadAt(now, 0); err != nil {
			t.Fatal(err)
		}
		st := b.v.Status()
		partial := !bytes.Equal(before, now)
		switch {
		case partial && st.DataState != volume.Inconsistent:
			tl.Violated.Add(1)
			t.Errorf("backup holds part of an unfinished resync but is %s, want Inconsistent (invariant 4)", st.DataState)
		case st.DataState == volume.Inconsistent:
			if err := b.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 3}); err == nil {
				tl.Violated.Add(1)
				t.Fatal("an Inconsistent backup accepted promotion (invariant 4)")
			}
		}
		t.Logf("resync stopped by a read error: backup %s, partial copy landed: %v", st.DataState, partial)
		tl.Faults.Add(p.f.Failures(store.OpRead))
		p.f.Heal()
		waitFor(t, "resync after healing", inSync(p.member, b.member))
		if n := log.lost(t, "backup", b.st) + olog.lost(t, "other backup", ob.st); n > 0 {
			tl.Violated.Add(int64(n))
		}
		same(t, p.member, b.member)
		same(t, op.member, ob.member)
		tl.Trials.Add(1)
	}
}

// tornStore writes only the first half of a write and then fails it with
// EIO while tear is set: a real disk may leave a failed write partly done.
type tornStore struct {
	store.Store
	tear atomic.Bool
}

func (s *tornStore) WriteAt(p []byte, off int64) (int, error) {
	if s.tear.Load() {
		n, _ := s.Store.WriteAt(p[:len(p)/2], off)
		return n, fmt.Errorf("torn write at %d: %w", off, syscall.EIO)
	}
	return s.Store.WriteAt(p, off)
}

// TestDiskFaultTornPrimaryWrite: a write that fails on the primary's disk
// after changing part of the range. The client gets EIO; the replicas must
// still end identical, i.e. the region the failed write touched must be
// resynced.
//
// Before the fix (hack/stress/findings.md, fixed item 6) the engine marked
// nothing dirty when the local write failed, so the backup kept the old bytes
// and the primary the half-written ones for ever.
func TestDiskFaultTornPrimaryWrite(t *testing.T) {
	tl := stresstest.NewTally(t, "disk-faults")
	for _, mode := range faultModes {
		ctx := context.Background()
		mem := store.NewMem(size)
		ts := &tornStore{Store: mem}
		m := &member{st: mem, logs: &syncBuf{}}
		log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
		v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: t.TempDir(), Size: size, RegionSize: region,
			Store: ts, CheckpointInterval: 100 * time.Millisecond, Log: log})
		if err != nil {
			t.Fatal(err)
		}
		m.v = v
		p := &fmember{member: m, nodeName: "a"}
		b := newFaultyMemberN(t, "b")
		startPair(t, p, b, mode)
		if err := v.WriteAt(ctx, bytes.Repeat([]byte{1}, region), 3*region, true); err != nil {
			t.Fatal(err)
		}
		ts.tear.Store(true)
		if err := v.WriteAt(ctx, bytes.Repeat([]byte{2}, region), 3*region, true); !errors.Is(err, syscall.EIO) {
			t.Fatalf("torn write: %v, want EIO", err)
		}
		ts.tear.Store(false)
		tl.Faults.Add(1)
		if err := v.WriteAt(ctx, bytes.Repeat([]byte{3}, ackBlock), 9*region, true); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		waitFor(t, "in sync", inSync(p.member, b.member))
		if d := uncoveredDiff(t, p, b); len(d) > 0 {
			tl.Violated.Add(1)
			t.Errorf("%s: after a torn write the replicas differ in regions %v that the primary's bitmap does not cover: no resync will ever repair them", mode, d)
		}
		// In sync with a clean bitmap: the resync copied the torn region.
		same(t, p.member, b.member)
		tl.Trials.Add(1)
		v.Close()
	}
}
