package volume_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestRequestResyncRepairs: a region corrupted behind the backup's back is
// repaired by asking the writer to resync it; only the writer accepts.
func TestRequestResyncRepairs(t *testing.T) {
	p, b := newMember(t, "a"), newMember(t, "b")
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x5a}, region)
	if err := p.v.WriteAt(context.Background(), want, 3*region, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "in sync", inSync(p, b))
	// Corrupt region 3 on the backup (bit rot, a stray writer).
	if _, err := b.st.WriteAt(bytes.Repeat([]byte{0xff}, 512), 3*region+100); err != nil {
		t.Fatal(err)
	}
	if err := b.v.RequestResync(context.Background(), 3, 1); err == nil {
		t.Fatal("a backup accepted a resync request")
	}
	if err := p.v.RequestResync(context.Background(), 3, 0); err == nil {
		t.Fatal("an empty range was accepted")
	}
	before := p.v.Status().Copy.CopiedBytesTotal
	if err := p.v.RequestResync(context.Background(), 3, 1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "repair copied", func() bool { return p.v.Status().Copy.CopiedBytesTotal >= before+region })
	waitFor(t, "in sync", inSync(p, b))
	same(t, p, b)
}
