package volume_test

import (
	"context"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestOldestUnreplicatedWhileDisconnected: while the
// peer is away, the oldest-unreplicated age is that of the oldest write the
// peer does not hold, growing, not 0; it returns to 0 once the resync has
// brought the peer up to date. The primary runs on a fake clock: the age is
// exactly the time the test stepped since the first write the peer missed.
func TestOldestUnreplicatedWhileDisconnected(t *testing.T) {
	ctx := context.Background()
	clk := clocktesting.NewFakeClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	p, b := newFaultyMemberClock(t, "a", "ns/vol", clk), newFaultyMemberN(t, "b")
	startPair(t, p, b, volume.ModeAsync)
	if s := p.v.Status().OldestUnreplicatedSeconds; s != 0 {
		t.Fatalf("oldest unreplicated %v s with the pair in sync", s)
	}
	clk.Step(time.Minute) // time in sync does not count
	// The backup stands aside: the link goes down.
	if err := b.v.Apply(volume.Spec{Role: volume.RoleNone, Epoch: 1, Mode: volume.ModeAsync, PeerNode: p.node()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link down", func() bool { return !p.v.Status().PeerConnected })
	buf := make([]byte, ackBlock)
	if err := p.v.WriteAt(ctx, buf, 5*region, false); err != nil {
		t.Fatal(err)
	}
	clk.Step(300 * time.Millisecond)
	if err := p.v.WriteAt(ctx, buf, 9*region, false); err != nil { // a newer write does not reset the age
		t.Fatal(err)
	}
	st := p.v.Status()
	if st.PeerConnected || st.OutOfSyncRegions == 0 {
		t.Fatalf("status while the peer is away: %+v", st)
	}
	if want := (300 * time.Millisecond).Seconds(); st.OldestUnreplicatedSeconds != want {
		t.Fatalf("oldest unreplicated write while disconnected: %v s, want %v", st.OldestUnreplicatedSeconds, want)
	}
	clk.Step(2 * time.Second)
	if got, want := p.v.Status().OldestUnreplicatedSeconds, (2300 * time.Millisecond).Seconds(); got != want {
		t.Fatalf("oldest unreplicated write 2 s later: %v s, want %v (growing)", got, want)
	}

	// The backup returns: the resync copies what it lacks, and the age
	// returns to 0.
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: p.node()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "in sync (oldest unreplicated back to 0) after the resync", inSync(p.member, b.member))
	same(t, p.member, b.member)
}

// TestHoldSecondsOnClock: a failback hold reports how long it has held
// writes (HoldSeconds) while it lasts and, once released, how long it
// lasted (LastHoldSeconds), both on the volume's clock.
func TestHoldSecondsOnClock(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	p := newFaultyMemberClock(t, "a", "ns/vol", clk)
	spec := volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}
	if err := p.v.Apply(spec); err != nil {
		t.Fatal(err)
	}
	clk.Step(time.Minute)
	held := spec
	held.Hold = true
	if err := p.v.Apply(held); err != nil {
		t.Fatal(err)
	}
	if st := p.v.Status(); st.HoldSeconds != 0 {
		t.Fatalf("HoldSeconds %v at the start of the hold", st.HoldSeconds)
	}
	clk.Step(1200 * time.Millisecond)
	if got, want := p.v.Status().HoldSeconds, (1200 * time.Millisecond).Seconds(); got != want {
		t.Fatalf("HoldSeconds %v after 1.2 s of hold, want %v", got, want)
	}
	clk.Step(300 * time.Millisecond)
	if err := p.v.Apply(spec); err != nil {
		t.Fatal(err)
	}
	clk.Step(time.Minute) // after the release: counts for nothing
	st := p.v.Status()
	if st.HoldSeconds != 0 {
		t.Fatalf("HoldSeconds %v after the release", st.HoldSeconds)
	}
	if want := (1500 * time.Millisecond).Seconds(); st.LastHoldSeconds != want {
		t.Fatalf("LastHoldSeconds %v, want %v", st.LastHoldSeconds, want)
	}
}
