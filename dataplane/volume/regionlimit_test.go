package volume_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestGeometryAtRegionLimit: a volume of exactly v1.MaxRegions regions, the
// largest spec.size the API admits for its region size
// (TestNumericBounds in test/envtest), is served: the writer alone marks
// its last region dirty, keeps it across a restart (journal recovery), and
// resyncs it to the backup, whose last region then matches. One region
// more is refused by the data path with the limit the API states. With 4Ki
// regions the replicas are the agents' sparse files (16Ti - 4Ki: exactly
// ext4's largest file); with the default 64Ki, sparse in-memory stores
// (256Ti - 64Ki fits no ext4 file).
func TestGeometryAtRegionLimit(t *testing.T) {
	if v1.MaxRegions != int64(bitmap.MaxRegions) {
		t.Fatalf("the API admits %d regions, the bitmaps track %d", v1.MaxRegions, int64(bitmap.MaxRegions))
	}
	for _, tc := range []struct {
		region int64
		files  bool
	}{{v1.MinRegionSize, true}, {v1.DefaultRegionSize, false}} {
		t.Run(fmt.Sprintf("region=%d", tc.region), func(t *testing.T) {
			rs, size := tc.region, v1.MaxRegions*tc.region
			last := uint32(v1.MaxRegions - 1)

			_, err := volume.Open(volume.Options{Name: "ns/over", Node: "a", Dir: t.TempDir(), Size: size + rs, RegionSize: rs, Store: store.NewMem(size + rs)})
			if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("exceed the limit of %d", v1.MaxRegions)) {
				t.Fatalf("a volume of one region more: err = %v, want the region limit", err)
			}

			open := func(node, dir string, st store.Store) *member {
				m := &member{logs: &syncBuf{}, dir: dir, node: node}
				log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
				v, err := volume.Open(volume.Options{Name: "ns/vol", Node: node, Dir: dir, Size: size, RegionSize: rs,
					Store: st, CheckpointInterval: 100 * time.Millisecond, Log: log})
				if err != nil {
					t.Fatalf("%s: open a volume of %d regions of %d bytes: %v", node, v1.MaxRegions, rs, err)
				}
				m.v = v
				return m
			}
			stores := map[string]store.Store{}
			storeOf := func(node string) store.Store {
				if tc.files {
					return nil // volume.Open creates <dir>/data, sparse
				}
				if stores[node] == nil {
					stores[node] = store.NewMem(size)
				}
				return stores[node]
			}
			read := func(m *member, off int64, n int) []byte {
				t.Helper()
				p := make([]byte, n)
				var err error
				if tc.files {
					var f *os.File
					if f, err = os.Open(filepath.Join(m.dir, "data")); err == nil {
						_, err = f.ReadAt(p, off)
						f.Close()
					}
				} else {
					_, err = stores[m.node].ReadAt(p, off)
				}
				if err != nil {
					t.Fatal(err)
				}
				return p
			}

			ctx := context.Background()
			dirA, dirB := t.TempDir(), t.TempDir()
			var a, b *member
			var ln net.Listener
			t.Cleanup(func() {
				if ln != nil {
					ln.Close()
				}
				for _, m := range []*member{a, b} {
					if m == nil {
						continue
					}
					if err := m.v.Close(); err != nil && !errors.Is(err, volume.ErrClosed) {
						t.Error(err)
					}
					if t.Failed() {
						t.Logf("---- %s log ----\n%s", m.node, m.logs)
					}
				}
			})
			startB := func() {
				b = open("b", dirB, storeOf("b"))
				ln = serveReplication(t, b.v)
				if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
					t.Fatal(err)
				}
			}
			startA := func() {
				if err := a.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: ln.Addr().String()}); err != nil {
					t.Fatal(err)
				}
			}
			// A new pair: both replicas all zeros, nothing to copy.
			a = open("a", dirA, storeOf("a"))
			startB()
			startA()
			waitFor(t, "the new pair in sync", inSync(a, b))

			// The backup is lost; the writer goes on alone.
			ln.Close()
			if err := b.v.Close(); err != nil {
				t.Fatal(err)
			}
			tail := bytes.Repeat([]byte{0xa5}, 4096)
			for _, off := range []int64{0, size - rs, size - 4096} {
				if err := a.v.WriteAt(ctx, tail, off, true); err != nil {
					t.Fatalf("write at %d of %d bytes: %v", off, size, err)
				}
			}
			hasLast := func(m *member) bool {
				d := m.v.DirtyRanges()
				return len(d) > 0 && d[len(d)-1][1] == last
			}
			waitFor(t, "the last region dirty on the writer", func() bool { return hasLast(a) })
			// A restart recovers the dirty regions from the journal.
			if err := a.v.Close(); err != nil {
				t.Fatal(err)
			}
			if !tc.files {
				stores["a"].(*store.Mem).Reopen()
				stores["b"].(*store.Mem).Reopen()
			}
			a = open("a", dirA, storeOf("a"))
			if !hasLast(a) {
				t.Fatalf("after a restart the writer's dirty regions %v lack the last region %d", a.v.DirtyRanges(), last)
			}
			// The backup returns: the dirty regions are copied to it.
			startB()
			startA()
			waitFor(t, "the resync of the last region", inSync(a, b))
			if got := read(b, size-rs, int(rs)); !bytes.Equal(got, read(a, size-rs, int(rs))) {
				t.Fatal("the backup's last region differs from the writer's")
			}
			if got := read(b, size-4096, 4096); !bytes.Equal(got, tail) {
				t.Fatalf("the backup's last 4 KiB = %x..., want the writer's", got[:8])
			}
			sa, err := a.v.RegionChecksums(ctx, last, 1)
			if err != nil {
				t.Fatal(err)
			}
			sb, err := b.v.RegionChecksums(ctx, last, 1)
			if err != nil {
				t.Fatal(err)
			}
			if sa[0] != sb[0] {
				t.Fatal("the last region's checksums differ")
			}
		})
	}
}

// TestFullCopyAtRegionLimit: a new member of a volume of v1.MaxRegions
// regions gets its full copy. The writer journals every region as owed to
// it before the copy starts; that took a step per region and per extent
// (5-7 s for 2^32 regions on a 2-core machine, a minute under the race
// detector), longer than the backup waits for a frame (peerTimeout), so the
// link dropped and retried forever ("Replication link down; will retry ...
// read from peer: EOF") and no byte was ever copied. Run by run it takes
// milliseconds (a second under the race detector).
func TestFullCopyAtRegionLimit(t *testing.T) {
	for _, rs := range []int64{v1.MinRegionSize, v1.DefaultRegionSize} {
		t.Run(fmt.Sprintf("region=%d", rs), func(t *testing.T) {
			size := v1.MaxRegions * rs
			open := func(node string) *member {
				m := &member{logs: &syncBuf{}, node: node, st: store.NewMem(size)}
				log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
				v, err := volume.Open(volume.Options{Name: "ns/vol", Node: node, Dir: t.TempDir(), Size: size, RegionSize: rs,
					Store: m.st, CheckpointInterval: 100 * time.Millisecond, Log: log})
				if err != nil {
					t.Fatal(err)
				}
				m.v = v
				t.Cleanup(func() {
					if err := v.Close(); err != nil {
						t.Error(err)
					}
					if t.Failed() {
						t.Logf("---- %s log ----\n%s", node, m.logs)
					}
				})
				return m
			}
			a := open("a")
			if err := a.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
				t.Fatal(err)
			}
			if err := a.v.WriteAt(context.Background(), bytes.Repeat([]byte{0x5a}, 4096), size-4096, true); err != nil {
				t.Fatal(err)
			}
			b := open("b")
			ln := serveReplication(t, b.v)
			t.Cleanup(func() { ln.Close() })
			if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			if err := a.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: ln.Addr().String()}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the full copy to b to copy 16 MiB", func() bool {
				st := a.v.Status()
				return st.Copy.FullCopy && st.Copy.DoneBytes >= 16<<20
			})
			if n := a.v.Status().Counters.Reconnects; n > 0 {
				// Not a failure by itself: a loaded machine (go test -race
				// ./... runs packages side by side) can delay a frame.
				t.Logf("the link to b reconnected %d times before the copy progressed", n)
			}
		})
	}
}

// TestOpenAtRegionLimitMemory: opening a volume of v1.MaxRegions regions
// costs the agent a few MiB whatever the region size. The write-intent
// journal keeps dense sets of extents; with 4 MiB extents (or one region,
// if larger) a volume of 2^32 regions of 64Mi had 2^32 extents, 512 MiB per
// set, 1 GiB at open and more at each checkpoint: the agent's 1Gi memory
// limit, for one volume. Extents now grow with the volume beyond 2^26.
func TestOpenAtRegionLimitMemory(t *testing.T) {
	for _, rs := range []int64{v1.DefaultRegionSize, 1 << 20, v1.MaxRegionSize} {
		size := v1.MaxRegions * rs
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: t.TempDir(), Size: size, RegionSize: rs, Store: store.NewMem(size)})
		if err != nil {
			t.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		if grew > 64<<20 {
			t.Errorf("region %d, size %d: opening took %d MiB of heap, want a few", rs, size, grew>>20)
		}
	}
}
