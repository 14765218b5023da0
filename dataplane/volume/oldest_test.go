package volume_test

import (
	"context"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestOldestUnreplicatedWhileDisconnected (issue #12 finding 11): while the
// peer is away, the oldest-unreplicated age is that of the oldest write the
// peer does not hold, growing, not 0; it returns to 0 once the resync has
// brought the peer up to date.
func TestOldestUnreplicatedWhileDisconnected(t *testing.T) {
	ctx := context.Background()
	p, b := newFaultyMemberN(t, "a"), newFaultyMemberN(t, "b")
	startPair(t, p, b, volume.ModeAsync)
	if s := p.v.Status().OldestUnreplicatedSeconds; s != 0 {
		t.Fatalf("oldest unreplicated %v s with the pair in sync", s)
	}
	// The backup stands aside: the link goes down.
	if err := b.v.Apply(volume.Spec{Role: volume.RoleNone, Epoch: 1, Mode: volume.ModeAsync, PeerNode: p.node()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link down", func() bool { return !p.v.Status().PeerConnected })
	start := time.Now()
	buf := make([]byte, ackBlock)
	if err := p.v.WriteAt(ctx, buf, 5*region, false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if err := p.v.WriteAt(ctx, buf, 9*region, false); err != nil { // a newer write does not reset the age
		t.Fatal(err)
	}
	st := p.v.Status()
	if st.PeerConnected || st.OutOfSyncRegions == 0 {
		t.Fatalf("status while the peer is away: %+v", st)
	}
	if min := 0.25; st.OldestUnreplicatedSeconds < min || st.OldestUnreplicatedSeconds > time.Since(start).Seconds() {
		t.Fatalf("oldest unreplicated write while disconnected: %v s, want between %v and %v", st.OldestUnreplicatedSeconds, min, time.Since(start).Seconds())
	}

	// The backup returns: the resync copies what it lacks, and the age
	// returns to 0.
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: p.node()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "in sync (oldest unreplicated back to 0) after the resync", inSync(p.member, b.member))
	same(t, p.member, b.member)
}
