package controllers

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestStoryReplaceMember: a member's node is replaced in the spec. The new
// node gets a full copy (never a writer meanwhile), the pair is in sync on
// the new member and the old member's replica is deleted afterwards. An old
// member that was unreachable keeps its replica, listed in
// status.removedMembers; if it is made a member again while it holds stale
// data, it gets a full copy too (the writer's bitmaps describe the member
// it replaced), never a diff. Replacing the writer is refused until the
// writer role has moved.
func TestStoryReplaceMember(t *testing.T) {
	s := replaceStory(t)
	for i := range 8 {
		if err := s.write(s.a, int64(i)<<20, pattern(0x40+byte(i), 256<<10)); err != nil {
			t.Fatal(err)
		}
	}
	c := newNode(t, "node-c-"+s.ns, s.log)
	c.start()
	size := s.vp.Spec.SizeBytes()

	copied := func() int64 { return statusOf(s.a, s.ns, s.name).Copy.CopiedBytesTotal }
	identical := func(x, y *node) {
		t.Helper()
		if hx, hy := testkit.FileSHA256(t, x.dataPath(s.ns, s.name)), testkit.FileSHA256(t, y.dataPath(s.ns, s.name)); hx != hy {
			t.Fatalf("replicas on %s and %s differ", x.name, y.name)
		}
	}
	inSyncWith := func(n *node, since time.Time) func(vp *v1.VolumePair) bool {
		return func(vp *v1.VolumePair) bool {
			ms := vp.Status.MemberStatus(n.name)
			return pairInSync(s.a.name)(vp) && ms != nil && ms.DataState == v1.DataUpToDate && ms.LastSeen != nil && ms.LastSeen.After(since)
		}
	}

	// 1. The writer's node cannot be replaced.
	s.replaceNode(s.a.name, "node-gone-"+s.ns)
	blocked := s.waitFor(20*time.Second, "FailoverBlocked/WriterReplaced", func(vp *v1.VolumePair) bool {
		c := condOf(vp, v1.ConditionFailoverBlocked)
		return c != nil && c.Reason == BlockedWriterReplaced && strings.Contains(c.Message, "a writer cannot be replaced")
	})
	if strings.Contains(s.events(), "MemberReplaced") {
		t.Fatalf("a refused replacement of the writer was announced:\n%s", s.events())
	}
	if len(blocked.Status.RemovedMembers) != 0 || blocked.Status.MemberStatus(s.a.name) == nil {
		t.Fatalf("the writer whose replacement is refused must stay a member, not be listed for deletion: members %+v, removed %+v",
			blocked.Status.Members, blocked.Status.RemovedMembers)
	}
	if err := s.write(s.a, 9<<20, pattern(0x49, 64<<10)); err != nil {
		t.Fatalf("the writer stopped serving while its replacement was refused: %v", err)
	}
	s.replaceNode("node-gone-"+s.ns, s.a.name)

	// 2. The backup is replaced by node c: a full copy, then in sync, then
	// the old replica is deleted.
	before := copied()
	at := time.Now()
	s.replaceNode(s.b.name, c.name)
	vp := s.waitFor(60*time.Second, "in sync with the new member "+c.name, inSyncWith(c, at))
	if got := copied() - before; got < size {
		t.Fatalf("the copy to the new member was %d bytes, not the whole volume (%d)", got, size)
	}
	s.agentsInSyncWith(s.a, c)
	identical(s.a, c)
	testkit.Eventually(t, 20*time.Second, "the old member's replica deleted", func() (bool, string) {
		vp = s.get()
		_, err := os.Stat(s.b.dataPath(s.ns, s.name))
		return len(vp.Status.RemovedMembers) == 0 && os.IsNotExist(err), fmt.Sprintf("removed %+v, stat %v", vp.Status.RemovedMembers, err)
	}, testkit.Every(100*time.Millisecond))
	if vp.Status.MemberStatus(s.b.name) != nil {
		t.Fatalf("the old member is still in status.members: %+v", vp.Status.Members)
	}
	for _, want := range []string{"MemberReplaced", "MemberRemoved"} {
		if ev := s.events(); !strings.Contains(ev, want) {
			t.Errorf("no %s event:\n%s", want, ev)
		}
	}

	// 3. Node c is replaced by b while c is down: c keeps its replica,
	// listed; writes go on (b not there yet), then c becomes a member
	// again holding stale data: it must get everything, not a diff.
	if err := s.write(s.a, 10<<20, pattern(0x4a, 64<<10)); err != nil {
		t.Fatal(err)
	}
	s.agentsInSyncWith(s.a, c)
	c.kill()
	at = time.Now()
	s.replaceNode(c.name, s.b.name)
	s.waitFor(60*time.Second, "in sync with "+s.b.name+" again", inSyncWith(s.b, at))
	vp = s.waitFor(20*time.Second, "the unreachable old member listed", func(vp *v1.VolumePair) bool {
		return len(vp.Status.RemovedMembers) == 1 && vp.Status.RemovedMembers[0].Node == c.name && strings.Contains(vp.Status.RemovedMembers[0].Message, "could not be deleted yet")
	})
	for i := range 4 {
		if err := s.write(s.a, int64(i)<<20, pattern(0x60+byte(i), 128<<10)); err != nil {
			t.Fatal(err)
		}
	}
	before = copied()
	at = time.Now()
	s.replaceNode(s.b.name, c.name)
	c.start()
	s.waitFor(60*time.Second, "in sync with the returning stale member "+c.name, inSyncWith(c, at))
	if got := copied() - before; got < size {
		t.Fatalf("the copy to the stale returning member was %d bytes, not the whole volume (%d)", got, size)
	}
	s.agentsInSyncWith(s.a, c)
	identical(s.a, c)
}

// TestStoryReplaceLostPrimary: the spec's primary is lost for good; the
// backup took over (failover). The user replaces the lost node by a new
// one: it gets a full copy from the acting writer and, with the automatic
// failback, becomes the writer once it holds the data. The lost node is
// listed until it answers again; then its stale replica is deleted, and
// nothing of it is ever copied back.
func TestStoryReplaceLostPrimary(t *testing.T) {
	s := replaceStory(t)
	if err := s.write(s.a, 0, pattern(0x71, 1<<20)); err != nil {
		t.Fatal(err)
	}
	s.agentsInSync(s.a)
	s.a.kill()
	s.waitFor(30*time.Second, "failover to "+s.b.name, func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2 && cond(vp, v1.ConditionReady)
	})
	if err := s.write(s.b, 2<<20, pattern(0x72, 1<<20)); err != nil {
		t.Fatal(err)
	}

	c := newNode(t, "node-c-"+s.ns, s.log)
	c.start()
	s.replaceNode(s.a.name, c.name)
	// The automatic failback makes the new node the writer once it holds
	// the data (epoch 3).
	vp := s.waitFor(60*time.Second, c.name+" the writer, in sync with "+s.b.name, func(vp *v1.VolumePair) bool {
		return pairInSync(c.name)(vp) && vp.Status.Epoch == 3
	})
	if len(vp.Status.RemovedMembers) != 1 || vp.Status.RemovedMembers[0].Node != s.a.name {
		t.Fatalf("removed members %+v, want the lost %s listed until it answers", vp.Status.RemovedMembers, s.a.name)
	}
	s.agentsInSyncWith(c, s.b)
	if hc, hb := testkit.FileSHA256(t, c.dataPath(s.ns, s.name)), testkit.FileSHA256(t, s.b.dataPath(s.ns, s.name)); hc != hb {
		t.Fatalf("replicas on %s and %s differ", c.name, s.b.name)
	}
	// The lost node comes back: its stale replica is deleted.
	s.a.start()
	testkit.Eventually(t, 30*time.Second, "the returned old member's replica deleted", func() (bool, string) {
		vp = s.get()
		_, err := os.Stat(s.a.dataPath(s.ns, s.name))
		return len(vp.Status.RemovedMembers) == 0 && os.IsNotExist(err), fmt.Sprintf("removed %+v, stat %v", vp.Status.RemovedMembers, err)
	}, testkit.Every(100*time.Millisecond))
	if vp.Status.ActivePrimary != c.name {
		t.Fatalf("the writer is %s, want %s", vp.Status.ActivePrimary, c.name)
	}
}

// replaceStory starts a manager and a Sync pair of two fresh nodes, in sync.
func replaceStory(t *testing.T) *story {
	t.Helper()
	startLoggedManager(t)
	s := newStory(t, v1.ModeSync, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	return s
}

// replaceNode changes the member on node from to node to in the spec.
func (s *story) replaceNode(from, to string) {
	s.t.Helper()
	testkit.Eventually(s.t, 10*time.Second, "spec updated", func() (bool, error) {
		vp := s.get()
		switch from {
		case vp.Spec.Primary.Node:
			vp.Spec.Primary.Node = to
		case vp.Spec.Backup.Node:
			vp.Spec.Backup.Node = to
		default:
			return false, fmt.Errorf("%s is not a member of %+v", from, vp.Spec)
		}
		err := k8s.Update(context.Background(), vp)
		return err == nil, err
	}, testkit.Every(100*time.Millisecond))
}
