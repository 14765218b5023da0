package controllers

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// linkInSync waits until writer's agent reports member m connected, with
// nothing to copy and nothing unreplicated, and m UpToDate.
func (s *story) linkInSync(writer, m *node) {
	s.t.Helper()
	testkit.Eventually(s.t, 30*time.Second, writer.name+" in sync with "+m.name, func() (bool, string) {
		w, p := statusOf(writer, s.ns, s.name), statusOf(m, s.ns, s.name)
		if w == nil || p == nil {
			return false, fmt.Sprintf("writer %v, member %v", w, p)
		}
		i := slices.IndexFunc(w.Peers, func(ps agentapi.PeerStatus) bool { return ps.Node == m.name })
		if i < 0 {
			return false, fmt.Sprintf("writer reports %+v", w.Peers)
		}
		ps := w.Peers[i]
		return ps.Connected && ps.OutOfSyncRegions == 0 && !ps.Copy.Running && ps.OldestUnreplicatedSeconds == 0 && p.DataState == agentapi.UpToDate,
			fmt.Sprintf("writer's view %+v; member %+v", ps, *p)
	}, testkit.Every(20*time.Millisecond))
}

// threeMemberStory creates a Sync pair of a story's two nodes with a third
// node as an additional backup in cMode, of the given size.
func threeMemberStory(t *testing.T, cMode v1.ReplicationMode, size string) (*story, *node) {
	t.Helper()
	s := newStory(t, v1.ModeSync, func(vp *v1.VolumePair) { vp.Spec.Size = resource.MustParse(size) })
	c := newNode(t, "node-c-"+s.ns, s.log)
	c.start()
	s.vp.Spec.AdditionalBackups = []v1.BackupMember{{Node: c.name, Mode: cMode}}
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	return s, c
}

// TestStoryThreeMembers: a Sync pair with an Async third member on three
// nodes. The writer is lost while the third member is away: the Sync
// backup, which holds every acknowledged write, is promoted; the third
// member comes back and gets from it only what it missed (a diff, not the
// volume); the old writer returns, is resynced by diff too and, the
// failback policy being Automatic, gets its role back. All three replicas
// end identical and the status lists each member.
func TestStoryThreeMembers(t *testing.T) {
	startLoggedManager(t)
	s, c := threeMemberStory(t, v1.ModeAsync, "256Mi")
	all3 := func(writer string) func(*v1.VolumePair) bool {
		return func(vp *v1.VolumePair) bool { return pairInSync(writer)(vp) && vp.Status.MembersInSync == "3/3" }
	}
	vp := s.waitFor(30*time.Second, "three members in sync", all3(s.a.name))
	if ms := vp.Status.MemberStatus(c.name); ms == nil || ms.Mode != v1.ModeAsync || ms.Role != v1.RoleBackup {
		t.Fatalf("status of the third member: %+v", ms)
	}
	if ms := vp.Status.MemberStatus(s.b.name); ms == nil || ms.Mode != v1.ModeSync {
		t.Fatalf("status of the Sync backup: %+v", ms)
	}
	for i := range 4 {
		if err := s.write(s.a, int64(i)<<20, pattern(0x30+byte(i), 512<<10)); err != nil {
			t.Fatal(err)
		}
	}
	s.linkInSync(s.a, s.b)
	s.linkInSync(s.a, c)

	// C away; A writes on (B, Sync, holds every write); A lost.
	c.kill()
	s.waitFor(20*time.Second, "Degraded without "+c.name, func(vp *v1.VolumePair) bool {
		d := condOf(vp, v1.ConditionDegraded)
		return d != nil && d.Status == "True" && strings.Contains(d.Message, c.name) && vp.Status.MembersInSync == "2/3"
	})
	for i := range 4 {
		if err := s.write(s.a, int64(4+i)<<20, pattern(0x50+byte(i), 256<<10)); err != nil {
			t.Fatal(err)
		}
	}
	s.linkInSync(s.a, s.b)
	s.a.kill()
	s.waitFor(30*time.Second, "failover to the Sync backup "+s.b.name, func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2 && cond(vp, v1.ConditionReady)
	})

	// C returns: a diff from B, not the volume.
	copied := statusOf(s.b, s.ns, s.name).Copy.CopiedBytesTotal
	c.start()
	s.linkInSync(s.b, c)
	size := s.vp.Spec.SizeBytes()
	t.Logf("B copied %d bytes to the returning C (volume %d bytes)", statusOf(s.b, s.ns, s.name).Copy.CopiedBytesTotal-copied, size)
	if n := statusOf(s.b, s.ns, s.name).Copy.CopiedBytesTotal - copied; n <= 0 || n >= size/8 {
		t.Fatalf("B copied %d bytes to the returning C; want a diff (the 1 MiB written while C was away, with its extents), not the %d-byte volume", n, size)
	}
	if hb, hc := testkit.FileSHA256(t, s.b.dataPath(s.ns, s.name)), testkit.FileSHA256(t, c.dataPath(s.ns, s.name)); hb != hc {
		t.Fatalf("replicas on %s and %s differ", s.b.name, c.name)
	}

	// A returns: resynced by diff, then the automatic failback.
	copied = statusOf(s.b, s.ns, s.name).Copy.CopiedBytesTotal
	s.a.start()
	vp = s.waitFor(60*time.Second, "failback to "+s.a.name+", three members in sync", func(vp *v1.VolumePair) bool {
		return all3(s.a.name)(vp) && vp.Status.Epoch == 3
	})
	t.Logf("B copied %d bytes to the returning A", statusOf(s.b, s.ns, s.name).Copy.CopiedBytesTotal-copied)
	if n := statusOf(s.b, s.ns, s.name).Copy.CopiedBytesTotal - copied; n >= size/8 {
		t.Fatalf("B copied %d bytes to the returning A; want a diff, not the %d-byte volume", n, size)
	}
	s.linkInSync(s.a, s.b)
	s.linkInSync(s.a, c)
	ha := testkit.FileSHA256(t, s.a.dataPath(s.ns, s.name))
	for _, n := range []*node{s.b, c} {
		if h := testkit.FileSHA256(t, n.dataPath(s.ns, s.name)); h != ha {
			t.Fatalf("replicas on %s and %s differ", s.a.name, n.name)
		}
	}
	if len(vp.Status.Members) != 3 {
		t.Fatalf("status lists %d members: %+v", len(vp.Status.Members), vp.Status.Members)
	}
}

// TestStoryThreeMembersWriterCutFromAPI: quorum with three members. The
// writer A loses only the API server; it still reaches B and C over the
// replication links and the controller still reaches it. A has two members
// with it, the majority of the pair by count, and still stops writing once
// it cannot renew its authority (it fences itself); B is promoted only
// after that, and at no moment do two members accept writes. The API
// server's Lease is the tie-breaker, not a count of members.
func TestStoryThreeMembersWriterCutFromAPI(t *testing.T) {
	startLoggedManager(t)
	s, c := threeMemberStory(t, v1.ModeSync, "16Mi")
	s.waitFor(30*time.Second, "three members in sync", func(vp *v1.VolumePair) bool {
		return pairInSync(s.a.name)(vp) && vp.Status.MembersInSync == "3/3"
	})
	if err := s.write(s.a, 0, pattern(0x7a, 256<<10)); err != nil {
		t.Fatal(err)
	}
	s.linkInSync(s.a, s.b)
	s.linkInSync(s.a, c)

	// A loses the API server only.
	s.a.down.Store(true)
	cut := time.Now()
	var writersAtOnce, samples int
	var aFenced time.Duration
	nodes := []*node{s.a, s.b, c}
	testkit.Eventually(t, 60*time.Second, "another member promoted", func() (bool, string) {
		writable := 0
		var who []string
		for _, n := range nodes {
			if st := statusOf(n, s.ns, s.name); st != nil && st.Writable {
				writable++
				who = append(who, n.name)
			}
		}
		samples++
		if writable > 1 {
			writersAtOnce++
		}
		if aFenced == 0 && !slices.Contains(who, s.a.name) {
			aFenced = time.Since(cut)
		}
		return len(who) == 1 && who[0] != s.a.name, fmt.Sprintf("writable: %v", who)
	}, testkit.Every(20*time.Millisecond))
	if writersAtOnce > 0 {
		t.Fatalf("two members accepted writes at once in %d of %d samples", writersAtOnce, samples)
	}
	vp := s.waitFor(20*time.Second, "the status names the new writer", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary != s.a.name && vp.Status.Epoch >= 2
	})
	t.Logf("A fenced itself %.1fs after losing the API server; %s promoted at epoch %d (%d samples, never two writers)",
		aFenced.Seconds(), vp.Status.ActivePrimary, vp.Status.Epoch, samples)
	if err := s.write(s.a, 1<<20, pattern(0x7b, 4096)); err == nil {
		t.Fatal("A, cut from the API server, accepted a write after the failover")
	}
	writer := s.b
	if vp.Status.ActivePrimary == c.name {
		writer = c
	}
	if err := s.write(writer, 2<<20, pattern(0x7c, 4096)); err != nil {
		t.Fatalf("the new writer %s refused a write: %v", writer.name, err)
	}

	// A reaches the API server again: it rejoins as a backup, in sync.
	s.a.down.Store(false)
	s.waitFor(60*time.Second, "three members in sync again", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == writer.name && cond(vp, v1.ConditionReady) && vp.Status.MembersInSync == "3/3"
	})
}
