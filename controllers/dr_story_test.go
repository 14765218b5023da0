package controllers

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// annotate merges annotations into the pair (an empty value removes one).
func (s *story) annotate(kv map[string]string) {
	s.t.Helper()
	vp := s.get()
	patch := client.MergeFrom(vp.DeepCopy())
	if vp.Annotations == nil {
		vp.Annotations = map[string]string{}
	}
	for k, v := range kv {
		if v == "" {
			delete(vp.Annotations, k)
		} else {
			vp.Annotations[k] = v
		}
	}
	if err := k8s.Patch(context.Background(), vp, patch); err != nil {
		s.t.Fatal(err)
	}
}

func blockedBy(reason string) func(*v1.VolumePair) bool {
	return func(vp *v1.VolumePair) bool {
		c := condOf(vp, v1.ConditionFailoverBlocked)
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == reason
	}
}

// regionOf reads n bytes at off of node's replica file.
func (s *story) regionOf(n *node, off, size int64) []byte {
	s.t.Helper()
	f, err := os.Open(n.dataPath(s.ns, s.name))
	if err != nil {
		s.t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, size)
	if _, err := f.ReadAt(b, off); err != nil {
		s.t.Fatal(err)
	}
	return b
}

// TestForcePromoteOutdatedBackup (issue #18, disaster recovery): a Sync
// pair's backup is lost, the writer goes on alone (the backup recorded
// Outdated), then the writer's node is lost for good. The Outdated backup
// is never promoted on its own; force-promote promotes it, recorded in
// status and an event; when the old writer returns it is resynced from the
// promoted member, and the writes it acknowledged alone are discarded, as
// the warning says.
func TestForcePromoteOutdatedBackup(t *testing.T) {
	s := newStory(t, v1.ModeSync, func(vp *v1.VolumePair) { vp.Spec.Failback.Policy = v1.PolicyManual })
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	if err := s.write(s.a, 0, pattern(0x11, 64<<10)); err != nil {
		t.Fatal(err)
	}
	s.agentsInSync(s.a)

	s.b.kill()
	// Acknowledged by node-a alone once node-b is recorded Outdated.
	if err := s.write(s.a, 0, pattern(0x22, 64<<10)); err != nil {
		t.Fatal(err)
	}
	s.waitFor(15*time.Second, "node-b Outdated", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus(s.b.name)
		return ms != nil && ms.DataState == v1.DataOutdated
	})
	s.a.kill()
	s.b.start()
	s.waitFor(20*time.Second, "FailoverBlocked/BackupOutdated", blockedBy(BlockedBackupOutdated))

	s.annotate(map[string]string{v1.AnnotationForcePromote: s.b.name, v1.AnnotationForcePromoteBy: "alice"})
	vp := s.waitFor(20*time.Second, "node-b promoted by force", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && cond(vp, v1.ConditionReady) && vp.Status.LastForcePromotion != nil
	})
	fp := vp.Status.LastForcePromotion
	if fp.Node != s.b.name || fp.From != s.a.name || fp.RequestedBy != "alice" || fp.BlockedBy != BlockedBackupOutdated || fp.Epoch != vp.Status.Epoch {
		t.Fatalf("lastForcePromotion %+v (epoch %d)", fp, vp.Status.Epoch)
	}
	s.waitFor(10*time.Second, "request annotations cleared", func(vp *v1.VolumePair) bool {
		return vp.Annotations[v1.AnnotationForcePromote] == "" && vp.Annotations[v1.AnnotationForcePromoteBy] == ""
	})
	testkit.Eventually(t, 10*time.Second, "a ForcePromoted event", func() (bool, string) {
		ev := s.events()
		return strings.Contains(ev, "ForcePromoted: "+s.b.name+" promoted by force") && strings.Contains(ev, "requested by alice"), ev
	})
	if err := s.write(s.b, 64<<10, pattern(0x33, 64<<10)); err != nil {
		t.Fatal(err)
	}

	// The old writer returns: resynced from node-b; its lone write is gone.
	s.a.start()
	s.waitFor(30*time.Second, "in sync on node-b", pairInSync(s.b.name))
	s.agentsInSync(s.b)
	s.sameData()
	if got := s.regionOf(s.a, 0, 64<<10); !bytes.Equal(got, pattern(0x11, 64<<10)) {
		t.Fatalf("node-a's region 0 after the resync starts with %#x, want node-b's 0x11 (node-a's lone write discarded)", got[0])
	}
}

// TestHoldReturningMember (issue #18, disaster recovery): a member named in
// hold-resync that returns after a failover is fenced, its data left as it
// came back, reported held, and never promoted on its own; released, it is
// resynced.
func TestHoldReturningMember(t *testing.T) {
	s := newStory(t, v1.ModeAsync, func(vp *v1.VolumePair) { vp.Spec.Failback.Policy = v1.PolicyManual })
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	if err := s.write(s.a, 0, pattern(0x44, 64<<10)); err != nil {
		t.Fatal(err)
	}
	s.agentsInSync(s.a)
	s.a.kill()
	s.waitFor(20*time.Second, "SWAP on node-b", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhaseSwap && vp.Status.ActivePrimary == s.b.name && cond(vp, v1.ConditionReady)
	})
	s.annotate(map[string]string{v1.AnnotationHoldResync: s.a.name})
	if err := s.write(s.b, 0, pattern(0x55, 64<<10)); err != nil {
		t.Fatal(err)
	}

	s.a.start()
	vp := s.waitFor(20*time.Second, "node-a held", func(vp *v1.VolumePair) bool {
		c, ms := condOf(vp, v1.ConditionDegraded), vp.Status.MemberStatus(s.a.name)
		return c != nil && c.Reason == ReasonResyncHeld && ms != nil && strings.Contains(ms.Message, "held out of resync")
	})
	testkit.Eventually(t, 10*time.Second, "node-a fenced at the current epoch", func() (bool, string) {
		st := statusOf(s.a, s.ns, s.name)
		return st != nil && st.Role == agentapi.RoleNone && st.Epoch == uint64(vp.Status.Epoch), fmt.Sprintf("status %+v", st)
	})
	if got := s.regionOf(s.a, 0, 64<<10); !bytes.Equal(got, pattern(0x44, 64<<10)) {
		t.Fatalf("held node-a's data changed: region 0 starts with %#x, want 0x44", got[0])
	}
	testkit.Eventually(t, 10*time.Second, "a ResyncHeld event", func() (bool, string) {
		ev := s.events()
		return strings.Count(ev, ReasonResyncHeld+": "+s.a.name+" is held out of resync") == 1, ev
	})

	// The writer is lost meanwhile: the held member is not promoted on
	// its own. The writer comes back, then the hold is lifted.
	s.b.kill()
	s.waitFor(20*time.Second, "FailoverBlocked/BackupHeld", blockedBy(BlockedBackupHeld))
	s.b.start()
	s.waitFor(20*time.Second, "node-b serves again", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && cond(vp, v1.ConditionReady)
	})
	s.annotate(map[string]string{v1.AnnotationHoldResync: ""})
	s.waitFor(30*time.Second, "in sync on node-b after the release", pairInSync(s.b.name))
	s.agentsInSync(s.b)
	s.sameData()
}

// TestForcePromoteExpiryAcrossRestart (Open 20): the age of a
// force-promote request that cannot act is kept in status.forcePromoteSeen,
// so a manager that starts after the request had waited longer than
// ForcePromoteTTL under its predecessor clears it at once, instead of
// counting ten minutes from its own first sight.
func TestForcePromoteExpiryAcrossRestart(t *testing.T) {
	s := newStory(t, v1.ModeAsync, func(vp *v1.VolumePair) { vp.Spec.Failback.Policy = v1.PolicyManual })
	m := startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	// Both members lost: a request for node-b cannot act (it is unreachable).
	s.b.kill()
	s.a.kill()
	s.annotate(map[string]string{v1.AnnotationForcePromote: s.b.name, v1.AnnotationForcePromoteBy: "alice"})
	vp := s.waitFor(20*time.Second, "the request's first sight recorded", func(vp *v1.VolumePair) bool {
		return vp.Status.ForcePromoteSeen != nil && vp.Status.ForcePromoteSeen.Node == s.b.name
	})
	if vp.Annotations[v1.AnnotationForcePromote] != s.b.name {
		t.Fatalf("the request was cleared before it expired: annotations %v", vp.Annotations)
	}

	// The manager stops; the request had been seen 11 minutes before.
	m.stop()
	vp = s.get()
	patch := client.MergeFrom(vp.DeepCopy())
	vp.Status.ForcePromoteSeen.Since = metav1.NewTime(vp.Status.ForcePromoteSeen.Since.Add(-(v1.ForcePromoteTTL + time.Minute)))
	if err := k8s.Status().Patch(context.Background(), vp, patch); err != nil {
		t.Fatal(err)
	}
	startManager(t, s.log, nil)
	s.waitFor(20*time.Second, "the request cleared by the new manager", func(vp *v1.VolumePair) bool {
		return vp.Annotations[v1.AnnotationForcePromote] == "" && vp.Status.ForcePromoteSeen == nil
	})
	testkit.Eventually(t, 10*time.Second, "a RequestIgnored event saying it expired", func() (bool, string) {
		ev := s.events()
		return strings.Contains(ev, "force-promote request of "+s.b.name+" expired and cleared"), ev
	})
	if vp := s.get(); vp.Status.ActivePrimary != s.a.name || vp.Status.LastForcePromotion != nil {
		t.Fatalf("after the expiry: writer %s, last force promotion %+v", vp.Status.ActivePrimary, vp.Status.LastForcePromotion)
	}
}
