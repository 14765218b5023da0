package bitmap

import (
	"syscall"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/go-logr/logr"
)

func TestTrackerGrow(t *testing.T) {
	tr := NewTracker(1*MiB, 64*KiB)
	tr.Mark(0, 4096, 1)
	if err := tr.Grow(512 * KiB); err == nil {
		t.Fatal("Tracker.Grow to a smaller size succeeded")
	}
	tr.Mark(1*MiB, 4096, 2) // past the old end: ignored
	if tr.Count() != 1 {
		t.Fatalf("a mark past the end was tracked: %d regions", tr.Count())
	}
	if err := tr.Grow(2*MiB + 100); err != nil {
		t.Fatal(err)
	}
	if tr.Regions() != 33 || tr.Size() != 2*MiB+100 {
		t.Fatalf("grown tracker: %d regions of a %d-byte volume, want 33 of %d", tr.Regions(), tr.Size(), 2*MiB+100)
	}
	if tr.Count() != 1 || !tr.IsDirty(0) {
		t.Fatal("growing changed the dirty regions")
	}
	tr.Mark(2*MiB, 100, 3)
	if !tr.IsDirty(32) {
		t.Fatal("a write to the grown space is not tracked")
	}
	tr.Acked(3)
	if tr.Count() != 0 {
		t.Fatalf("after the acks %d regions dirty", tr.Count())
	}
}

// TestJournalOpenAtOtherSize: files of another volume size (before or after
// a grow) are read; regions past the opening size are dropped.
func TestJournalOpenAtOtherSize(t *testing.T) {
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 0, 1)
	mark(t, j, tSize-1, 1)
	crash(t, j)
	g := mustGeo(t)
	want := extentRegionsOf(g, 0, 1)
	want.Or(extentRegionsOf(g, tSize-1, 1))

	j, rec, err := OpenJournal(dir, 2*tSize, tRegion, tExtent, logr.Discard())
	if err != nil {
		t.Fatalf("opening at a larger size: %v", err)
	}
	// The extent holding the old end now covers its regions past it too.
	lg, err := newGeometry(2*tSize, tRegion, tExtent)
	if err != nil {
		t.Fatal(err)
	}
	want.Or(extentRegionsOf(&lg, tSize-1, 1))
	wantEqual(t, "at a larger size", rec, want)
	crash(t, j) // its checkpoint now has the larger size

	j, rec, err = OpenJournal(dir, tSize/2, tRegion, tExtent, logr.Discard())
	if err != nil {
		t.Fatalf("opening a larger volume's journal at a smaller size: %v", err)
	}
	wantEqual(t, "at a smaller size", rec, extentRegionsOf(g, 0, 1))
	j.Close(nil)
}

// TestJournalGrowKillPoints grows a journal and kills it at every step of
// Journal.Grow (before the new log, after the new log but before the
// checkpoint, after everything): reopened at the old size or the new one, it
// recovers every region marked before, and after a completed grow every
// region marked past the old end.
func TestJournalGrowKillPoints(t *testing.T) {
	const newSize = 2*tSize + 8*KiB
	g := mustGeo(t)
	ng, err := newGeometry(newSize, tRegion, tExtent)
	if err != nil {
		t.Fatal(err)
	}
	for _, kill := range []struct {
		name string
		op   FaultOp
		ok   bool
	}{
		{"before the new log", FaultCreateLog, false},
		{"before the checkpoint", FaultCheckpoint, false},
		{"after the grow", 0, true},
	} {
		t.Run(kill.name, func(t *testing.T) {
			for _, reopen := range []int64{tSize, newSize} {
				dir := t.TempDir()
				j, _ := openT(t, dir)
				j.KeepHot(true)
				tr := NewTracker(tSize, tRegion)
				tr.MarkRegions(roaring.BitmapOf(5))
				if err := j.Checkpoint(tr.Dirty()); err != nil {
					t.Fatal(err)
				}
				mark(t, j, 3*MiB, 1)
				want := roaring.BitmapOf(5)
				want.Or(extentRegionsOf(g, 3*MiB, 1))
				if !kill.ok {
					op := kill.op
					j.SetFaultHook(func(o FaultOp) error {
						if o == op {
							return syscall.EIO
						}
						return nil
					})
				}
				err := j.Grow(newSize, tr.Dirty())
				if kill.ok != (err == nil) {
					t.Fatalf("Grow = %v", err)
				}
				if kill.ok {
					if j.Size() != newSize {
						t.Fatalf("grown journal tracks %d bytes", j.Size())
					}
					mark(t, j, tSize+4*KiB, 1)
					if reopen == newSize {
						want.Or(extentRegionsOf(&ng, tSize+4*KiB, 1))
					}
				}
				crash(t, j)
				j, rec, err := OpenJournal(dir, reopen, tRegion, tExtent, logr.Discard())
				if err != nil {
					t.Fatalf("reopening at %d bytes: %v", reopen, err)
				}
				wantSuperset(t, "recovered", rec, want)
				j.Close(nil)
			}
		})
	}
}

func TestJournalGrowRefusesShrink(t *testing.T) {
	j, _ := openT(t, t.TempDir())
	defer j.Close(nil)
	if err := j.Grow(tSize-1, nil); err == nil {
		t.Fatal("Grow to a smaller size succeeded")
	}
	if err := j.Grow(tSize+1, roaring.BitmapOf(uint32(tSize/tRegion)+1)); err == nil {
		t.Fatal("Grow with a bitmap past the old end succeeded")
	}
}
