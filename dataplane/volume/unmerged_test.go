package volume_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestUnmergedRegionsReported: with mergePeerBitmap false (the method's
// second embodiment) a returning member keeps writes it acknowledged alone
// that never reached the peer. The resync must not report the pair as
// identical: the returning member counts those regions as unmerged, exactly
// the regions where the replicas differ, across a restart, until they are
// overwritten. Before, both members reported in sync and nothing said the
// replicas differed.
func TestUnmergedRegionsReported(t *testing.T) {
	noMerge := false
	ctx := context.Background()
	a, b := newMember(t, "a"), newMember(t, "b")
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := a.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b", PeerAddress: b.addr, MergePeerBitmap: &noMerge}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "pair up", inSync(a, b))

	// a is cut off from b and writes alone to regions 2, 3 and 9 (its
	// first diff); the link is gone.
	if err := a.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, PeerNode: "b", MergePeerBitmap: &noMerge}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []int64{2, 3, 9} {
		if err := a.v.WriteAt(ctx, bytes.Repeat([]byte{0xaa}, 4096), r*region, false); err != nil {
			t.Fatal(err)
		}
	}
	// b is promoted and writes regions 3 and 5 (its second diff).
	if err := a.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "b"}); err != nil {
		t.Fatal(err)
	}
	if err := b.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "a", MergePeerBitmap: &noMerge}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []int64{3, 5} {
		if err := b.v.WriteAt(ctx, bytes.Repeat([]byte{0xbb}, region), r*region, false); err != nil {
			t.Fatal(err)
		}
	}
	// a returns as b's backup; b copies only its own diff.
	if err := b.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "a", PeerAddress: a.addr, MergePeerBitmap: &noMerge}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "resync of the second diff", inSync(b, a))

	// Regions 2 and 9 differ (a's unshipped writes); 3 and 5 were copied.
	differ := diffRegions(t, a, b)
	if len(differ) != 2 || differ[0] != 2 || differ[1] != 9 {
		t.Fatalf("regions that differ: %v, want [2 9]", differ)
	}
	if got := a.v.Status().UnmergedRegions; got != 2 {
		t.Fatalf("the returning member reports %d unmerged regions, want 2 (the regions that differ)", got)
	}

	// It survives a restart of the returning member.
	a.v.Close()
	r := reopen(t, a)
	if got := r.v.Status().UnmergedRegions; got != 2 {
		t.Fatalf("after a restart: %d unmerged regions, want 2", got)
	}
	// A write of all of region 9 on the writer makes it the same on both.
	if err := r.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "b"}); err != nil {
		t.Fatal(err)
	}
	if err := b.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "a", PeerAddress: r.addr, MergePeerBitmap: &noMerge}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link back", inSync(b, r))
	if err := b.v.WriteAt(ctx, bytes.Repeat([]byte{0xcc}, region), 9*region, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "region 9 no longer unmerged", func() bool { return r.v.Status().UnmergedRegions == 1 })
	if differ := diffRegions(t, r, b); len(differ) != 1 || differ[0] != 2 {
		t.Fatalf("regions that differ: %v, want [2]", differ)
	}
}

// diffRegions lists the regions whose bytes differ between two members.
func diffRegions(t *testing.T, x, y *member) []int {
	t.Helper()
	p, q := make([]byte, size), make([]byte, size)
	if _, err := x.st.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := y.st.ReadAt(q, 0); err != nil {
		t.Fatal(err)
	}
	var out []int
	for off := 0; off < size; off += region {
		if !bytes.Equal(p[off:off+region], q[off:off+region]) {
			out = append(out, off/region)
		}
	}
	return out
}
