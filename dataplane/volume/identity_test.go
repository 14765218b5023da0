package volume_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/stresstest"
)

const uidA = "0e3c6a51-5d0f-4d6e-9a43-5b1f6b7d0001"

// TestWipedBackupGetsFullCopy: a backup whose data directory was wiped
// comes back as a new replica. It must be Inconsistent, receive the whole
// volume and only then report UpToDate with both replicas identical. Before
// the fix a replica without metadata opened UpToDate with an empty bitmap:
// after 300 acknowledged Sync writes and a wipe, the writer reported 0
// regions out of sync, the backup UpToDate, and most regions differed.
func TestWipedBackupGetsFullCopy(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeSync, volume.ModeAsync} {
		t.Run(string(mode), func(t *testing.T) {
			tl := stresstest.NewTally(t, "disk-loss")
			tl.Trials.Add(1)
			tl.Faults.Add(1) // the backup's disk wiped
			p, b := newMember(t, "a"), newMember(t, "b")
			if err := b.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: "b", PeerAddress: b.addr}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "new pair in sync", inSync(p, b))
			if st := p.v.Status(); st.Copy.CopiedBytesTotal != 0 {
				t.Fatalf("a brand-new pair of all-zero replicas copied %d bytes", st.Copy.CopiedBytesTotal)
			}
			if st := b.v.Status(); !st.Joined || st.PairUID != uidA || st.DataState != volume.UpToDate {
				t.Fatalf("new backup after the handshake: joined %v pair %q %s", st.Joined, st.PairUID, st.DataState)
			}
			write(t, p.v, rand.New(rand.NewPCG(12, 1)), 300)
			waitFor(t, "writes replicated", inSync(p, b))

			// The backup's node loses its disk: a new, empty replica in
			// its place.
			b.v.Close()
			w := newMember(t, "b")
			if st := w.v.Status(); st.DataState != volume.Inconsistent || st.Joined || !strings.Contains(st.DataStateReason, "new replica") {
				t.Fatalf("a new replica reports %s joined=%v (%q); want Inconsistent, not joined, with the reason", st.DataState, st.Joined, st.DataStateReason)
			}
			if err := w.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			// It must not be promoted while it holds nothing.
			if err := w.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 2, Mode: mode}); err == nil || !strings.Contains(err.Error(), "Inconsistent") {
				t.Fatalf("promotion of a wiped replica: %v", err)
			}
			if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, Mode: mode, PeerNode: "b", PeerAddress: w.addr}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "full copy to the new replica", inSync(p, w))
			same(t, p, w)
			st := p.v.Status()
			if !st.Copy.FullCopy && st.Copy.CopiedBytesTotal < size {
				t.Fatalf("the resync to a wiped replica copied %d bytes, not the whole volume", st.Copy.CopiedBytesTotal)
			}
			if ws := w.v.Status(); !ws.Joined || ws.PairUID != uidA || ws.DataState != volume.UpToDate {
				t.Fatalf("after the full copy: joined %v pair %q %s", ws.Joined, ws.PairUID, ws.DataState)
			}
		})
	}
}

// TestNewReplicaNeverPrimaryWithoutInitialize: a replica that holds no
// data of the pair (here: the writer's disk was wiped) refuses the writer
// role unless the controller says it starts the pair's data; it would serve
// zeros.
func TestNewReplicaNeverPrimaryWithoutInitialize(t *testing.T) {
	m := newMember(t, "a")
	err := m.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 4, Mode: volume.ModeAsync})
	if err == nil || !strings.Contains(err.Error(), "new replica") {
		t.Fatalf("Apply(Primary) on a new replica: %v", err)
	}
	if st := m.v.Status(); st.Writable || st.Role == volume.RolePrimary {
		t.Fatalf("a refused replica serves: %+v", st)
	}
	if err := m.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 4, Mode: volume.ModeAsync, Initialize: true}); err != nil {
		t.Fatal(err)
	}
	if st := m.v.Status(); !st.Writable || !st.Joined || st.PairUID != uidA || st.DataState != volume.UpToDate {
		t.Fatalf("after Initialize: %+v", st)
	}
	if err := m.v.WriteAt(context.Background(), []byte("x"), 0, true); err != nil {
		t.Fatal(err)
	}
}

// TestForeignReplicaIsInconsistent: a replica holding the data of another
// VolumePair (one deleted with its data retained, recreated under the same
// name) is Inconsistent for the new pair and is fully overwritten; a
// primary refuses a backup of another pair.
func TestForeignReplicaIsInconsistent(t *testing.T) {
	const uidB = "0e3c6a51-5d0f-4d6e-9a43-5b1f6b7d0002"
	p, b := newMember(t, "a"), newMember(t, "b")
	if err := b.v.Apply(volume.Spec{PairUID: uidB, Role: volume.RolePrimary, Epoch: 1, Initialize: true}); err != nil {
		t.Fatal(err)
	}
	write(t, b.v, rand.New(rand.NewPCG(3, 3)), 50)
	if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, Initialize: true}); err != nil {
		t.Fatal(err)
	}
	write(t, p.v, rand.New(rand.NewPCG(4, 4)), 50)

	// b is given to pair A: it holds B's data.
	if err := b.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 2, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if st := b.v.Status(); st.DataState != volume.Inconsistent || st.Joined || !strings.Contains(st.DataStateReason, uidB) {
		t.Fatalf("a replica of another pair reports %s joined=%v (%q)", st.DataState, st.Joined, st.DataStateReason)
	}
	if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 2, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "full copy", inSync(p, b))
	same(t, p, b)
	if st := p.v.Status(); !st.Copy.FullCopy {
		t.Fatal("the copy to a replica of another pair was not a full copy")
	}

	// A backup that belongs to pair A refuses a primary of pair B.
	o := newMember(t, "c")
	if err := o.v.Apply(volume.Spec{PairUID: uidB, Role: volume.RolePrimary, Epoch: 3, Initialize: true, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	if err := b.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 3, PeerNode: "c"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "refusal of the other pair's primary", func() bool {
		return strings.Contains(o.logs.String(), "pair mismatch")
	})
	if o.v.Status().PeerConnected {
		t.Fatal("a primary of another pair streams to the backup")
	}
}

// TestDamagedMetadataNeedsFullCopy: a replica whose metadata file is
// damaged cannot say whose data it holds: it opens (rather than failing
// every attempt to recreate it), keeps the damaged file aside, is
// Inconsistent with the reason, and comes back through a full copy. Before,
// Open failed with the corruption error and the replica could not be used
// again without someone removing it by hand.
func TestDamagedMetadataNeedsFullCopy(t *testing.T) {
	p, b := newMember(t, "a"), newMember(t, "b")
	if err := b.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	write(t, p.v, rand.New(rand.NewPCG(5, 5)), 100)
	waitFor(t, "in sync", inSync(p, b))
	b.v.Close()
	if err := os.WriteFile(filepath.Join(b.dir, "meta"), []byte("TNDMMETA garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := reopen(t, b)
	st := r.v.Status()
	if st.DataState != volume.Inconsistent || st.Joined || !strings.Contains(st.DataStateReason, "metadata was damaged") {
		t.Fatalf("a replica with damaged metadata reports %s joined=%v (%q)", st.DataState, st.Joined, st.DataStateReason)
	}
	if kept, _ := filepath.Glob(filepath.Join(b.dir, "meta.damaged-*")); len(kept) != 1 {
		t.Fatalf("the damaged metadata was not kept aside: %v", kept)
	}
	if err := r.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 2}); err == nil {
		t.Fatal("a replica with damaged metadata was made primary")
	}
	if err := r.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, PeerNode: "b", PeerAddress: r.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "full copy", inSync(p, r))
	same(t, p, r)
	if !p.v.Status().Copy.FullCopy {
		t.Fatal("not a full copy")
	}
}

// TestFullCopyWithLiveWrites: a wiped backup is copied in full while the
// writer keeps taking writes; the copy never overwrites a newer live write.
func TestFullCopyWithLiveWrites(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeSync, volume.ModeAsync} {
		t.Run(string(mode), func(t *testing.T) {
			p, b := newMember(t, "a"), newMember(t, "b")
			if err := b.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: mode, PeerNode: "b", PeerAddress: b.addr}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "new pair in sync", inSync(p, b))
			write(t, p.v, rand.New(rand.NewPCG(12, 1)), 300)
			waitFor(t, "writes replicated", inSync(p, b))
			b.v.Close()
			w := newMember(t, "b")
			if err := w.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RoleBackup, Epoch: 1, Mode: mode, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() {
				defer close(done)
				rng := rand.New(rand.NewPCG(7, 2))
				for i := 0; i < 40; i++ {
					write(t, p.v, rng, 5)
					time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond)
				}
			}()
			if err := p.v.Apply(volume.Spec{PairUID: uidA, Role: volume.RolePrimary, Epoch: 1, Mode: mode, PeerNode: "b", PeerAddress: w.addr}); err != nil {
				t.Fatal(err)
			}
			<-done
			waitFor(t, "full copy to the new replica", inSync(p, w))
			same(t, p, w)
		})
	}
}
