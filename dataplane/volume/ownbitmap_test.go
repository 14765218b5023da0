package volume_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestOversizedOwnDiffGetsFullCopy: a returning member whose own diff (the
// writes it acknowledged alone as the writer) is too large for one
// handshake frame must ask for a full copy. Before the fix it decided so
// after its HelloAck had been encoded: the writer got neither the diff nor
// the request, copied only its own diff, and the regions the returning
// member wrote alone stayed different while both reported in sync.
func TestOversizedOwnDiffGetsFullCopy(t *testing.T) {
	volume.SetMaxOwnBitmap(t, 1) // every non-empty diff is "too large"
	ctx := context.Background()
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "pair up", inSync(a, b))

	// a loses its link and writes regions 2 and 9 alone.
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, PeerNode: "b"})
	for _, r := range []int64{2, 9} {
		if err := a.v.WriteAt(ctx, bytes.Repeat([]byte{0xaa}, 4096), r*region, false); err != nil {
			t.Fatal(err)
		}
	}
	// b is promoted and writes region 5; a returns as its backup.
	apply(t, a, volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "b"})
	apply(t, b, volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "a"})
	if err := b.v.WriteAt(ctx, bytes.Repeat([]byte{0xbb}, region), 5*region, false); err != nil {
		t.Fatal(err)
	}
	apply(t, b, volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "a", PeerAddress: a.addr})
	waitFor(t, "resync", inSync(b, a))
	if differ := diffRegions(t, a, b); len(differ) != 0 {
		t.Fatalf("regions that differ after the resync: %v (the returning member's own writes were not copied over)", differ)
	}
	if st := b.v.Status(); !st.Copy.FullCopy {
		t.Fatalf("the resync was not a full copy: %+v", st.Copy)
	}
}
