package volume_test

import (
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// dropCounter is a store that counts DropCache calls.
type dropCounter struct {
	store.Store
	drops atomic.Int64
}

func (d *dropCounter) DropCache() error {
	d.drops.Add(1)
	return nil
}

// TestBackupDropsItsCache: a backup drops its cached pages once what it
// wrote is durable (it never reads them while it is a backup, and pages
// left cached keep the granularity of the writes that made them); the
// primary, which serves the client's reads, keeps its own.
func TestBackupDropsItsCache(t *testing.T) {
	var pc, bc *dropCounter
	p := openMemberWith(t, "a", t.TempDir(), store.NewMem(size), func(o *volume.Options) {
		pc = &dropCounter{Store: o.Store}
		o.Store = pc
	})
	b := openMemberWith(t, "b", t.TempDir(), store.NewMem(size), func(o *volume.Options) {
		bc = &dropCounter{Store: o.Store}
		o.Store = bc
	})
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "in sync", inSync(p, b))
	before := bc.drops.Load()
	write(t, p.v, rand.New(rand.NewPCG(3, 4)), 30)
	// In sync means every write's bits cleared: the backup synced them,
	// and drops its cache right after.
	waitFor(t, "in sync after the writes", inSync(p, b))
	waitFor(t, "the backup dropped its cache after syncing the writes", func() bool { return bc.drops.Load() > before })
	same(t, p, b)
	if n := pc.drops.Load(); n != 0 {
		t.Fatalf("the primary dropped its cache %d times; it serves reads and keeps it", n)
	}
}
