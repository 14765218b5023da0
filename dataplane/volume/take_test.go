package volume_test

import (
	"bytes"
	"context"
	"sync/atomic"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

var _ nbd.BufferTaker = (*volume.Volume)(nil)

// TestWriteAtTake: a buffer handed over by the NBD server is given back
// exactly once on every path (alone, mirrored, refused), and the mirrored
// data reaches the backup intact.
func TestWriteAtTake(t *testing.T) {
	p, b := newMember(t, "a"), newMember(t, "b")
	var given, back atomic.Int64
	done := func(buf *[]byte) {
		back.Add(1)
		for i := range *buf { // a reused buffer must not reach the peer
			(*buf)[i] = 0xEE
		}
	}
	write := func(off int64, fill byte) error {
		buf := make([]byte, 128<<10)
		for i := range buf {
			buf[i] = fill
		}
		given.Add(1)
		return p.v.WriteAtTake(context.Background(), &buf, done, off, false)
	}
	ctx := context.Background()
	// Not a writer yet: refused, buffer back.
	if err := write(0, 1); err == nil {
		t.Fatal("write before Apply succeeded")
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	if err := write(0, 2); err != nil { // alone
		t.Fatal(err)
	}
	if err := p.v.WriteAtTake(ctx, &[]byte{1}, func(*[]byte) { back.Add(1) }, size, false); err == nil {
		t.Fatal("write past the end succeeded")
	}
	given.Add(1)
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeSync, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link up", func() bool { return p.v.Status().PeerConnected })
	for i := range 64 {
		if err := write(int64(i)*(128<<10), byte(10+i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "in sync", inSync(p, b))
	waitFor(t, "every buffer given back", func() bool { return back.Load() == given.Load() })
	got := make([]byte, 128<<10)
	for i := range 64 {
		if _, err := b.st.ReadAt(got, int64(i)*(128<<10)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bytes.Repeat([]byte{byte(10 + i)}, len(got))) {
			t.Fatalf("backup block %d: got %x…, want %x", i, got[:4], 10+i)
		}
	}
	same(t, p, b)
}
