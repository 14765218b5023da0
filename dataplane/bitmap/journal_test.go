package bitmap

import (
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/go-logr/logr"
	"github.com/go-logr/logr/testr"
)

// Test geometry: 1 GiB + 100 KiB volume, 64 KiB regions, 1 MiB extents
// (16 regions per extent; the last extent is short: 2 regions, the last of
// them 36 KiB).
const (
	tSize   = 1*GiB + 100*KiB
	tRegion = 64 * KiB
	tExtent = 1 * MiB
)

func openT(t testing.TB, dir string) (*Journal, *roaring.Bitmap) {
	t.Helper()
	j, rec, err := OpenJournal(dir, tSize, tRegion, tExtent, testLogger(t))
	if err != nil {
		t.Fatalf("OpenJournal: %v", err)
	}
	return j, rec
}

func testLogger(t testing.TB) logr.Logger {
	if tt, ok := t.(*testing.T); ok {
		return testr.NewWithOptions(tt, testr.Options{Verbosity: 1})
	}
	return logr.Discard()
}

// crash abandons j as a process crash would: no checkpoint, no cleanup.
// Group commits already handed to the flusher complete first (their Marks
// could have returned before a real crash too).
func crash(t testing.TB, j *Journal) {
	t.Helper()
	j.mu.Lock()
	j.closing = true
	j.cond.Broadcast()
	j.mu.Unlock()
	<-j.flusherDone
	if j.f != nil {
		j.f.Close()
	}
	j.lockF.Close()
}

// extentRegionsOf returns every region of every extent touching [off, off+n).
func extentRegionsOf(g *geometry, off, n int64) *roaring.Bitmap {
	bm := roaring.New()
	first, last, ok := g.extentRange(off, n)
	if !ok {
		return bm
	}
	for e := first; e <= last; e++ {
		lo, hi := g.extentRegions(e)
		bm.AddRange(lo, hi)
	}
	return bm
}

func mustGeo(t testing.TB) *geometry {
	g, err := newGeometry(tSize, tRegion, tExtent)
	if err != nil {
		t.Fatal(err)
	}
	return &g
}

func mark(t testing.TB, j *Journal, off, n int64) {
	t.Helper()
	if err := j.Mark(context.Background(), off, n); err != nil {
		t.Fatalf("Mark(%d, %d): %v", off, n, err)
	}
}

func wantEqual(t testing.TB, what string, got, want *roaring.Bitmap) {
	t.Helper()
	if !got.Equals(want) {
		extra := roaring.AndNot(got, want)
		missing := roaring.AndNot(want, got)
		t.Fatalf("%s: got %d regions, want %d; missing %v; extra %v", what, got.GetCardinality(), want.GetCardinality(),
			head(missing), head(extra))
	}
}

func wantSuperset(t testing.TB, what string, got, want *roaring.Bitmap) {
	t.Helper()
	if missing := roaring.AndNot(want, got); !missing.IsEmpty() {
		t.Fatalf("%s: %d regions missing (under-report): %v", what, missing.GetCardinality(), head(missing))
	}
}

func head(b *roaring.Bitmap) []uint32 {
	a := b.ToArray()
	return a[:min(len(a), 10)]
}

func TestJournalFresh(t *testing.T) {
	dir := t.TempDir()
	j, rec := openT(t, dir)
	if !rec.IsEmpty() {
		t.Fatalf("fresh journal recovered %d regions", rec.GetCardinality())
	}
	for _, name := range []string{checkpointName, logName(1), lockName} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Fatalf("after open: %v", err)
		}
	}
	if err := j.Close(roaring.New()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, logName(1))); !os.IsNotExist(err) {
		t.Fatalf("log 1 still there after Close: %v", err)
	}
	j, rec = openT(t, dir)
	defer j.Close(nil)
	if !rec.IsEmpty() {
		t.Fatalf("clean reopen recovered %d regions", rec.GetCardinality())
	}
}

func TestJournalMarkCrashRecover(t *testing.T) {
	g := mustGeo(t)
	tests := []struct {
		name   string
		writes [][2]int64
	}{
		{"single", [][2]int64{{5 * MiB, 4 * KiB}}},
		{"spansExtents", [][2]int64{{3*MiB - 4*KiB, 8 * KiB}}},
		{"large", [][2]int64{{100 * MiB, 10 * MiB}}},
		{"lastShortExtent", [][2]int64{{tSize - 1, 1}}},
		{"many", [][2]int64{{0, 1}, {7 * MiB, 4 * KiB}, {7*MiB + 8*KiB, 4 * KiB}, {512 * MiB, 1 * MiB}, {tSize - 200*KiB, 200 * KiB}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			j, _ := openT(t, dir)
			want := roaring.New()
			for _, w := range tc.writes {
				mark(t, j, w[0], w[1])
				want.Or(extentRegionsOf(g, w[0], w[1]))
			}
			crash(t, j)
			j, rec := openT(t, dir)
			wantEqual(t, "recovered", rec, want)
			// Recovery persisted itself: a second crash recovers the same.
			crash(t, j)
			j, rec = openT(t, dir)
			defer j.Close(nil)
			wantEqual(t, "recovered twice", rec, want)
		})
	}
}

func TestJournalMarkValidation(t *testing.T) {
	j, _ := openT(t, t.TempDir())
	defer j.Close(nil)
	ctx := context.Background()
	if err := j.Mark(ctx, 0, 0); err != nil {
		t.Fatalf("zero-length Mark: %v", err)
	}
	for _, w := range [][2]int64{{-1, 10}, {0, -1}, {tSize, 1}, {tSize - 1, 2}, {1, 1<<63 - 1}} {
		if err := j.Mark(ctx, w[0], w[1]); err == nil {
			t.Fatalf("Mark(%d, %d) outside the volume succeeded", w[0], w[1])
		}
	}
	if s := j.Stats(); s.Records != 0 {
		t.Fatalf("invalid Marks wrote %d records", s.Records)
	}
}

func TestJournalFastPath(t *testing.T) {
	j, _ := openT(t, t.TempDir())
	defer j.Close(nil)
	mark(t, j, 10*MiB, 4*KiB)
	s1 := j.Stats()
	if s1.Records != 1 || s1.Batched != 1 {
		t.Fatalf("first Mark: %+v", s1)
	}
	mark(t, j, 10*MiB+512*KiB, 64*KiB) // same extent
	s2 := j.Stats()
	if s2.Records != 1 || s2.FastMarks != 1 || s2.Fsyncs != s1.Fsyncs || s2.Bytes != s1.Bytes {
		t.Fatalf("second Mark of a marked extent did I/O: before %+v after %+v", s1, s2)
	}
	// After a checkpoint the set starts empty: the extent is marked again.
	if err := j.Checkpoint(roaring.New()); err != nil {
		t.Fatal(err)
	}
	mark(t, j, 10*MiB, 4*KiB)
	if s3 := j.Stats(); s3.Records != 2 || s3.Generation != s1.Generation+1 {
		t.Fatalf("Mark after Checkpoint: %+v", s3)
	}
}

// TestJournalCheckpointUnion: recovery = checkpoint ∪ marks since, and a
// checkpoint covers the generation it retires but not older ones.
func TestJournalCheckpointUnion(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)

	mark(t, j, 1*MiB, 4*KiB) // A, generation 1
	x := roaring.BitmapOf(1000, 2000, 3000)
	if err := j.Checkpoint(x); err != nil {
		t.Fatal(err)
	}
	if !x.Equals(roaring.BitmapOf(1000, 2000, 3000)) {
		t.Fatal("Checkpoint modified its argument")
	}
	mark(t, j, 50*MiB, 4*KiB) // B, generation 2
	crash(t, j)

	j, rec := openT(t, dir)
	want := roaring.Or(x, extentRegionsOf(g, 1*MiB, 4*KiB))
	want.Or(extentRegionsOf(g, 50*MiB, 4*KiB))
	wantEqual(t, "checkpoint + marks", rec, want)

	// The caller's tracker now says only region 2000 is dirty. Open wrote
	// rec as a checkpoint; mark C and checkpoint twice: everything but 2000
	// and C's extent (retired by the last checkpoint) must go away.
	mark(t, j, 70*MiB, 4*KiB) // C
	y := roaring.BitmapOf(2000)
	if err := j.Checkpoint(y); err != nil {
		t.Fatal(err)
	}
	if err := j.Checkpoint(y); err != nil {
		t.Fatal(err)
	}
	crash(t, j)
	j, rec = openT(t, dir)
	defer j.Close(nil)
	wantEqual(t, "after shrinking checkpoints", rec, y)
	if s := j.Stats(); s.CheckpointBytes == 0 || s.Checkpoints != 1 {
		t.Fatalf("stats after open: %+v", s)
	}
}

func TestJournalCheckpointRetiresOneGeneration(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 1*MiB, 4*KiB)
	if err := j.Checkpoint(nil); err != nil { // nil: tracker empty
		t.Fatal(err)
	}
	crash(t, j)
	j, rec := openT(t, dir)
	wantEqual(t, "first checkpoint keeps the retired extents", rec, extentRegionsOf(g, 1*MiB, 4*KiB))
	if err := j.Checkpoint(nil); err != nil {
		t.Fatal(err)
	}
	crash(t, j)
	j, rec = openT(t, dir)
	defer j.Close(nil)
	if !rec.IsEmpty() {
		t.Fatalf("second checkpoint: recovered %v, want empty", head(rec))
	}
}

func TestJournalCheckpointRejectsOutOfRange(t *testing.T) {
	j, _ := openT(t, t.TempDir())
	defer j.Close(nil)
	if err := j.Checkpoint(roaring.BitmapOf(mustGeo(t).regions)); err == nil {
		t.Fatal("Checkpoint with a region beyond the volume succeeded")
	}
}

func TestJournalCloseExact(t *testing.T) {
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 1*MiB, 4*KiB)
	mark(t, j, 9*MiB, 4*KiB)
	final := roaring.BitmapOf(144) // the 9 MiB write is not acked
	if err := j.Close(final); err != nil {
		t.Fatal(err)
	}
	if err := j.Mark(context.Background(), 0, 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("Mark after Close = %v, want ErrClosed", err)
	}
	if err := j.Checkpoint(nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Checkpoint after Close = %v, want ErrClosed", err)
	}
	if err := j.Close(nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close = %v, want ErrClosed", err)
	}
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantEqual(t, "after clean close", rec, final)
}

func TestJournalCloseNilKeepsLogs(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 1*MiB, 4*KiB)
	if err := j.Close(nil); err != nil {
		t.Fatal(err)
	}
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantEqual(t, "after Close(nil)", rec, extentRegionsOf(g, 1*MiB, 4*KiB))
}

func TestJournalLocked(t *testing.T) {
	dir := t.TempDir()
	j, _ := openT(t, dir)
	if _, _, err := OpenJournal(dir, tSize, tRegion, tExtent, logr.Discard()); err == nil {
		t.Fatal("second OpenJournal of an open journal succeeded")
	}
	if err := ResetJournal(dir); err == nil {
		t.Fatal("ResetJournal of an open journal succeeded")
	}
	j.Close(nil)
}

func TestJournalGeometryMismatch(t *testing.T) {
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 0, 1)
	crash(t, j)
	for _, tc := range []struct {
		name                 string
		size, region, extent int64
	}{
		{"regionSize", tSize, 2 * tRegion, tExtent},
		{"extentSize", tSize, tRegion, 2 * tExtent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := OpenJournal(dir, tc.size, tc.region, tc.extent, logr.Discard())
			if !errors.Is(err, ErrGeometry) || errors.Is(err, ErrCorrupt) {
				t.Fatalf("OpenJournal with different %s = %v, want ErrGeometry", tc.name, err)
			}
		})
	}
	// The refusals changed nothing.
	j, rec := openT(t, dir)
	defer j.Close(nil)
	if !rec.Contains(0) {
		t.Fatal("journal damaged by refused opens")
	}
}

func TestJournalDefaultExtent(t *testing.T) {
	j, _, err := OpenJournal(t.TempDir(), 1*GiB, 64*KiB, 0, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close(nil)
	if j.ExtentSize() != DefaultExtentSize {
		t.Fatalf("default extent = %d", j.ExtentSize())
	}
	if _, _, err := OpenJournal(t.TempDir(), 1*GiB, 64*KiB, 96*KiB, logr.Discard()); err == nil {
		t.Fatal("extent size 96 KiB accepted")
	}
}

// logPath returns the single intent log in dir.
func logPath(t *testing.T, dir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "intent-*.log"))
	if len(m) != 1 {
		t.Fatalf("want one log, have %v", m)
	}
	return m[0]
}

func appendFile(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// prepareLog opens a journal, marks two ranges (two records) and crashes. It
// returns the directory, the log path, its generation and the expected
// recovery.
func prepareLog(t *testing.T) (dir, path string, gen uint64, want *roaring.Bitmap) {
	g := mustGeo(t)
	dir = t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 2*MiB, 4*KiB)
	mark(t, j, 30*MiB, 4*KiB)
	gen = j.Stats().Generation
	crash(t, j)
	want = roaring.Or(extentRegionsOf(g, 2*MiB, 4*KiB), extentRegionsOf(g, 30*MiB, 4*KiB))
	return dir, logPath(t, dir), gen, want
}

func TestJournalTornTail(t *testing.T) {
	tests := []struct {
		name string
		tail func(gen uint64) []byte
	}{
		{"partialRecord", func(gen uint64) []byte {
			rec := appendRecord(nil, gen, []extentRun{{first: 500, n: 3}})
			return rec[:len(rec)-5]
		}},
		{"partialHeader", func(gen uint64) []byte {
			return appendRecord(nil, gen, []extentRun{{first: 500, n: 3}})[:7]
		}},
		{"lengthOnly", func(gen uint64) []byte {
			rec := appendRecord(nil, gen, []extentRun{{first: 500, n: 3}})
			clear(rec[8:])
			return rec
		}},
		{"badCRCLast", func(gen uint64) []byte {
			rec := appendRecord(nil, gen, []extentRun{{first: 500, n: 3}})
			rec[len(rec)-1] ^= 0xff
			return rec
		}},
		{"badCRCThenZeros", func(gen uint64) []byte {
			rec := appendRecord(nil, gen, []extentRun{{first: 500, n: 3}})
			rec[len(rec)-1] ^= 0xff
			return append(rec, make([]byte, 4096)...)
		}},
		{"zeroTail", func(uint64) []byte { return make([]byte, 8192) }},
		{"recordOfOtherGeneration", func(gen uint64) []byte {
			return appendRecord(nil, gen+7, []extentRun{{first: 500, n: 3}}) // CRC binds gen
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, path, gen, want := prepareLog(t)
			appendFile(t, path, tc.tail(gen))
			j, rec := openT(t, dir)
			defer j.Close(nil)
			wantEqual(t, "recovered", rec, want)
		})
	}
}

func TestJournalValidTailRecordCounts(t *testing.T) {
	// Control for TestJournalTornTail: the same record, intact, is recovered.
	g := mustGeo(t)
	dir, path, gen, want := prepareLog(t)
	appendFile(t, path, appendRecord(nil, gen, []extentRun{{first: 500, n: 3}}))
	j, rec := openT(t, dir)
	defer j.Close(nil)
	for e := uint32(500); e < 503; e++ {
		lo, hi := g.extentRegions(e)
		want.AddRange(lo, hi)
	}
	wantEqual(t, "recovered", rec, want)
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if off < 0 {
		off += int64(len(data))
	}
	data[off] ^= 0x40
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestJournalCorrupt(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, dir, path string, gen uint64)
	}{
		{"recordCRCInMiddle", func(t *testing.T, dir, path string, gen uint64) {
			flipByte(t, path, logHeaderLen+recHeaderLen+8) // first record's payload; a second record follows
		}},
		{"recordLengthComplement", func(t *testing.T, dir, path string, gen uint64) {
			flipByte(t, path, logHeaderLen) // L of the first record
		}},
		{"recordHugeLength", func(t *testing.T, dir, path string, gen uint64) {
			data, _ := os.ReadFile(path)
			binary.LittleEndian.PutUint32(data[logHeaderLen:], 1<<30)
			binary.LittleEndian.PutUint32(data[logHeaderLen+4:], ^uint32(1<<30))
			os.WriteFile(path, data, 0o600)
		}},
		{"recordZeroedInMiddle", func(t *testing.T, dir, path string, gen uint64) {
			data, _ := os.ReadFile(path)
			clear(data[logHeaderLen : logHeaderLen+recHeaderLen])
			os.WriteFile(path, data, 0o600)
		}},
		{"recordExtentOutOfRange", func(t *testing.T, dir, path string, gen uint64) {
			appendFile(t, path, appendRecord(nil, gen, []extentRun{{first: mustGeo(t).extents - 1, n: 2}}))
		}},
		{"logHeaderCRC", func(t *testing.T, dir, path string, gen uint64) {
			flipByte(t, path, 20)
		}},
		{"logHeaderWrongGeneration", func(t *testing.T, dir, path string, gen uint64) {
			os.WriteFile(path, appendLogHeader(nil, gen+5, mustGeo(t)), 0o600)
		}},
		{"logMissing", func(t *testing.T, dir, path string, gen uint64) {
			os.Remove(path)
		}},
		{"logGap", func(t *testing.T, dir, path string, gen uint64) {
			hdr := appendLogHeader(nil, gen+2, mustGeo(t))
			os.WriteFile(filepath.Join(dir, logName(gen+2)), hdr, 0o600)
		}},
		{"checkpointPayload", func(t *testing.T, dir, path string, gen uint64) {
			flipByte(t, filepath.Join(dir, checkpointName), -1)
		}},
		{"checkpointHeader", func(t *testing.T, dir, path string, gen uint64) {
			flipByte(t, filepath.Join(dir, checkpointName), 17)
		}},
		{"checkpointTruncated", func(t *testing.T, dir, path string, gen uint64) {
			p := filepath.Join(dir, checkpointName)
			data, _ := os.ReadFile(p)
			os.WriteFile(p, data[:len(data)-1], 0o600)
		}},
		{"checkpointEmptyFile", func(t *testing.T, dir, path string, gen uint64) {
			os.WriteFile(filepath.Join(dir, checkpointName), nil, 0o600)
		}},
		{"checkpointMissingWithRecords", func(t *testing.T, dir, path string, gen uint64) {
			os.Remove(filepath.Join(dir, checkpointName))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, path, gen, _ := prepareLog(t)
			tc.damage(t, dir, path, gen)
			j, _, err := OpenJournal(dir, tSize, tRegion, tExtent, logr.Discard())
			if !errors.Is(err, ErrCorrupt) {
				if j != nil {
					j.Close(nil)
				}
				t.Fatalf("OpenJournal = %v, want ErrCorrupt", err)
			}
			// The documented way out: reset, reopen empty.
			if err := ResetJournal(dir); err != nil {
				t.Fatal(err)
			}
			j, rec := openT(t, dir)
			defer j.Close(nil)
			if !rec.IsEmpty() {
				t.Fatalf("after reset: %d regions", rec.GetCardinality())
			}
		})
	}
}

// TestJournalInterruptedRotation simulates crashes inside rotate: a torn
// newest log header, an extra newer empty log, a stale temp checkpoint and a
// stale log older than the checkpoint.
func TestJournalInterruptedRotation(t *testing.T) {
	tests := []struct {
		name string
		do   func(t *testing.T, dir string, gen uint64)
	}{
		{"tornNewLogHeader", func(t *testing.T, dir string, gen uint64) {
			os.WriteFile(filepath.Join(dir, logName(gen+1)), appendLogHeader(nil, gen+1, mustGeo(t))[:30], 0o600)
		}},
		{"zeroNewLogHeader", func(t *testing.T, dir string, gen uint64) {
			os.WriteFile(filepath.Join(dir, logName(gen+1)), make([]byte, logHeaderLen), 0o600)
		}},
		{"emptyNewLog", func(t *testing.T, dir string, gen uint64) {
			os.WriteFile(filepath.Join(dir, logName(gen+1)), nil, 0o600)
		}},
		{"completeNewLog", func(t *testing.T, dir string, gen uint64) {
			os.WriteFile(filepath.Join(dir, logName(gen+1)), appendLogHeader(nil, gen+1, mustGeo(t)), 0o600)
		}},
		{"staleTempCheckpoint", func(t *testing.T, dir string, gen uint64) {
			os.WriteFile(filepath.Join(dir, checkpointTmp), []byte("half a checkpoint"), 0o600)
		}},
		{"staleOldLog", func(t *testing.T, dir string, gen uint64) {
			// Garbage in a log the checkpoint covers is never read.
			os.WriteFile(filepath.Join(dir, logName(gen-1)), []byte("garbage garbage garbage garbage garbage garbage garbage garbage"), 0o600)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, _, gen, want := prepareLog(t)
			tc.do(t, dir, gen)
			j, rec := openT(t, dir)
			wantEqual(t, "recovered", rec, want)
			gotGen := j.Stats().Generation
			if err := j.Close(nil); err != nil {
				t.Fatal(err)
			}
			left, _ := filepath.Glob(filepath.Join(dir, "intent-*.log"))
			if len(left) != 1 || filepath.Base(left[0]) != logName(gotGen) {
				t.Fatalf("logs left after open: %v, want only %s", left, logName(gotGen))
			}
		})
	}
}

func TestJournalTornHeaderOnlyForNewest(t *testing.T) {
	dir, path, _, _ := prepareLog(t)
	os.WriteFile(path, make([]byte, 20), 0o600) // checkpoint's own log torn: impossible
	if _, _, err := OpenJournal(dir, tSize, tRegion, tExtent, logr.Discard()); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("OpenJournal = %v, want ErrCorrupt", err)
	}
}

func TestJournalFirstOpenCrash(t *testing.T) {
	// A crash during the very first open can leave a log and no checkpoint;
	// nothing was marked yet, so that is a fresh journal.
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, logName(1)), appendLogHeader(nil, 1, mustGeo(t)), 0o600)
	j, rec := openT(t, dir)
	defer j.Close(nil)
	if !rec.IsEmpty() || j.Stats().Generation != 2 {
		t.Fatalf("recovered %d regions, generation %d", rec.GetCardinality(), j.Stats().Generation)
	}
}

// TestJournalGroupCommit: many concurrent Markers share fsyncs. The first
// group commit is held in fdatasync until every other Marker has queued, so
// exactly two records must be written.
func TestJournalGroupCommit(t *testing.T) {
	const markers = 64
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	var once sync.Once
	j.beforeSync = func() {
		once.Do(func() {
			deadline := time.Now().Add(10 * time.Second)
			for j.Stats().Batched < markers && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
		})
	}
	want := roaring.New()
	var wg sync.WaitGroup
	errs := make(chan error, markers)
	for i := 0; i < markers; i++ {
		off := int64(i) * 3 * tExtent
		want.Or(extentRegionsOf(g, off, 4*KiB))
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- j.Mark(context.Background(), off, 4*KiB)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	s := j.Stats()
	t.Logf("stats: %+v", s)
	if s.Batched != markers || s.Records > 2 {
		t.Fatalf("%d Markers: %d batched, %d records (log fsyncs), want %d and <= 2", markers, s.Batched, s.Records, markers)
	}
	crash(t, j)
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantEqual(t, "recovered", rec, want)
}

// TestJournalGroupCommitFree: without any hook, concurrent Markers on a real
// disk still need fewer fsyncs than Marks.
func TestJournalGroupCommitFree(t *testing.T) {
	const markers, each = 16, 20
	j, _ := openT(t, t.TempDir())
	defer j.Close(nil)
	var wg sync.WaitGroup
	for i := 0; i < markers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for k := 0; k < each; k++ {
				off := int64(i*each+k) * tExtent
				if err := j.Mark(context.Background(), off, 4*KiB); err != nil {
					t.Error(err)
					return
				}
			}
		}(i)
	}
	wg.Wait()
	s := j.Stats()
	t.Logf("%d marks, %d records", s.Batched, s.Records)
	if s.Batched != markers*each || s.Records >= s.Batched {
		t.Fatalf("no batching: %+v", s)
	}
}

func TestJournalMarkContextCancel(t *testing.T) {
	dir := t.TempDir()
	j, _ := openT(t, dir)
	release := make(chan struct{})
	entered := make(chan struct{})
	var once sync.Once
	j.beforeSync = func() {
		once.Do(func() { close(entered); <-release })
	}
	go j.Mark(context.Background(), 0, 1) // occupies the flusher
	<-entered
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := j.Mark(ctx, 10*MiB, 1)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Mark with expired ctx = %v, want DeadlineExceeded", err)
	}
	close(release)
	// The abandoned extent is still written by the next group commit.
	mark(t, j, 10*MiB, 1)
	if err := j.Close(nil); err != nil {
		t.Fatal(err)
	}
}

// TestJournalAppendFailureFailsNewExtents: after a failed append, Marks of
// new extents fail (during the backoff) while extents marked before keep
// their fast path, and a crash then recovers every extent marked before.
func TestJournalAppendFailureFailsNewExtents(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 0, 1)
	j.mu.Lock()
	j.f.Close() // the next append fails with EBADF, like a dying disk
	j.mu.Unlock()
	if err := j.Mark(context.Background(), 20*MiB, 1); err == nil {
		t.Fatal("Mark on a failed log succeeded")
	}
	if err := j.Err(); err == nil {
		t.Fatal("Err() = nil after a failed append")
	}
	if err := j.Mark(context.Background(), 40*MiB, 1); err == nil {
		t.Fatal("second Mark on a failed log (within the backoff) succeeded")
	}
	if err := j.Mark(context.Background(), 0, 1); err != nil {
		t.Fatalf("fast-path Mark of an extent durably marked before the failure: %v", err)
	}
	crash(t, j)
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantSuperset(t, "recovered", rec, extentRegionsOf(g, 0, 1))
}

// diskFull is a fault hook standing for a full (or failing) disk: while on,
// every journal operation of the kinds in ops fails with err.
type diskFull struct {
	on  atomic.Bool
	ops map[FaultOp]bool
	err error
	hit atomic.Int64
}

func newDiskFull(err error, ops ...FaultOp) *diskFull {
	d := &diskFull{ops: map[FaultOp]bool{}, err: err}
	for _, op := range ops {
		d.ops[op] = true
	}
	return d
}

func (d *diskFull) hook(op FaultOp) error {
	if d.on.Load() && d.ops[op] {
		d.hit.Add(1)
		return d.err
	}
	return nil
}

// allOps is every operation a full disk fails.
var allOps = []FaultOp{FaultAppend, FaultSync, FaultCreateLog, FaultCheckpoint}

// TestJournalRecoversAfterTransientFault: a transient ENOSPC (or an fsync
// EIO) fails the journal; Marks of new extents fail while it lasts, Err
// says why; once the disk works again a Mark after the backoff reopens the
// log and succeeds, without reopening the Journal. A crash afterwards
// recovers every extent whose Mark succeeded, before, during and after the
// fault, and a Checkpoint later retires the failed log.
func TestJournalRecoversAfterTransientFault(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		ops  []FaultOp
		want string
	}{
		{"ENOSPC", syscall.ENOSPC, allOps, "no space left on device"},
		// Every fsync fails: appends, new logs and checkpoints.
		{"FsyncEIO", syscall.EIO, []FaultOp{FaultSync, FaultCreateLog, FaultCheckpoint}, "input/output error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, hot := range []bool{false, true} {
				g := mustGeo(t)
				dir := t.TempDir()
				j, _ := openT(t, dir)
				j.KeepHot(hot)
				d := newDiskFull(tc.err, tc.ops...)
				j.SetFaultHook(d.hook)
				ctx := context.Background()
				marked := roaring.New()
				markOK := func(off int64) {
					t.Helper()
					mark(t, j, off, 1)
					marked.Or(extentRegionsOf(g, off, 1))
				}
				markOK(0)
				markOK(3 * MiB)

				d.on.Store(true)
				err := j.Mark(ctx, 10*MiB, 1)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Mark of a new extent on a full disk: %v, want an error saying %q", err, tc.want)
				}
				if err := j.Err(); err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Err() = %v while the disk is full, want %q", err, tc.want)
				}
				// Already marked extents stay usable: their marks are durable.
				markOK(0)
				// Past the backoff the reopen is tried and fails again.
				time.Sleep(2 * minRetryDelay)
				if err := j.Mark(ctx, 12*MiB, 1); err == nil {
					t.Fatal("Mark of a new extent succeeded while the disk is still full")
				}

				d.on.Store(false) // the disk has space again
				deadline := time.Now().Add(10 * time.Second)
				for {
					err := j.Mark(ctx, 20*MiB, 1)
					if err == nil {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("journal did not recover after the fault cleared: %v", err)
					}
					time.Sleep(10 * time.Millisecond)
				}
				marked.Or(extentRegionsOf(g, 20*MiB, 1))
				if err := j.Err(); err != nil {
					t.Fatalf("Err() = %v after recovering", err)
				}
				markOK(30 * MiB)
				markOK(10 * MiB) // the extent whose Mark failed
				// The append failed, then a reopen on the full disk.
				if st := j.Stats(); st.Reopens != 1 || st.Failures < 2 {
					t.Fatalf("stats after recovering: %+v, want 1 reopen after at least 2 failures", st)
				}

				// A crash now recovers every extent marked before, during and
				// after the fault.
				crash(t, j)
				j, rec := openT(t, dir)
				wantSuperset(t, "recovered after a crash following recovery", rec, marked)

				// Once more with a checkpoint after the recovery: the failed
				// log is retired and the later marks still survive a crash.
				j.SetFaultHook(d.hook)
				markOK(50 * MiB)
				d.on.Store(true)
				if err := j.Mark(ctx, 60*MiB, 1); err == nil {
					t.Fatal("Mark of a new extent on a full disk succeeded")
				}
				d.on.Store(false)
				time.Sleep(2 * minRetryDelay)
				markOK(70 * MiB)
				if err := j.Checkpoint(nil); err != nil {
					t.Fatal(err)
				}
				markOK(80 * MiB)
				crash(t, j)
				j, rec = openT(t, dir)
				// The checkpoint was given nil, so it only covers the retired
				// generations' extents: those marked since the first reopen.
				wantSuperset(t, "recovered after checkpointing past a failed log", rec,
					roaring.Or(roaring.Or(extentRegionsOf(g, 50*MiB, 1), extentRegionsOf(g, 70*MiB, 1)), extentRegionsOf(g, 80*MiB, 1)))
				if logs := logFiles(t, dir); len(logs) != 1 {
					t.Errorf("logs after checkpoint and reopen: %v, want one", logs)
				}
				j.Close(nil)
			}
		})
	}
}

// logFiles lists the intent logs in dir.
func logFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if _, ok := parseLogName(e.Name()); ok {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestJournalRecoversWithTornFailedAppend: the failed append left part of
// its record in the old log (a short write on a full disk). After the
// journal reopened the log and marked more, a crash still recovers cleanly:
// the torn record is the old log's last, never followed by data.
func TestJournalRecoversWithTornFailedAppend(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 0, 1)
	d := newDiskFull(syscall.ENOSPC, FaultAppend)
	j.SetFaultHook(d.hook)
	d.on.Store(true)
	j.mu.Lock()
	oldGen, oldOff := j.gen, j.off
	j.mu.Unlock()
	if err := j.Mark(context.Background(), 9*MiB, 1); err == nil {
		t.Fatal("Mark succeeded on a full disk")
	}
	// What a short write would have left: the first half of the record.
	rec := appendRecord(nil, oldGen, []extentRun{{first: 9, n: 1}})
	f, err := os.OpenFile(filepath.Join(dir, logName(oldGen)), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(rec[:len(rec)/2], oldOff); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d.on.Store(false)
	time.Sleep(2 * minRetryDelay)
	mark(t, j, 5*MiB, 1)
	mark(t, j, 7*MiB, 1)
	crash(t, j)
	j, rec2 := openT(t, dir)
	defer j.Close(nil)
	wantSuperset(t, "recovered", rec2, roaring.Or(roaring.Or(extentRegionsOf(g, 0, 1), extentRegionsOf(g, 5*MiB, 1)), extentRegionsOf(g, 7*MiB, 1)))
}

// TestJournalFaultConcurrentMarks: many writers mark while the disk fills
// and empties again, and a checkpointer runs; no Mark that returned nil is
// lost by a crash, and the journal ends up healthy.
func TestJournalFaultConcurrentMarks(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	j.KeepHot(true)
	d := newDiskFull(syscall.ENOSPC, allOps...)
	j.SetFaultHook(d.hook)
	tr := NewTracker(tSize, tRegion)
	var mu sync.RWMutex
	var mmu sync.Mutex
	marked := roaring.New()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // checkpointer; its failures while the disk is full are expected
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(3 * time.Millisecond):
			}
			mu.Lock()
			snap := tr.Dirty()
			mu.Unlock()
			_ = j.Checkpoint(snap)
		}
	}()
	var failed atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int64N(tSize - 4*KiB)
				mu.RLock()
				tr.MarkRegions(extentRegionsOf(g, off, 4*KiB))
				err := j.Mark(context.Background(), off, 4*KiB)
				if err == nil {
					mmu.Lock()
					marked.Or(extentRegionsOf(g, off, 4*KiB))
					mmu.Unlock()
				} else {
					failed.Add(1)
				}
				mu.RUnlock()
				if rng.IntN(50) == 0 {
					mu.Lock()
					tr.Clear() // the peer caught up: later checkpoints shrink
					mmu.Lock()
					marked.Clear()
					mmu.Unlock()
					mu.Unlock()
				}
			}
		}(w)
	}
	for i := 0; i < 6; i++ {
		time.Sleep(30 * time.Millisecond)
		d.on.Store(i%2 == 0)
	}
	d.on.Store(false)
	// Healthy again within the backoff.
	deadline := time.Now().Add(10 * time.Second)
	for j.Err() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("journal still failed after the disk healed: %v", j.Err())
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if failed.Load() == 0 || d.hit.Load() == 0 {
		t.Fatalf("no fault was hit (failed marks %d, faults %d)", failed.Load(), d.hit.Load())
	}
	crash(t, j)
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantSuperset(t, "recovered", rec, marked)
	t.Logf("%d marks failed, %d faults injected, recovered %d regions", failed.Load(), d.hit.Load(), rec.GetCardinality())
}

// TestJournalCheckpointFailureCarries: when writing a checkpoint fails, the
// retired generation's extents must survive into the next checkpoint.
func TestJournalCheckpointFailureCarries(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	mark(t, j, 5*MiB, 1)
	tmp := filepath.Join(dir, checkpointTmp)
	if err := os.Mkdir(tmp, 0o700); err != nil { // checkpoint.tmp cannot be created
		t.Fatal(err)
	}
	if err := j.Checkpoint(nil); err == nil {
		t.Fatal("Checkpoint succeeded with checkpoint.tmp a directory")
	}
	os.Remove(tmp)
	mark(t, j, 7*MiB, 1) // in the new generation
	if err := j.Checkpoint(nil); err != nil {
		t.Fatal(err)
	}
	crash(t, j)
	j, rec := openT(t, dir)
	defer j.Close(nil)
	want := roaring.Or(extentRegionsOf(g, 5*MiB, 1), extentRegionsOf(g, 7*MiB, 1))
	wantEqual(t, "recovered", rec, want)
}

// TestJournalConcurrentCheckpoint marks from several goroutines, following
// the documented order (tracker bit, then Mark), while another goroutine
// checkpoints the tracker; after a crash every marked region is recovered.
func TestJournalConcurrentCheckpoint(t *testing.T) {
	g := mustGeo(t)
	dir := t.TempDir()
	j, _ := openT(t, dir)
	tr := NewTracker(tSize, tRegion)
	var clearMu sync.RWMutex // Clear excludes marks in progress, like a real "peer caught up"
	var mu sync.Mutex
	marked := roaring.New() // regions whose Mark returned
	stop := make(chan struct{})
	var cpWG sync.WaitGroup
	cpWG.Add(1)
	go func() {
		defer cpWG.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := j.Checkpoint(tr.Dirty()); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 3))
			for i := 0; i < 150; i++ {
				off := rng.Int64N(tSize - 4*KiB)
				clearMu.RLock()
				tr.MarkRegions(extentRegionsOf(g, off, 4*KiB)) // no ack ever comes
				if err := j.Mark(context.Background(), off, 4*KiB); err != nil {
					clearMu.RUnlock()
					t.Error(err)
					return
				}
				mu.Lock()
				marked.Or(extentRegionsOf(g, off, 4*KiB))
				mu.Unlock()
				clearMu.RUnlock()
				if i%10 == 0 {
					clearMu.Lock()
					tr.Clear() // the peer caught up: later checkpoints shrink
					marked.Clear()
					clearMu.Unlock()
				}
			}
		}(w)
	}
	wg.Wait()
	close(stop)
	cpWG.Wait()
	crash(t, j)
	j, rec := openT(t, dir)
	defer j.Close(nil)
	wantSuperset(t, "recovered", rec, marked)
	if s := rec.GetCardinality(); s == 0 {
		t.Fatal("nothing recovered")
	}
}

func TestParseLogName(t *testing.T) {
	for _, tc := range []struct {
		name string
		gen  uint64
		ok   bool
	}{
		{logName(0x1f), 0x1f, true},
		{logName(1<<64 - 1), 1<<64 - 1, true},
		{"intent-1f.log", 0, false},
		{"intent-000000000000001g.log", 0, false},
		{"intent-000000000000001f.log.tmp", 0, false},
		{"checkpoint", 0, false},
	} {
		gen, ok := parseLogName(tc.name)
		if ok != tc.ok || gen != tc.gen {
			t.Errorf("parseLogName(%q) = %d, %v", tc.name, gen, ok)
		}
	}
	names := []string{logName(10), logName(9), logName(0x100)}
	slices.Sort(names)
	if names[0] != logName(9) || names[2] != logName(0x100) {
		t.Errorf("log names do not sort by generation: %v", names)
	}
}
