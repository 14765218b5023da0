package controllers

import (
	"context"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestStoryUnmergedRegions: the method's second embodiment
// (spec.resync.mergePrimaryBitmap false). The primary is cut off from its
// backup, acknowledges writes alone, and is lost; the backup takes over. When
// the old primary returns, only the acting primary's diff is copied: the
// returning member keeps its unshipped writes, so the replicas differ. The
// status must say so; before, it reported Synchronized/InSync and every
// member UpToDate while the replicas differed.
func TestStoryUnmergedRegions(t *testing.T) {
	s := newStory(t, v1.ModeAsync, func(vp *v1.VolumePair) {
		vp.Spec.Resync.MergePrimaryBitmap = ptr.To(false)
		vp.Spec.Failback.Policy = v1.PolicyManual
	})
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))

	// The primary loses its replication link and writes alone.
	s.a.netw.cutReplication(true)
	for i := range 4 {
		if err := s.write(s.a, int64(i)<<20, pattern(0xa0+byte(i), 64<<10)); err != nil {
			t.Fatal(err)
		}
	}
	s.a.kill()
	s.waitFor(30*time.Second, "failover to the backup", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2
	})
	if err := s.write(s.b, 8<<20, pattern(0xbb, 64<<10)); err != nil {
		t.Fatal(err)
	}
	s.a.netw.cutReplication(false)
	s.a.start()
	s.waitFor(30*time.Second, "NORMAL: the returning member is back", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus(s.a.name)
		return vp.Status.Phase == v1.PhaseNormal && ms != nil && ms.DataState == v1.DataUpToDate && ms.Connected
	})
	if ha, hb := testkit.FileSHA256(t, s.a.dataPath(s.ns, s.name)), testkit.FileSHA256(t, s.b.dataPath(s.ns, s.name)); ha == hb {
		t.Fatal("the replicas are identical: the scenario did not leave unshipped writes on the returning member")
	}
	vp := s.waitFor(10*time.Second, "the unmerged regions reported", func(vp *v1.VolumePair) bool {
		return vp.Status.UnmergedRegions > 0
	})
	c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionSynchronized)
	if c == nil || c.Status != "False" || c.Reason != ReasonUnmergedRegions {
		t.Fatalf("the replicas differ but Synchronized is %+v", c)
	}
	// The returning member's 4 writes are in 4 regions; the journal may
	// round them up to whole extents, never down.
	if vp.Status.UnmergedRegions < 4 {
		t.Fatalf("unmergedRegions = %d, want at least the 4 regions written alone", vp.Status.UnmergedRegions)
	}
	t.Logf("unmerged regions reported: %d; Synchronized: %s/%s: %s", vp.Status.UnmergedRegions, c.Status, c.Reason, c.Message)
}
