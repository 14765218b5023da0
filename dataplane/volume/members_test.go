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

// backupSpec makes m a backup of primary with the pair's other members
// (siblings) named.
func backupSpec(epoch uint64, primary string, siblings ...string) volume.Spec {
	s := volume.Spec{Role: volume.RoleBackup, Epoch: epoch, PeerNode: primary}
	for _, n := range siblings {
		s.MoreBackups = append(s.MoreBackups, volume.Peer{Node: n})
	}
	return s
}

// writeModel writes n random 4 KiB blocks and returns the regions written.
func writeModel(t *testing.T, v *volume.Volume, seed uint64, n int) map[int64]bool {
	t.Helper()
	model := map[int64]bool{}
	rng := rand.New(rand.NewPCG(seed, 7))
	buf := make([]byte, 4096)
	for range n {
		off := rng.Int64N(size/4096) * 4096
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if err := v.WriteAt(context.Background(), buf, off, false); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
		model[off/region] = true
	}
	return model
}

// settled: every member holds everything and the backups' trackers of
// each other are clear (the writer's watermarks reached them).
func settled(t *testing.T, w *member, backups ...*member) func() bool {
	return func() bool {
		for _, b := range backups {
			if !inSyncWith(t, w, b)() || b.v.Status().OutOfSyncRegions != 0 {
				return false
			}
		}
		return true
	}
}

// settledThree starts A as the writer of B (bMode) and C (Async), backups
// that know each other, writes n blocks and waits until all three settled.
func settledThree(t *testing.T, bMode volume.Mode, seed uint64, n int) (a, b, c *member) {
	t.Helper()
	a, b, c = newMember(t, "a"), newMember(t, "b"), newMember(t, "c")
	apply(t, b, backupSpec(1, "a", "c"))
	apply(t, c, backupSpec(1, "a", "b"))
	apply(t, a, writerSpec(1, b, bMode, c, volume.ModeAsync))
	writeModel(t, a.v, seed, n)
	waitFor(t, "all three settled", settled(t, a, b, c))
	return a, b, c
}

// copiedSince is what the writer copied since before (CopiedBytesTotal).
func copiedSince(w *member, before int64) int64 { return w.v.Status().Copy.CopiedBytesTotal - before }

// TestPromotedBackupResyncsOthersByDiff: the writer A of B and C is lost
// while C is away; B, the most current backup, is promoted. C returns and
// gets from B exactly the regions A wrote while C was away (B's tracker of
// C, kept by the watermarks), not a full copy; A returns and gets exactly
// what B wrote since. All three end byte-identical.
func TestPromotedBackupResyncsOthersByDiff(t *testing.T) {
	a, b, c := settledThree(t, volume.ModeSync, 41, 200)
	same(t, a, b)
	same(t, a, c)

	// C goes away; A writes on with B; then A is lost.
	if err := c.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees C gone", func() bool { return !peerStatus(t, a, "c").Connected })
	m2 := writeModel(t, a.v, 42, 60)
	waitFor(t, "B holds every write", inSyncWith(t, a, b))
	waitFor(t, "B's tracker of C holds what C missed", func() bool {
		return b.v.Status().OutOfSyncRegions == uint64(len(m2))
	})
	if err := a.v.Close(); err != nil {
		t.Fatal(err)
	}

	// B is promoted; C returns as its backup.
	c = reopen(t, c)
	apply(t, c, backupSpec(2, "b", "a"))
	apply(t, b, volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "c", PeerAddress: c.addr,
		MoreBackups: []volume.Peer{{Node: "a"}}})
	before := int64(0)
	waitFor(t, "C in sync with B", inSyncWith(t, b, c))
	if p := peerStatus(t, b, "c"); p.Copy.FullCopy {
		t.Fatalf("C got a full copy: %+v", p.Copy)
	}
	if n, want := copiedSince(b, before), int64(len(m2))*region; n != want {
		t.Fatalf("B copied %d bytes to C, want the %d regions A wrote while C was away (%d bytes)", n, len(m2), want)
	}
	same(t, b, c)

	// B writes while A is away; A returns.
	m3 := writeModel(t, b.v, 43, 30)
	waitFor(t, "C in sync after B's writes", inSyncWith(t, b, c))
	before = b.v.Status().Copy.CopiedBytesTotal
	a = reopen(t, a)
	apply(t, a, backupSpec(2, "b", "c"))
	apply(t, b, volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "c", PeerAddress: c.addr,
		MoreBackups: []volume.Peer{{Node: "a", Address: a.addr}}})
	waitFor(t, "A in sync with B", inSyncWith(t, b, a))
	// A's bitmaps come back from its journal as one union after its
	// restart: its diff towards B holds what C lacked from A too (m2).
	// Over-reporting, never a full copy.
	union := map[int64]bool{}
	for r := range m2 {
		union[r] = true
	}
	for r := range m3 {
		union[r] = true
	}
	if n, lo, hi := copiedSince(b, before), int64(len(m3))*region, int64(len(union))*region; n < lo || n > hi {
		t.Fatalf("B copied %d bytes to the returning A, want B's writes since (%d bytes) up to those and A's restarted union (%d bytes)", n, lo, hi)
	}
	waitFor(t, "all three settled under B", settled(t, b, a, c))
	same(t, b, a)
	same(t, b, c)
}

// TestLaggingBackupPromoted: B is away while A writes to C, then A is lost
// and B (which lacks those writes) is promoted anyway. C holds writes B
// lacks: its tracker of B says which, its HelloAck sends them, and B copies
// its own version over exactly those regions, so C ends identical to the
// writer it now follows, without a full copy.
func TestLaggingBackupPromoted(t *testing.T) {
	a, b, c := settledThree(t, volume.ModeAsync, 51, 100)

	if err := b.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees B gone", func() bool { return !peerStatus(t, a, "b").Connected })
	m2 := writeModel(t, a.v, 52, 40)
	waitFor(t, "C holds every write", inSyncWith(t, a, c))
	if err := a.v.Close(); err != nil {
		t.Fatal(err)
	}
	if got := c.v.Status().OutOfSyncRegions; got != uint64(len(m2)) {
		t.Fatalf("C's trackers hold %d regions, want the %d written while B was away", got, len(m2))
	}

	b = reopen(t, b)
	apply(t, b, volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "c", PeerAddress: c.addr,
		MoreBackups: []volume.Peer{{Node: "a"}}})
	apply(t, c, backupSpec(2, "b", "a"))
	waitFor(t, "C in sync with B", inSyncWith(t, b, c))
	p := peerStatus(t, b, "c")
	if p.Copy.FullCopy {
		t.Fatalf("C got a full copy: %+v", p.Copy)
	}
	if n, want := b.v.Status().Copy.CopiedBytesTotal, int64(len(m2))*region; n != want {
		t.Fatalf("B copied %d bytes to C, want the %d regions C held and B lacked (%d bytes)", n, len(m2), want)
	}
	same(t, b, c)
}

// TestWatermarksWithAMemberAway: with D away the pair is never wholly in
// sync, so only the per-member watermarks can tell B that C holds what A
// wrote. A writes and is lost; B is promoted: C, which streamed all along,
// gets nothing copied, while B's tracker of D still holds every region A
// wrote since D left.
func TestWatermarksWithAMemberAway(t *testing.T) {
	a, b, c, d := newMember(t, "a"), newMember(t, "b"), newMember(t, "c"), newMember(t, "d")
	apply(t, b, backupSpec(1, "a", "c", "d"))
	apply(t, c, backupSpec(1, "a", "b", "d"))
	apply(t, d, backupSpec(1, "a", "b", "c"))
	spec := writerSpec(1, b, volume.ModeAsync, c, volume.ModeAsync)
	spec.MoreBackups = append(spec.MoreBackups, volume.Peer{Node: "d", Address: d.addr})
	apply(t, a, spec)
	waitFor(t, "all four settled", settled(t, a, b, c, d))
	if err := d.v.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A sees D gone", func() bool { return !peerStatus(t, a, "d").Connected })
	m := writeModel(t, a.v, 61, 50)
	waitFor(t, "B and C hold every write", func() bool { return inSyncWith(t, a, b)() && inSyncWith(t, a, c)() })
	// B's and C's trackers of each other clear once the watermarks
	// arrive; of D they keep every region written.
	waitFor(t, "B's and C's trackers of each other clear", func() bool {
		return volume.TrackedRegions(b.v, "c") == 0 && volume.TrackedRegions(c.v, "b") == 0
	})
	for _, x := range []*member{b, c} {
		if n := volume.TrackedRegions(x.v, "d"); n != len(m) {
			t.Fatalf("%s's tracker of D: %d regions, want %d", x.node, n, len(m))
		}
	}
	if err := a.v.Close(); err != nil {
		t.Fatal(err)
	}
	apply(t, c, backupSpec(2, "b", "a", "d"))
	apply(t, b, volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "c", PeerAddress: c.addr,
		MoreBackups: []volume.Peer{{Node: "a"}, {Node: "d"}}})
	waitFor(t, "C in sync with B", inSyncWith(t, b, c))
	if n := b.v.Status().Copy.CopiedBytesTotal; n != 0 {
		t.Fatalf("B copied %d bytes to C, which held everything", n)
	}
	if p := peerStatus(t, b, "d"); p.OutOfSyncRegions != uint64(len(m)) {
		t.Fatalf("B's tracker of D: %d regions, want the %d A wrote while D was away", p.OutOfSyncRegions, len(m))
	}
	same(t, b, c)
}

// TestMemberWithoutAddressNeverCleared: a member whose address the writer
// does not know lacks every write; the backups' trackers of it must keep
// them even when every linked member is in sync.
func TestMemberWithoutAddressNeverCleared(t *testing.T) {
	a, b, c := newMember(t, "a"), newMember(t, "b"), newMember(t, "c")
	apply(t, b, backupSpec(1, "a", "c", "d"))
	apply(t, c, backupSpec(1, "a", "b", "d"))
	spec := writerSpec(1, b, volume.ModeAsync, c, volume.ModeAsync)
	spec.MoreBackups = append(spec.MoreBackups, volume.Peer{Node: "d"})
	apply(t, a, spec)
	// The links first: a write that came before B's handshake would make
	// A's replica no longer all-zero, and B, a new replica, would get a
	// full copy, whose every region B's tracker of D would then keep (D
	// has nothing: right, but not what this test looks at).
	waitFor(t, "B and C in sync before the writes", func() bool { return inSyncWith(t, a, b)() && inSyncWith(t, a, c)() })
	m := writeModel(t, a.v, 71, 30)
	waitFor(t, "B and C hold every write", func() bool { return inSyncWith(t, a, b)() && inSyncWith(t, a, c)() })
	waitFor(t, "B's tracker of C clear", func() bool { return volume.TrackedRegions(b.v, "c") == 0 })
	time.Sleep(300 * time.Millisecond) // three watermark rounds: a wrong "all in sync" would have come
	// Every region written is kept (invariant 3), and only those.
	for r := range m {
		if !volume.TrackedHas(b.v, "d", r*region) {
			t.Fatalf("B's tracker of D, which has no link, lost region %d written by A (%d regions tracked, %d written)", r, volume.TrackedRegions(b.v, "d"), len(m))
		}
	}
	if n := volume.TrackedRegions(b.v, "d"); n != len(m) {
		t.Fatalf("B's tracker of D: %d regions for the %d written", n, len(m))
	}
}

// TestFullCopyOwedToMemberWithoutAddress: when the writer's first writes
// come before a new backup's handshake, the backup gets a full copy, and
// its tracker of a member that never connected keeps every region: that
// member would need all of them from it (it holds nothing).
func TestFullCopyOwedToMemberWithoutAddress(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync,
		PeerNode: b.node, PeerAddress: b.addr, MoreBackups: []volume.Peer{{Node: "d"}}})
	writeModel(t, a.v, 72, 30) // B has no role yet: its handshake comes after these
	apply(t, b, backupSpec(1, "a", "d"))
	waitFor(t, "B holds every write", inSyncWith(t, a, b))
	if !strings.Contains(a.logs.String(), `"fullCopy"=true`) {
		t.Fatalf("the copy to B was not a full copy; A's log:\n%s", a.logs)
	}
	if n, all := volume.TrackedRegions(b.v, "d"), size/region; n != all {
		t.Fatalf("B's tracker of D after a full copy: %d regions, want all %d", n, all)
	}
}
