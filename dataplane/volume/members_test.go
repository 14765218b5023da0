package volume_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// peerStatus is the writer's report of member node.
func peerStatus(t *testing.T, w *member, node string) volume.PeerStatus {
	t.Helper()
	st := w.v.Status()
	i := slices.IndexFunc(st.Peers, func(p volume.PeerStatus) bool { return p.Node == node })
	if i < 0 {
		t.Fatalf("%s reports no member %s: %+v", w.node, node, st.Peers)
	}
	return st.Peers[i]
}

// inSyncWith: the writer streams to member b, which lacks nothing.
func inSyncWith(t *testing.T, w, b *member) func() bool {
	return func() bool {
		p := peerStatus(t, w, b.node)
		return p.Connected && p.OutOfSyncRegions == 0 && !p.Copy.Running && p.OldestUnreplicatedSeconds == 0 &&
			b.v.Status().DataState == volume.UpToDate
	}
}

// threeMembers starts A as the writer of B (bMode) and C (cMode).
func threeMembers(t *testing.T, bMode, cMode volume.Mode) (a, b, c *member) {
	a, b, c = newMember(t, "a"), newMember(t, "b"), newMember(t, "c")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, writerSpec(1, b, bMode, c, cMode))
	return a, b, c
}

func writerSpec(epoch uint64, b *member, bMode volume.Mode, c *member, cMode volume.Mode) volume.Spec {
	return volume.Spec{Role: volume.RolePrimary, Epoch: epoch, Initialize: epoch == 1, Mode: bMode,
		PeerNode: b.node, PeerAddress: b.addr,
		MoreBackups: []volume.Peer{{Node: c.node, Address: c.addr, Mode: cMode}}}
}

// TestWriterMirrorsToEveryMember: one writer, two backups. Every write
// reaches both; the status lists each member with its mode; all three
// replicas end byte-identical, in both modes of the first backup.
func TestWriterMirrorsToEveryMember(t *testing.T) {
	for _, mode := range []volume.Mode{volume.ModeSync, volume.ModeAsync} {
		t.Run(string(mode), func(t *testing.T) {
			a, b, c := threeMembers(t, mode, volume.ModeAsync)
			waitFor(t, "B in sync", inSyncWith(t, a, b))
			waitFor(t, "C in sync", inSyncWith(t, a, c))
			write(t, a.v, rand.New(rand.NewPCG(31, 1)), 300)
			waitFor(t, "B in sync after the writes", inSyncWith(t, a, b))
			waitFor(t, "C in sync after the writes", inSyncWith(t, a, c))
			same(t, a, b)
			same(t, a, c)
			st := a.v.Status()
			if len(st.Peers) != 2 || st.Peers[0].Node != "b" || st.Peers[0].Mode != mode || st.Peers[1].Node != "c" || st.Peers[1].Mode != volume.ModeAsync {
				t.Fatalf("writer's members: %+v; want b (%s) then c (Async)", st.Peers, mode)
			}
			if !st.PeerConnected || st.OutOfSyncRegions != 0 {
				t.Fatalf("writer's summary: connected %v, %d regions out of sync", st.PeerConnected, st.OutOfSyncRegions)
			}
			if n := st.Counters.FramesSent; n < 600 {
				t.Fatalf("the writer sent %d frames for 300 writes to two members", n)
			}
		})
	}
}

// TestEachMemberLagsOnItsOwn: C goes away while A writes on with B. Only
// C's bitmap fills; B's stays empty. When C comes back, A copies it only
// what it missed (the bitmap's bytes, far from the volume), B's link is
// never torn down, and all three end identical. A model of the bitmap
// bookkeeping checks C's bitmap: exactly the regions written while it was
// away.
func TestEachMemberLagsOnItsOwn(t *testing.T) {
	a, b, c := threeMembers(t, volume.ModeSync, volume.ModeAsync)
	waitFor(t, "B in sync", inSyncWith(t, a, b))
	waitFor(t, "C in sync", inSyncWith(t, a, c))
	write(t, a.v, rand.New(rand.NewPCG(32, 1)), 100)
	waitFor(t, "C in sync after the first writes", inSyncWith(t, a, c))
	bStreams := strings.Count(b.logs.String(), "Serving replication stream")
	bCopy := peerStatus(t, a, "b").Copy

	// C's agent stops.
	if err := c.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees C gone", func() bool { return !peerStatus(t, a, "c").Connected })
	// A writes on: a model of what C lacks.
	model := map[int64]bool{}
	rng := rand.New(rand.NewPCG(33, 2))
	buf := make([]byte, 4096)
	for range 40 {
		off := rng.Int64N(size/4096) * 4096
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if err := a.v.WriteAt(context.Background(), buf, off, false); err != nil {
			t.Fatalf("write with C away: %v", err)
		}
		model[off/region] = true
	}
	waitFor(t, "B holds every write", inSyncWith(t, a, b))
	if p := peerStatus(t, a, "b"); p.Copy != bCopy {
		t.Fatalf("C's absence made A copy to B: %+v, before %+v", p.Copy, bCopy)
	}
	pc := peerStatus(t, a, "c")
	if pc.OutOfSyncRegions != uint64(len(model)) {
		t.Fatalf("C's bitmap has %d regions, the model %d", pc.OutOfSyncRegions, len(model))
	}
	var dirty []int64
	for _, r := range a.v.DirtyRanges() {
		for x := r[0]; x <= r[1]; x++ {
			dirty = append(dirty, int64(x))
		}
	}
	for _, r := range dirty {
		if !model[r] {
			t.Fatalf("the writer's union bitmap has region %d, which no write touched while C was away", r)
		}
	}
	if len(dirty) != len(model) {
		t.Fatalf("the writer's union bitmap has %d regions, the model %d", len(dirty), len(model))
	}

	// C comes back (a new address, as after an agent restart).
	c = reopen(t, c)
	apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	copied := a.v.Status().Copy.CopiedBytesTotal
	apply(t, a, writerSpec(1, b, volume.ModeSync, c, volume.ModeAsync))
	waitFor(t, "C in sync again", inSyncWith(t, a, c))
	if n, want := a.v.Status().Copy.CopiedBytesTotal-copied, int64(len(model))*region; n != want {
		t.Fatalf("the resync to C copied %d bytes, want its diff: %d regions, %d bytes", n, len(model), want)
	}
	same(t, a, b)
	same(t, a, c)
	if n := strings.Count(b.logs.String(), "Serving replication stream"); n != bStreams {
		t.Fatalf("B's stream was set up %d more times while only C's address changed", n-bStreams)
	}
}

// TestSyncWaitsForEverySyncMember: B is Sync, C Async. With B unreachable
// a write is held until the controller records B Outdated (C's record does
// not release it); with C unreachable a write is acknowledged at once.
func TestSyncWaitsForEverySyncMember(t *testing.T) {
	a, b, c := threeMembers(t, volume.ModeSync, volume.ModeAsync)
	waitFor(t, "B in sync", inSyncWith(t, a, b))
	waitFor(t, "C in sync", inSyncWith(t, a, c))

	// C away: Async, the write does not wait for it.
	if err := c.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees C gone", func() bool { return !peerStatus(t, a, "c").Connected })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.v.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatalf("a write with only the Async member away: %v", err)
	}

	// B away too: Sync, the write is held.
	if err := b.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees B gone", func() bool { return !peerStatus(t, a, "b").Connected })
	done := make(chan error, 1)
	go func() { done <- a.v.WriteAt(context.Background(), []byte("held until B is Outdated"), 8192, false) }()
	waitFor(t, "the write held", func() bool { return a.v.Status().WaitingForPeerOutdated == 1 })
	if err := a.v.PeerOutdated(1, "c"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		t.Fatalf("C's Outdated record released a write B never confirmed: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if !peerStatus(t, a, "c").Outdated || peerStatus(t, a, "b").Outdated {
		t.Fatalf("Outdated flags: b %v c %v; want only c", peerStatus(t, a, "b").Outdated, peerStatus(t, a, "c").Outdated)
	}
	if err := a.v.PeerOutdated(1, "b"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the held write after B's Outdated record: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("B's Outdated record did not release the held write")
	}
}

// TestMemberSpecValidated: a spec with more backups must name every member
// once; Apply refuses it otherwise, naming the field, and changes nothing.
func TestMemberSpecValidated(t *testing.T) {
	a := newMember(t, "a")
	for _, tc := range []struct {
		spec volume.Spec
		want string
	}{
		{volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerAddress: "127.0.0.1:1",
			MoreBackups: []volume.Peer{{Node: "c"}}}, "needs peerNode"},
		{volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b",
			MoreBackups: []volume.Peer{{Node: "b"}}}, "moreBackups[0].node \"b\" is named twice"},
		{volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b",
			MoreBackups: []volume.Peer{{Node: "c"}, {Node: ""}}}, "moreBackups[1].node is empty"},
		{volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b",
			MoreBackups: []volume.Peer{{Node: "c", Mode: "sync"}}}, "moreBackups[0].mode \"sync\""},
	} {
		err := a.v.Apply(tc.spec)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Apply(%+v) = %v; want an error mentioning %q", tc.spec, err, tc.want)
		}
	}
	if st := a.v.Status(); st.Role != volume.RoleNone || st.Epoch != 0 {
		t.Fatalf("a refused spec changed the replica: %s at epoch %d", st.Role, st.Epoch)
	}
}

// TestMembersSurviveRestart: the writer's metadata records every member
// its bitmaps track (version 4); after a restart a write made while C was
// away is still owed to C, and the third member added to a pair of two is
// a changed member (its first resync copies everything).
func TestMembersSurviveRestart(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "B in sync", inSync(a, b))
	write(t, a.v, rand.New(rand.NewPCG(34, 1)), 50)
	waitFor(t, "B in sync after writes", inSync(a, b))

	// The pair grows: C joins as a third member.
	c := newMember(t, "c")
	apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "a"})
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "a"})
	apply(t, a, writerSpec(2, b, volume.ModeAsync, c, volume.ModeAsync))
	if md := readMeta(t, a); md.Peer != "b" || !slices.Equal(md.OtherPeers, []string{"c"}) || !slices.Equal(md.OtherPeersChanged, []string{"c"}) {
		t.Fatalf("A's metadata with a third member: peer %q others %q changed %q; want b, [c], [c]", md.Peer, md.OtherPeers, md.OtherPeersChanged)
	}
	waitFor(t, "C in sync", inSyncWith(t, a, c))
	if p := peerStatus(t, a, "c"); !p.Copy.FullCopy {
		t.Fatalf("the first copy to the new third member: %+v; want a full copy", p.Copy)
	}
	if md := readMeta(t, a); len(md.OtherPeersChanged) != 0 {
		t.Fatalf("A's metadata after C's full copy still marks it changed: %q", md.OtherPeersChanged)
	}
	same(t, a, c)

	// C away, A writes, A restarts: what C lacks is still owed to it.
	if err := c.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees C gone", func() bool { return !peerStatus(t, a, "c").Connected })
	write(t, a.v, rand.New(rand.NewPCG(35, 2)), 30)
	waitFor(t, "B in sync", inSyncWith(t, a, b))
	if err := a.v.Close(); err != nil {
		t.Fatal(err)
	}
	a = reopen(t, a)
	c = reopen(t, c)
	apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 3, PeerNode: "a"})
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 3, PeerNode: "a"})
	apply(t, a, writerSpec(3, b, volume.ModeAsync, c, volume.ModeAsync))
	waitFor(t, "B in sync after A's restart", inSyncWith(t, a, b))
	waitFor(t, "C in sync after A's restart", inSyncWith(t, a, c))
	if p := peerStatus(t, a, "c"); p.Copy.FullCopy {
		t.Fatalf("C got a full copy after A's restart: %+v; want its diff", p.Copy)
	}
	same(t, a, b)
	same(t, a, c)
}
