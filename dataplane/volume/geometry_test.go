package volume_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// newMemberGeo is newMember for a volume of the given size and region size.
func newMemberGeo(t *testing.T, node string, volSize, regionSize int64) *member {
	t.Helper()
	m := &member{st: store.NewMem(volSize), logs: &syncBuf{}}
	log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: node, Dir: t.TempDir(), Size: volSize, RegionSize: regionSize,
		Store: m.st, CheckpointInterval: 100 * time.Millisecond, Log: log})
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

// TestResyncAtRegionSizeBounds: every region size the API accepts (a power
// of two from 4 KiB to 64 MiB) can be resynced. Before the fix a 64 MiB
// region made a CopyData frame larger than the 32 MiB frame limit: the link
// reconnected forever and the backup stayed Inconsistent.
func TestResyncAtRegionSizeBounds(t *testing.T) {
	for _, rs := range []int64{meta.MinRegionSize, meta.MaxRegionSize} {
		t.Run(fmt.Sprintf("region=%d", rs), func(t *testing.T) {
			volSize := max(2*rs, 16<<20)
			p, b := newMemberGeo(t, "a", volSize, rs), newMemberGeo(t, "b", volSize, rs)
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
				t.Fatal(err)
			}
			// Alone: every region written ends sticky and must be copied.
			ctx := context.Background()
			for _, off := range []int64{0, rs - 4096, volSize - 8192} {
				if err := p.v.WriteAt(ctx, bytes.Repeat([]byte{0x5a}, 8192), off, false); err != nil {
					t.Fatal(err)
				}
			}
			if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "resync to finish", inSync(p, b))
			x, y := make([]byte, volSize), make([]byte, volSize)
			if _, err := p.st.ReadAt(x, 0); err != nil {
				t.Fatal(err)
			}
			if _, err := b.st.ReadAt(y, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(x, y) {
				t.Fatal("replicas differ after the resync")
			}
			if st := p.v.Status(); st.Counters.Reconnects != 0 {
				t.Fatalf("the link reconnected %d times", st.Counters.Reconnects)
			}
		})
	}
}
