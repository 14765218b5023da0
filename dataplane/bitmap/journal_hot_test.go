package bitmap

import (
	"os"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
)

// TestJournalKeepHotCarries: with KeepHot, an extent written during a
// generation stays marked in the next one (no group commit after the
// checkpoint), survives a crash through the new log, and leaves the log once
// a whole generation passes without a write to it.
func TestJournalKeepHotCarries(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	j.KeepHot(true)
	mark(t, j, 10*MiB, 4*KiB) // A
	if err := j.Checkpoint(roaring.New()); err != nil {
		t.Fatal(err)
	}
	s1 := j.Stats()
	if s1.Carried != 1 || s1.Extents != 1 {
		t.Fatalf("after the first checkpoint: %+v, want 1 extent carried", s1)
	}
	mark(t, j, 10*MiB+8*KiB, 4*KiB) // A again: carried, so no I/O
	if s2 := j.Stats(); s2.Records != s1.Records || s2.Fsyncs != s1.Fsyncs {
		t.Fatalf("Mark of a carried extent did I/O: before %+v after %+v", s1, s2)
	}
	// The tracker says nothing is dirty, but A was written in this
	// generation: a crash must still recover A's extent.
	if err := j.Checkpoint(roaring.New()); err != nil {
		t.Fatal(err)
	}
	crash(t, j)
	j, rec := openT(t, dir)
	wantEqual(t, "carried extent after a crash", rec, extentRegionsOf(g, 10*MiB, 4*KiB))

	// No writes for a generation: A goes (two checkpoints: one retires the
	// carried set, one drops it from the checkpoint).
	j.KeepHot(true)
	mark(t, j, 10*MiB, 4*KiB)
	for range 3 {
		if err := j.Checkpoint(roaring.New()); err != nil {
			t.Fatal(err)
		}
	}
	if s := j.Stats(); s.Extents != 0 || s.RetiredExtents != 0 {
		t.Fatalf("idle generations kept extents: %+v", s)
	}
	crash(t, j)
	j, rec = openT(t, dir)
	defer j.Close(nil)
	if !rec.IsEmpty() {
		t.Fatalf("cold extent still recovered: %v", head(rec))
	}
}

// TestJournalKeepHotMarkAhead: a sequential writer entering an unmarked
// extent right after a marked one marks a window ahead in the same commit,
// and keeps it marked ahead without waiting.
func TestJournalKeepHotMarkAhead(t *testing.T) {
	j, _ := openT(t, t.TempDir())
	defer j.Close(nil)
	j.KeepHot(true)
	for off := int64(0); off < 64*MiB; off += 256 * KiB {
		mark(t, j, off, 256*KiB)
	}
	s := j.Stats()
	// 64 extents of 1 MiB: without marking ahead every extent costs a
	// waiting Mark; with it, only the few the writer catches up with.
	if s.Batched > 16 || s.Ahead == 0 {
		t.Fatalf("sequential marks of 64 MiB: %+v, want ≤ 16 that waited", s)
	}
	// Random writes in the middle of an extent do not mark ahead.
	ahead := s.Ahead
	mark(t, j, 500*MiB+512*KiB, 4*KiB)
	if got := j.Stats().Ahead; got != ahead {
		t.Fatalf("a write in the middle of an extent marked %d ahead", got-ahead)
	}
}

// TestJournalKeepHotTornCarry: the carried record is appended
// after the new log's header is durable; a torn carry record is ignored.
func TestJournalKeepHotTornCarry(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	j.KeepHot(true)
	mark(t, j, 3*MiB, 4*KiB)
	if err := j.Checkpoint(roaring.New()); err != nil {
		t.Fatal(err)
	}
	gen := j.Stats().Generation
	crash(t, j)
	// Tear the carry record of the newest log: recovery still has the
	// checkpoint, which covers the retired generation in full.
	path := dir + "/" + logName(gen)
	if err := truncateBy(path, 4); err != nil {
		t.Fatal(err)
	}
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantSuperset(t, "torn carry record", rec, extentRegionsOf(g, 3*MiB, 4*KiB))
}

func truncateBy(path string, n int64) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	return os.Truncate(path, fi.Size()-n)
}
