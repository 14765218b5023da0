package volume_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// journalDisk stands for the disk under a replica's write-intent journal:
// while full, every journal write and sync fails with ENOSPC.
type journalDisk struct{ full atomic.Bool }

func (d *journalDisk) hook(bitmap.FaultOp) error {
	if d.full.Load() {
		return syscall.ENOSPC
	}
	return nil
}

// TestDiskFaultJournalTransientENOSPC: the primary's
// write-intent journal hits a transient ENOSPC. While it lasts, writes to
// extents not already marked fail with EIO (never acknowledged), Status says
// the member is not writable and why, and Fault is set (the agent stops
// renewing the authority). Once the disk has space again, writes to new
// extents succeed without a restart, Status is writable again, and the pair
// converges with every acknowledged write on both members.
func TestDiskFaultJournalTransientENOSPC(t *testing.T) {
	for _, mode := range faultModes {
		t.Run(string(mode), func(t *testing.T) {
			tl := stresstest.NewTally(t, "disk-faults")
			for range stresstest.Trials(1) {
				tl.Trials.Add(1)
				tl.Faults.Add(1)
				journalENOSPCTrial(t, mode)
				if t.Failed() {
					return
				}
			}
		})
	}
}

func journalENOSPCTrial(t *testing.T, mode volume.Mode) {
	const extent = 4 << 20 // the default write-intent extent
	ctx := context.Background()
	p, b := newFaultyMemberN(t, "a"), newFaultyMemberN(t, "b")
	startPair(t, p, b, mode)
	disk := &journalDisk{}
	p.v.SetJournalFaultHook(disk.hook)
	log := newAckLog()
	block := func(b byte) []byte {
		buf := make([]byte, ackBlock)
		for i := range buf {
			buf[i] = b
		}
		return buf
	}
	if err := log.op(ctx, p.v, "write", block(1), 0, ackBlock, false); err != nil {
		t.Fatalf("write before the fault: %v", err)
	}

	disk.full.Store(true)
	// Extent 2 was never written: its Mark needs the log.
	err := log.op(ctx, p.v, "write", block(2), 2*extent, ackBlock, false)
	if !errors.Is(err, syscall.EIO) || errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write to a new extent with the journal's disk full: %v, want EIO (not ENOSPC: the volume is not full)", err)
	}
	st := p.v.Status()
	if st.Writable || !strings.Contains(st.Reason, "write-intent journal failed") || !strings.Contains(st.Reason, "no space left on device") {
		t.Fatalf("status while the journal fails: writable %v, reason %q; want not writable because of the journal", st.Writable, st.Reason)
	}
	if !strings.Contains(st.LastError, "no space left on device") {
		t.Errorf("status.LastError %q does not give the journal's error", st.LastError)
	}
	if err := p.v.Fault(); err == nil {
		t.Fatal("Fault() = nil while the journal fails")
	}
	// Still failing after a while (backoff and checkpoints retry).
	time.Sleep(300 * time.Millisecond)
	if err := log.op(ctx, p.v, "write", block(3), 3*extent, ackBlock, false); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write to a new extent while the disk is still full: %v, want EIO", err)
	}
	if st := p.v.Status(); st.Writable {
		t.Fatalf("status writable while the journal's disk is still full: %+v", st)
	}

	disk.full.Store(false)
	// Recovers by itself: a retried write to a new extent succeeds.
	testkit.Eventually(t, 20*time.Second, "a write to a new extent after the disk has space again", func() bool {
		return log.op(ctx, p.v, "write", block(4), 2*extent+ackBlock, ackBlock, false) == nil
	})
	if err := log.op(ctx, p.v, "write", block(5), 3*extent+ackBlock, ackBlock, true); err != nil {
		t.Fatalf("second write after recovery: %v", err)
	}
	if st := p.v.Status(); !st.Writable || p.v.Fault() != nil {
		t.Fatalf("after recovery: writable %v, reason %q, fault %v", st.Writable, st.Reason, p.v.Fault())
	}
	waitFor(t, "in sync after recovery", inSync(p.member, b.member))
	if d := uncoveredDiff(t, p, b); len(d) > 0 {
		t.Errorf("regions %v differ with a clear bit (invariant 3)", d)
	}
	if n := log.lost(t, "primary", p.st) + log.lost(t, "backup", b.st); n > 0 {
		t.Errorf("%d acknowledged blocks lost", n)
	}
	same(t, p.member, b.member)
}

// TestJournalFaultRecoversIdle: a journal that failed on the one write to a
// volume that is otherwise idle recovers once the disk has space again,
// with no write to drive the reopen (an expired authority, for one, keeps
// writes from reaching the journal): the checkpoint loop keeps trying.
func TestJournalFaultRecoversIdle(t *testing.T) {
	m := newFaultyMemberN(t, "a")
	if err := m.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	disk := &journalDisk{}
	m.v.SetJournalFaultHook(disk.hook)
	buf := make([]byte, ackBlock)
	if err := m.v.WriteAt(context.Background(), buf, 0, false); err != nil {
		t.Fatal(err)
	}
	// Let the checkpoints (every 100 ms) retire the marked extent: the
	// journal is idle, nothing marked.
	time.Sleep(time.Second)

	disk.full.Store(true)
	if err := m.v.WriteAt(context.Background(), buf, 8<<20, false); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write to a new extent with the journal's disk full: %v, want EIO", err)
	}
	time.Sleep(500 * time.Millisecond) // several checkpoint rounds fail
	if m.v.Fault() == nil {
		t.Fatal("no fault while the journal's disk is full")
	}
	disk.full.Store(false)
	testkit.Eventually(t, 10*time.Second, "the journal to recover without writes", func() bool { return m.v.Fault() == nil })
	if st := m.v.Status(); !st.Writable {
		t.Fatalf("not writable after the journal recovered: %q", st.Reason)
	}
	if err := m.v.WriteAt(context.Background(), buf, 12<<20, false); err != nil {
		t.Fatalf("write to a new extent after recovery: %v", err)
	}
}
