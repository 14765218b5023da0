package volume_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

const grownSize = 2*size + 3*region + 4096 // a short last region

// sameStores: both stores have the same size and contents, region by region.
func sameStores(t *testing.T, a, b *member) {
	t.Helper()
	n := a.st.Size()
	if b.st.Size() != n {
		t.Fatalf("store sizes differ: %s %d, %s %d", a.node, n, b.node, b.st.Size())
	}
	x, y := make([]byte, region), make([]byte, region)
	for off := int64(0); off < n; off += region {
		l := min(region, n-off)
		if _, err := a.st.ReadAt(x[:l], off); err != nil {
			t.Fatal(err)
		}
		if _, err := b.st.ReadAt(y[:l], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x[:l], y[:l]) {
			t.Fatalf("replicas differ in region %d", off/region)
		}
	}
}

// growWriter writes random blocks over the whole current size of v until
// stopped, checking every write succeeds; it counts the writes past
// oldEnd.
type growWriter struct {
	stop    chan struct{}
	done    chan struct{}
	err     atomic.Value
	n, past atomic.Int64
}

func startWriter(v *volume.Volume, oldEnd int64, seed uint64) *growWriter {
	w := &growWriter{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		rng := rand.New(rand.NewPCG(seed, 7))
		buf := make([]byte, 32<<10)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			sz := v.Size()
			l := 512 * (1 + rng.IntN(64))
			off := rng.Int64N((sz-int64(l))/512) * 512
			for i := range buf[:l] {
				buf[i] = byte(rng.Uint32())
			}
			if err := v.WriteAt(context.Background(), buf[:l], off, rng.IntN(10) == 0); err != nil {
				w.err.Store(err)
				return
			}
			w.n.Add(1)
			if off+int64(l) > oldEnd {
				w.past.Add(1)
			}
		}
	}()
	return w
}

func (w *growWriter) finish(t *testing.T) {
	t.Helper()
	close(w.stop)
	<-w.done
	if err, _ := w.err.Load().(error); err != nil {
		t.Fatalf("a write failed while the volume grew: %v", err)
	}
}

// TestGrowPairWhileWriting: a writer runs the whole time while the backup
// grows, then the primary; writes in flight are not lost, the grow marks
// nothing dirty by itself, the writes past the old end are replicated like
// any other, and the two replicas end byte-identical at the new size.
func TestGrowPairWhileWriting(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeSync, volume.ModeAsync} {
		t.Run(string(mode), func(t *testing.T) {
			a, b := newMember(t, "a"), newMember(t, "b")
			apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
			apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: "b", PeerAddress: b.addr})
			waitFor(t, "B in sync", inSync(a, b))

			w := startWriter(a.v, size, 11)
			waitFor(t, "writes before the grow", func() bool { return w.n.Load() > 50 })
			if err := b.v.Grow(grownSize); err != nil {
				t.Fatalf("growing the backup: %v", err)
			}
			if got := b.v.Status().Size; got != grownSize {
				t.Fatalf("backup reports size %d after growing to %d", got, grownSize)
			}
			n := w.n.Load()
			waitFor(t, "writes with the backup grown", func() bool { return w.n.Load() > n+50 })
			if err := a.v.Grow(grownSize); err != nil {
				t.Fatalf("growing the primary: %v", err)
			}
			if got := a.v.Status().Size; got != grownSize {
				t.Fatalf("primary reports size %d after growing to %d", got, grownSize)
			}
			waitFor(t, "writes past the old end", func() bool { return w.past.Load() > 50 })
			w.finish(t)
			waitFor(t, "B in sync after the grow", inSync(a, b))
			if st := b.v.Status(); st.Counters.RejectedFrames != 0 {
				t.Fatalf("the backup refused %d frames or streams", st.Counters.RejectedFrames)
			}
			sameStores(t, a, b)
			for _, m := range []*member{a, b} {
				md := readMeta(t, m)
				if md.Size != grownSize {
					t.Fatalf("%s's metadata says size %d, want %d", m.node, md.Size, grownSize)
				}
			}
		})
	}
}

// TestGrowMarksNothingDirty: growing an idle, in-sync pair leaves both
// bitmaps empty (the new space is zeros everywhere) and needs no copy.
func TestGrowMarksNothingDirty(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr})
	write(t, a.v, rand.New(rand.NewPCG(1, 2)), 50)
	waitFor(t, "B in sync", inSync(a, b))
	copied := a.v.Status().Copy.DoneBytes
	for _, m := range []*member{b, a} {
		if err := m.v.Grow(grownSize); err != nil {
			t.Fatal(err)
		}
		if n := m.v.Status().OutOfSyncRegions; n != 0 {
			t.Fatalf("%s: %d regions out of sync right after the grow", m.node, n)
		}
	}
	got := make([]byte, 4096)
	if _, err := b.st.ReadAt(got, grownSize-4096); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("the grown space does not read as zeros: %v", err)
	}
	waitFor(t, "B in sync", inSync(a, b))
	if a.v.Status().Copy.DoneBytes != copied {
		t.Fatal("the grow started a copy")
	}
	// Growing to the same size again is a no-op.
	if err := a.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
}

// TestGrowPrimaryBeforeBackupIsRefusedUntilBackupGrows: the primary grows
// first (the controller grows backups first; this is the transient case):
// its first write past the backup's end ends the stream, the backup refuses
// the new handshake naming both sizes, the writes past the old end stay
// dirty, and once the backup grows the link comes back and resyncs them,
// regions past the old end included.
func TestGrowPrimaryBeforeBackupIsRefusedUntilBackupGrows(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "B in sync", inSync(a, b))
	if err := a.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	past := bytes.Repeat([]byte{0xa5}, 8192)
	if err := a.v.WriteAt(ctx, past, size+region, false); err != nil {
		t.Fatal(err)
	}
	if err := a.v.WriteAt(ctx, past[:4096], grownSize-4096, false); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the backup refuses the larger primary", func() bool {
		return strings.Contains(b.logs.String(), "size mismatch: primary a has size 33755136, backup b only 16777216")
	})
	if st := a.v.Status(); st.OutOfSyncRegions == 0 || !volume.TrackedHas(a.v, "b", size+region) {
		t.Fatalf("the writes past the backup's end are not dirty: %+v", st)
	}
	write(t, a.v, rand.New(rand.NewPCG(5, 6)), 50) // within the old size, while B is away
	if err := b.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B in sync once grown", inSync(a, b))
	sameStores(t, a, b)
}

// TestGrowLargerBackupAcceptsStream: a backup larger than its primary (it
// grew first, and the link reconnects before the primary grows) accepts the
// stream; after the primary grows, both match.
func TestGrowLargerBackupAcceptsStream(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if err := b.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr})
	write(t, a.v, rand.New(rand.NewPCG(8, 9)), 100)
	waitFor(t, "B in sync while larger", inSync(a, b))
	if err := a.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := a.v.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), grownSize-4096, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B in sync after the grow", inSync(a, b))
	sameStores(t, a, b)
}

// TestGrowRefusals: a smaller size is refused (Grow and Open), as is another
// region size at Open; a grow the store cannot hold leaves the replica at
// its old size and usable, and can be retried.
func TestGrowRefusals(t *testing.T) {
	a := newMember(t, "a")
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync})
	if err := a.v.Grow(size - region); !errors.Is(err, volume.ErrShrink) {
		t.Fatalf("Grow to a smaller size = %v, want ErrShrink", err)
	}
	if a.v.Size() != size {
		t.Fatalf("size %d after a refused shrink", a.v.Size())
	}
	a.v.Close()
	for _, tc := range []struct {
		name        string
		size, rs    int64
		want, want2 string
	}{
		{"smaller", size - region, region, "has size 16777216, larger than the 16711680 asked", "never shrinks"},
		{"region size", size, 2 * region, "region size 65536", "want 16777216 and 131072"},
	} {
		_, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: a.dir, Size: tc.size, RegionSize: tc.rs, Store: a.st})
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.want2) {
			t.Fatalf("%s: Open = %v, want an error with %q and %q", tc.name, err, tc.want, tc.want2)
		}
	}
	if md, err := meta.Read(a.dir); err != nil || md.Size != size {
		t.Fatalf("refused opens changed the metadata: %+v, %v", md, err)
	}

	// A store that cannot grow (EFBIG from the file system).
	f := store.NewFaulty(store.NewMem(size))
	m := openFaulty(t, "f", f)
	apply(t, m, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync})
	f.SetHook(func(op store.Op, off, n int64) error {
		if op == store.OpGrow {
			return syscall.EFBIG
		}
		return nil
	})
	if err := m.v.Grow(grownSize); !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("Grow on a full file system = %v, want EFBIG", err)
	}
	if m.v.Size() != size || readMeta(t, m).Size != size {
		t.Fatal("a failed grow changed the size")
	}
	ctx := context.Background()
	if err := m.v.WriteAt(ctx, make([]byte, 4096), size, false); err == nil {
		t.Fatal("a write past the end succeeded after a failed grow")
	}
	if err := m.v.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), size-4096, true); err != nil {
		t.Fatalf("the replica is not usable after a failed grow: %v", err)
	}
	f.SetHook(nil)
	if err := m.v.Grow(grownSize); err != nil {
		t.Fatalf("retrying the grow: %v", err)
	}
	if err := m.v.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), grownSize-4096, true); err != nil {
		t.Fatal(err)
	}
}

func openFaulty(t *testing.T, node string, f *store.Faulty) *member {
	t.Helper()
	m := &member{logs: &syncBuf{}, dir: t.TempDir(), node: node}
	log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: node, Dir: m.dir, Size: size, RegionSize: region,
		Store: f, CheckpointInterval: 100 * time.Millisecond, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	t.Cleanup(func() { v.Close() })
	return m
}

// TestGrowOnReopen: a replica opened with a larger size than its metadata's
// (an agent restarted with the grown spec) grows: data kept, new space zero,
// dirty bits kept, metadata and status at the new size.
func TestGrowOnReopen(t *testing.T) {
	a := newMember(t, "a")
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync})
	data := bytes.Repeat([]byte{0x3c}, 8192)
	if err := a.v.WriteAt(context.Background(), data, size-8192, true); err != nil {
		t.Fatal(err)
	}
	dirty := a.v.Status().OutOfSyncRegions
	a.v.Close()
	a.st.Reopen()
	a2 := openMemberWith(t, "a", a.dir, a.st, func(o *volume.Options) { o.Size = grownSize })
	if a2.v.Size() != grownSize || a2.v.Status().Size != grownSize || readMeta(t, a2).Size != grownSize {
		t.Fatalf("reopened at %d bytes: size %d, status %d, metadata %d", int64(grownSize), a2.v.Size(), a2.v.Status().Size, readMeta(t, a2).Size)
	}
	if got := a2.v.Status().OutOfSyncRegions; got < dirty || !volume.TrackedHas(a2.v, "", size-8192) {
		t.Fatalf("dirty regions after the grow: %d, want %d including the written one", got, dirty)
	}
	got := make([]byte, 8192)
	if _, err := a2.st.ReadAt(got, size-8192); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data lost by the grow: %v", err)
	}
	if _, err := a2.st.ReadAt(got, grownSize-8192); err != nil || !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatalf("the grown space is not zero: %v", err)
	}
}

// TestGrowKillPoints kills the replica (a file store on disk) after each
// step of Grow, and before the first: reopened at the old size (when the
// metadata was not written yet) or at the new one, it opens, keeps its data
// and every dirty region, reads zeros past the old end, and takes writes
// there once at the new size.
func TestGrowKillPoints(t *testing.T) {
	steps := []string{"", "store", "journal", "meta"}
	for _, kill := range steps {
		for _, reopenAt := range []int64{size, grownSize} {
			if kill == "meta" && reopenAt == size {
				continue // committed: the replica has the new size now
			}
			name := "before-" + "store"
			if kill != "" {
				name = "after-" + kill
			}
			t.Run(name+"/reopen-"+map[int64]string{size: "old", grownSize: "new"}[reopenAt], func(t *testing.T) {
				dir := t.TempDir()
				open := func(sz int64) *volume.Volume {
					v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: dir, Size: sz, RegionSize: region,
						CheckpointInterval: time.Hour, Log: funcr.New(func(p, a string) { t.Log(p, a) }, funcr.Options{})})
					if err != nil {
						t.Fatalf("open at %d bytes: %v", sz, err)
					}
					t.Cleanup(func() { v.Close() })
					return v
				}
				v := open(size)
				if err := v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PairUID: uidA}); err != nil {
					t.Fatal(err)
				}
				ctx := context.Background()
				data := bytes.Repeat([]byte{0x77}, 4096)
				offs := []int64{0, 5 * region, size - 4096}
				for _, off := range offs {
					if err := v.WriteAt(ctx, data, off, false); err != nil {
						t.Fatal(err)
					}
				}
				volume.SetGrowHook(v, func(step string) error {
					if step == kill {
						return errors.New("killed")
					}
					return nil
				})
				if kill != "" {
					if err := v.Grow(grownSize); err == nil {
						t.Fatal("the killed grow succeeded")
					}
				}
				volume.Crash(v)
				v = open(reopenAt)
				if v.Size() != reopenAt {
					t.Fatalf("reopened at %d bytes: size %d", reopenAt, v.Size())
				}
				got := make([]byte, 4096)
				for _, off := range offs {
					if !volume.TrackedHas(v, "", off) {
						t.Fatalf("region of %d lost its dirty bit", off)
					}
					if err := v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PairUID: uidA}); err != nil {
						t.Fatal(err)
					}
					if err := v.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, data) {
						t.Fatalf("data at %d lost: %v", off, err)
					}
				}
				if reopenAt == grownSize {
					if err := v.ReadAt(ctx, got, grownSize-4096); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
						t.Fatalf("the grown space is not zero: %v", err)
					}
					if err := v.WriteAt(ctx, data, grownSize-4096, true); err != nil {
						t.Fatal(err)
					}
					if !volume.TrackedHas(v, "", grownSize-4096) {
						t.Fatal("a write past the old end is not tracked")
					}
				}
			})
		}
	}
}

// TestGrowBackupAwayResyncsPastOldEnd: after the pair grew, the backup's
// agent stops; the writer writes on, past the old end too; the backup comes
// back (its agent restarted with the grown size) and the resync copies
// exactly what it missed, the regions past the old end included.
func TestGrowBackupAwayResyncsPastOldEnd(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "B in sync", inSync(a, b))
	for _, m := range []*member{b, a} {
		if err := m.v.Grow(grownSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees B gone", func() bool { return !a.v.Status().PeerConnected })
	if err := a.v.PeerOutdated(1); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(21, 22))
	buf := make([]byte, 4096)
	model := map[int64]bool{}
	for i := range 40 {
		lo := int64(0)
		if i%2 == 0 {
			lo = size // half of them past the old end
		}
		off := lo + rng.Int64N((grownSize-lo-4096)/4096)*4096
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		if err := a.v.WriteAt(ctx, buf, off, false); err != nil {
			t.Fatalf("write with B away: %v", err)
		}
		model[off/region] = true
	}
	if got := a.v.Status().OutOfSyncRegions; got != uint64(len(model)) {
		t.Fatalf("%d regions out of sync, the model %d", got, len(model))
	}
	b.st.Reopen()
	b = openMemberWith(t, "b", b.dir, b.st, func(o *volume.Options) { o.Size = grownSize })
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	copied := a.v.Status().Copy.CopiedBytesTotal
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "B in sync again", inSync(a, b))
	if n, want := a.v.Status().Copy.CopiedBytesTotal-copied, int64(len(model))*region; n != want {
		t.Fatalf("the resync copied %d bytes, want %d (the regions written while B was away)", n, want)
	}
	sameStores(t, a, b)
}

// TestGrowThreeMembers: both backups grow, then the writer, with a writer
// running; the three replicas end identical at the new size.
func TestGrowThreeMembers(t *testing.T) {
	a, b, c := threeMembers(t, volume.ModeSync, volume.ModeAsync)
	waitFor(t, "B in sync", inSyncWith(t, a, b))
	waitFor(t, "C in sync", inSyncWith(t, a, c))
	w := startWriter(a.v, size, 31)
	for _, m := range []*member{b, c, a} {
		n := w.n.Load()
		waitFor(t, "writes before growing "+m.node, func() bool { return w.n.Load() > n+20 })
		if err := m.v.Grow(grownSize); err != nil {
			t.Fatalf("growing %s: %v", m.node, err)
		}
	}
	waitFor(t, "writes past the old end", func() bool { return w.past.Load() > 30 })
	w.finish(t)
	waitFor(t, "B in sync after the grow", inSyncWith(t, a, b))
	waitFor(t, "C in sync after the grow", inSyncWith(t, a, c))
	sameStores(t, a, b)
	sameStores(t, a, c)
}

// TestGrowFullCopyToLargerBackupZeroesPastPrimaryEnd: a backup that grew
// first and needs a full copy (it holds no data of the pair) gets the
// primary's whole volume and zeros past the primary's end, where the
// primary reads zeros: once the primary grows, the two are identical.
func TestGrowFullCopyToLargerBackupZeroesPastPrimaryEnd(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync})
	write(t, a.v, rand.New(rand.NewPCG(41, 42)), 100)
	if err := b.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
	// Stale bytes past the primary's end (another pair's data, say).
	if _, err := b.st.WriteAt(bytes.Repeat([]byte{0xee}, 3*region), size+region); err != nil {
		t.Fatal(err)
	}
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "B in sync after the full copy", inSync(a, b))
	if err := a.v.Grow(grownSize); err != nil {
		t.Fatal(err)
	}
	sameStores(t, a, b)
}

// TestGrowLimit: a journal keeps its extent size, so a volume grows to at
// most 2^26 of its extents; a larger grow is refused before anything
// changes.
func TestGrowLimit(t *testing.T) {
	const rs = 64 << 20
	m := newMemberGeo(t, "g", 2*rs, rs)
	limit := int64(1<<26) * rs
	if err := m.v.Grow(limit + 1); !errors.Is(err, volume.ErrGrowLimit) || !strings.Contains(err.Error(), "needs 67108865 extents") {
		t.Fatalf("Grow past the journal's extents = %v, want ErrGrowLimit", err)
	}
	if m.v.Size() != 2*rs || m.st.Size() != 2*rs {
		t.Fatalf("a refused grow changed the size: %d, store %d", m.v.Size(), m.st.Size())
	}
}

// TestOpenKeepsJournalExtentSize: a replica reopened without an extent
// size uses its journal's (a grown volume keeps the one it was created
// with) instead of losing its bitmaps to a geometry mismatch.
func TestOpenKeepsJournalExtentSize(t *testing.T) {
	a := openMemberWith(t, "a", t.TempDir(), store.NewMem(size), func(o *volume.Options) { o.ExtentSize = 1 << 20 })
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync})
	if err := a.v.WriteAt(context.Background(), make([]byte, 4096), 3*region, false); err != nil {
		t.Fatal(err)
	}
	a.v.Close()
	a.st.Reopen()
	a2 := openMember(t, "a", a.dir, a.st)
	if n := a2.v.Status().OutOfSyncRegions; n != 1 {
		t.Fatalf("%d regions out of sync after reopening, want the 1 written", n)
	}
}
