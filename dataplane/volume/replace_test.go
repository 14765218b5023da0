package volume_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"net"
	"strings"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

func apply(t *testing.T, m *member, s volume.Spec) {
	t.Helper()
	if s.PairUID == "" {
		s.PairUID = uidA
	}
	if err := m.v.Apply(s); err != nil {
		t.Fatalf("%s: Apply(%+v): %v", m.node, s, err)
	}
}

func readMeta(t *testing.T, m *member) meta.Meta {
	t.Helper()
	md, err := meta.Read(m.dir)
	if err != nil {
		t.Fatal(err)
	}
	return md
}

// TestReplacedPeerReturnsGetsFullCopy: member replacement. A writes to B;
// B's node is replaced by C (A's peer becomes C, C gets a full copy, A
// writes on); later B's replica comes back as A's peer, still joined to
// the pair, UpToDate in its own metadata, with nothing in its bitmap. A's
// bitmap only holds what C lacks (nothing), not what B lacks (everything
// written since B left), so the resync must copy the whole volume. Before
// the fix A copied nothing: B reported UpToDate while missing the writes
// made with C, and a failover to B would have served them stale.
//
// The restart variants close and reopen A: before the peer change (the
// peer A's bitmaps track must come from its metadata, as the spec is
// empty after Open), and after it (the PeerChanged flag must be durable).
func TestReplacedPeerReturnsGetsFullCopy(t *testing.T) {
	for _, variant := range []string{"online", "restart before the peer change", "restart after the peer change"} {
		t.Run(variant, func(t *testing.T) {
			a, b, c := newMember(t, "a"), newMember(t, "b"), newMember(t, "c")
			apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
			apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b", PeerAddress: b.addr})
			waitFor(t, "A and B in sync", inSync(a, b))
			write(t, a.v, rand.New(rand.NewPCG(21, 1)), 200)
			waitFor(t, "pattern 1 replicated to B", inSync(a, b))
			same(t, a, b)

			// B's node is replaced by C.
			apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "a"})
			apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "c", PeerAddress: c.addr})
			waitFor(t, "full copy to C", inSync(a, c))
			if st := a.v.Status(); !st.Copy.FullCopy {
				t.Fatalf("the copy to a new replica was not a full copy: %+v", st.Copy)
			}
			if md := readMeta(t, a); md.PeerChanged || md.Peer != "c" {
				t.Fatalf("A's metadata after the full copy to C: peer %q peerChanged %v; want c, false", md.Peer, md.PeerChanged)
			}
			write(t, a.v, rand.New(rand.NewPCG(22, 2)), 200)
			waitFor(t, "pattern 2 replicated to C", inSync(a, c))
			same(t, a, c)
			if len(diffRegions(t, a, b)) == 0 {
				t.Fatal("B is not stale: the test proves nothing")
			}
			if st := b.v.Status(); st.DataState != volume.UpToDate || !st.Joined || st.PairUID != uidA {
				t.Fatalf("B before it returns: %s joined %v pair %q; want an UpToDate member of the pair", st.DataState, st.Joined, st.PairUID)
			}

			if variant == "restart before the peer change" {
				a.v.Close()
				a = reopen(t, a)
			}
			// B comes back, as A's peer again; B's own peer is A as it was.
			var logged bool
			apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 3, PeerNode: "a"})
			if variant == "restart after the peer change" {
				apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 3, PeerNode: "b"})
				if md := readMeta(t, a); !md.PeerChanged || md.Peer != "b" {
					t.Fatalf("A's metadata after its peer changed from C to B: peer %q peerChanged %v; want b, true", md.Peer, md.PeerChanged)
				}
				logged = strings.Contains(a.logs.String(), "Peer changed: the next resync copies everything")
				a.v.Close()
				a = reopen(t, a)
			}
			copied := a.v.Status().Copy.CopiedBytesTotal
			apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 3, PeerNode: "b", PeerAddress: b.addr})
			if variant != "restart after the peer change" {
				logged = strings.Contains(a.logs.String(), "Peer changed: the next resync copies everything")
			}
			waitFor(t, "A and B in sync again", inSync(a, b))
			same(t, a, b)
			st := a.v.Status()
			if !st.Copy.FullCopy || !strings.Contains(st.Copy.Reason, "a member was replaced") {
				t.Fatalf("the resync to the returning B: %+v; want a full copy because a member was replaced", st.Copy)
			}
			if n := st.Copy.CopiedBytesTotal - copied; n < size {
				t.Fatalf("the resync to the returning B copied %d bytes, not the whole volume", n)
			}
			if md := readMeta(t, a); md.PeerChanged || md.Peer != "b" {
				t.Fatalf("A's metadata after the full copy to B: peer %q peerChanged %v; want b, false", md.Peer, md.PeerChanged)
			}
			if !logged {
				t.Error("A did not log its peer change")
			}

			// The flag is cleared: the next handshake with B copies only
			// the diffs (none).
			copied = a.v.Status().Copy.CopiedBytesTotal
			apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 3, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr})
			waitFor(t, "A and B in sync after a new handshake", inSync(a, b))
			if st := a.v.Status(); st.Copy.FullCopy || st.Copy.CopiedBytesTotal != copied {
				t.Fatalf("a handshake after the peer change was resolved copied again: %+v", st.Copy)
			}
		})
	}
}

// rawHandshake dials a backup's replication listener as primary node at
// epoch for pair uidA and returns the connection, positioned after the
// handshake, and the backup's HelloAck.
func rawHandshake(t *testing.T, addr, node string, epoch uint64) (net.Conn, volume.HelloAck) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	h := repl.Hello{Volume: "ns/vol", Node: node, Role: string(volume.RolePrimary), Epoch: epoch, Size: size, RegionSize: region, PairUID: uidA}
	var hb bytes.Buffer
	if err := repl.WriteFrame(&hb, &repl.Frame{Type: repl.TypeHello, Epoch: epoch, Payload: h.Payload()}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(hb.Bytes()); err != nil {
		t.Fatal(err)
	}
	rd := repl.NewReader(bufio.NewReader(c), 0)
	f, err := rd.Next()
	if err != nil || f.Type != repl.TypeHelloAck {
		t.Fatalf("handshake: %v %v", f, err)
	}
	var ack volume.HelloAck
	if err := json.Unmarshal(f.Payload, &ack); err != nil {
		t.Fatal(err)
	}
	if f, err := rd.Next(); err != nil || f.Type != repl.TypeBitmap {
		t.Fatalf("handshake: %v %v, want the bitmap", f, err)
	}
	return c, ack
}

// TestBackupWithChangedPeerAsksFullCopy: the backup side of member
// replacement. B backs up A; the controller changes B's peer to D (a new
// writer). B's bitmaps track A, not D: its HelloAck must ask D for the
// whole volume (FullCopy), until a full copy from D has completed; a copy
// that began (ResyncBegin) but did not complete does not clear it. Before
// the fix B, joined to the pair with an empty bitmap, asked for nothing,
// and a writer that does not itself know B's bitmaps are stale copied
// only its own diffs: B reported UpToDate with A's data where D's
// differs.
func TestBackupWithChangedPeerAsksFullCopy(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b", PeerAddress: b.addr})
	write(t, a.v, rand.New(rand.NewPCG(31, 1)), 200)
	waitFor(t, "A and B in sync", inSync(a, b))
	a.v.Close()

	// B's writer changes: its peer is D now.
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "d"})
	conn, ack := rawHandshake(t, b.addr, "d", 2)
	if !ack.FullCopy || !ack.Joined || ack.PairUID != uidA {
		t.Fatalf("B's HelloAck to D: %+v; want FullCopy (its bitmaps track A)", ack)
	}
	if md := readMeta(t, b); !md.PeerChanged || md.Peer != "d" {
		t.Fatalf("B's metadata after its peer changed from A to D: peer %q peerChanged %v; want d, true", md.Peer, md.PeerChanged)
	}
	// D begins a full copy and goes away: the copy did not complete, B
	// must still ask for everything.
	var fb bytes.Buffer
	if err := repl.WriteFrame(&fb, &repl.Frame{Type: repl.TypeResyncBegin, Epoch: 2, Seq: 1, Offset: size}); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(fb.Bytes()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B Inconsistent at ResyncBegin", func() bool { return b.v.Status().DataState == volume.Inconsistent })
	conn.Close()
	waitFor(t, "B's stream from D ended", func() bool { return !b.v.Status().PeerConnected })
	conn, ack = rawHandshake(t, b.addr, "d", 2)
	if !ack.FullCopy {
		t.Fatalf("B's HelloAck after an interrupted full copy: %+v; want FullCopy", ack)
	}
	conn.Close()
	waitFor(t, "B's stream from D ended", func() bool { return !b.v.Status().PeerConnected })

	// D as a real writer whose own bitmaps know nothing of B (D's data:
	// all zeros). B's request alone must make the copy a full one.
	d := newMember(t, "d")
	apply(t, d, volume.Spec{Role: volume.RolePrimary, Epoch: 2, Initialize: true, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "D and B in sync", inSync(d, b))
	same(t, d, b)
	if st := d.v.Status(); !st.Copy.FullCopy || !strings.Contains(st.Copy.Reason, "track another member") {
		t.Fatalf("D's resync to B: %+v; want a full copy at B's request", st.Copy)
	}
	if md := readMeta(t, b); md.PeerChanged || md.DataState != meta.UpToDate || md.Peer != "d" {
		t.Fatalf("B's metadata after the full copy: peer %q peerChanged %v %s; want d, false, UpToDate", md.Peer, md.PeerChanged, md.DataState)
	}
	// Resolved: the next handshake copies only the diffs (none).
	copied := d.v.Status().Copy.CopiedBytesTotal
	apply(t, d, volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeSync, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "D and B in sync after a new handshake", inSync(d, b))
	if st := d.v.Status(); st.Copy.FullCopy || st.Copy.CopiedBytesTotal != copied {
		t.Fatalf("a handshake after B's full copy copied again: %+v", st.Copy)
	}
}

// TestPeerChangeFromUnknownPeer: a replica without a known peer (new) sets
// no flag when it is given one; a spec without a peer keeps the tracked
// one, so changing to a third member afterwards still sets it.
func TestPeerChangeFromUnknownPeer(t *testing.T) {
	a := newMember(t, "a")
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "b"})
	if md := readMeta(t, a); md.PeerChanged || md.Peer != "b" {
		t.Fatalf("a new replica given its first peer: peer %q peerChanged %v; want b, false", md.Peer, md.PeerChanged)
	}
	apply(t, a, volume.Spec{Role: volume.RoleNone, Epoch: 2})
	if md := readMeta(t, a); md.PeerChanged || md.Peer != "b" {
		t.Fatalf("after a spec without a peer: peer %q peerChanged %v; want b, false", md.Peer, md.PeerChanged)
	}
	a.v.Close()
	a = reopen(t, a)
	if md := readMeta(t, a); md.PeerChanged || md.Peer != "b" {
		t.Fatalf("after a restart: peer %q peerChanged %v; want b, false", md.Peer, md.PeerChanged)
	}
	apply(t, a, volume.Spec{Role: volume.RoleBackup, Epoch: 3, PeerNode: "c"})
	if md := readMeta(t, a); !md.PeerChanged || md.Peer != "c" {
		t.Fatalf("after the peer changed from b to c: peer %q peerChanged %v; want c, true", md.Peer, md.PeerChanged)
	}
	// Other metadata writes keep it.
	apply(t, a, volume.Spec{Role: volume.RoleBackup, Epoch: 4, PeerNode: "c"})
	a.v.Close()
	a = reopen(t, a)
	if md := readMeta(t, a); !md.PeerChanged || md.Peer != "c" || md.Epoch != 4 {
		t.Fatalf("after more writes and a restart: peer %q peerChanged %v epoch %d; want c, true, 4", md.Peer, md.PeerChanged, md.Epoch)
	}
}

// TestBackupOtherThanTrackedPeerGetsFullCopy: the bitmaps track one member;
// a spec without a peer node whose address leads to another member that
// holds the pair's (stale) data must not get only the diffs either, even
// though no peer change set the flag.
func TestBackupOtherThanTrackedPeerGetsFullCopy(t *testing.T) {
	a, b, c := newMember(t, "a"), newMember(t, "b"), newMember(t, "c")
	apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 1, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, PeerNode: "c", PeerAddress: c.addr})
	write(t, a.v, rand.New(rand.NewPCG(41, 1)), 100)
	waitFor(t, "A and C in sync", inSync(a, c))
	apply(t, b, volume.Spec{Role: volume.RoleBackup, Epoch: 2, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 2, PeerNode: "b", PeerAddress: b.addr})
	waitFor(t, "A and B in sync", inSync(a, b))
	write(t, a.v, rand.New(rand.NewPCG(42, 2)), 100)
	waitFor(t, "A and B in sync", inSync(a, b))
	if md := readMeta(t, a); md.PeerChanged || md.Peer != "b" {
		t.Fatalf("A's metadata: peer %q peerChanged %v; want b, false", md.Peer, md.PeerChanged)
	}
	apply(t, c, volume.Spec{Role: volume.RoleBackup, Epoch: 3, PeerNode: "a"})
	apply(t, a, volume.Spec{Role: volume.RolePrimary, Epoch: 3, PeerAddress: c.addr})
	waitFor(t, "A and C in sync", inSync(a, c))
	same(t, a, c)
	if st := a.v.Status(); !st.Copy.FullCopy {
		t.Fatalf("the resync to a member the bitmaps do not track: %+v; want a full copy", st.Copy)
	}
}
