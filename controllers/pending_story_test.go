package controllers

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// pendingFor waits until the pair is PENDING with Ready's reason, whose
// message names every one of want.
func (s *story) pendingFor(reason string, want ...string) *v1.VolumePair {
	s.t.Helper()
	return s.waitFor(15*time.Second, "PENDING/"+reason, func(vp *v1.VolumePair) bool {
		c := condOf(vp, v1.ConditionReady)
		if vp.Status.Phase != v1.PhasePending || c == nil || c.Status != metav1.ConditionFalse || c.Reason != reason {
			return false
		}
		for _, w := range want {
			if !strings.Contains(c.Message, w) {
				return false
			}
		}
		return true
	})
}

// staysPending checks, over a few probe periods and the authority's Lease
// duration (in which a writer without an agent would have been created and
// failed over), that the pair gets no authority Lease and stays PENDING.
func (s *story) staysPending(reason string) {
	s.t.Helper()
	name, err := authority.LeaseName(s.get().UID)
	if err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := cs.CoordinationV1().Leases(opNS).Get(context.Background(), name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			s.t.Fatalf("the pair has an authority Lease (err %v) while a member has no agent", err)
		}
		if vp := s.get(); vp.Status.Phase != v1.PhasePending || condOf(vp, v1.ConditionReady).Reason != reason {
			s.t.Fatalf("the pair left PENDING/%s: %+v", reason, vp.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// eventsWithout fails when the pair's events record one of reasons, and
// returns them.
func (s *story) eventsWithout(reasons ...string) string {
	s.t.Helper()
	ev := s.events()
	for _, r := range reasons {
		if strings.Contains(ev, r+":") {
			s.t.Fatalf("event %s recorded:\n%s", r, ev)
		}
	}
	return ev
}

// TestPairWaitsForItsAgent (issue #19): a pair naming a node with no Tandem
// agent is not given a writer there (before, node-z became the writer at
// epoch 1 and "failed over" to node-a two probes later: a failover that
// never was). It waits, PENDING, with the reason naming the field and the
// node, one event, and starts by itself, with the named node as the writer
// at epoch 1, once that node's agent registers.
func TestPairWaitsForItsAgent(t *testing.T) {
	s := newStory(t, v1.ModeSync, nil)
	z := newNode(t, "node-z-"+s.ns, s.log)
	s.vp.Spec.Primary = v1.Member{Node: z.name}
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	vp := s.pendingFor(PendingAgentNotRegistered, "spec.primary.node", z.name)
	if vp.Status.ActivePrimary != "" || vp.Status.Endpoint != "" {
		t.Fatalf("a pending pair shows a writer: %+v", vp.Status)
	}
	if ms := vp.Status.MemberStatus(z.name); ms == nil || !strings.Contains(ms.Message, "no Tandem agent") {
		t.Fatalf("member %s: %+v", z.name, ms)
	}
	s.staysPending(PendingAgentNotRegistered)
	ev := s.eventsWithout("Failover", "AuthorityCreated")
	if n := strings.Count(ev, PendingAgentNotRegistered+":"); n != 1 {
		t.Fatalf("%d %s events, want 1:\n%s", n, PendingAgentNotRegistered, ev)
	}

	z.start()
	vp = s.waitFor(20*time.Second, "PAIR with node-z writing", pairInSync(z.name))
	if vp.Status.Epoch != 1 || vp.Status.LastFailoverTime != nil || vp.Status.Phase != v1.PhasePair {
		t.Fatalf("the pair did not start cleanly: %+v", vp.Status)
	}
	s.eventsWithout("Failover")
}

// TestPairWaitsForItsNode: with Node objects in the cluster, a member
// naming a node that does not exist is MemberNotFound (a typo, or a node not
// joined yet); the pair starts once the node joins and its agent registers.
func TestPairWaitsForItsNode(t *testing.T) {
	s := newStory(t, v1.ModeAsync, nil)
	q := newNode(t, "node-q-"+s.ns, s.log)
	for _, n := range []string{s.a.name, s.b.name} {
		createNode(t, n)
	}
	s.vp.Spec.Backup = v1.Member{Node: q.name}
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.pendingFor(PendingMemberNotFound, "spec.backup.node", q.name, "does not exist")
	s.staysPending(PendingMemberNotFound)

	createNode(t, q.name)
	s.pendingFor(PendingAgentNotRegistered, "spec.backup.node", q.name)
	q.start()
	vp := s.waitFor(20*time.Second, "PAIR in sync with node-q", func(vp *v1.VolumePair) bool {
		return pairInSync(s.a.name)(vp) && vp.Status.MemberStatus(q.name) != nil && vp.Status.MemberStatus(q.name).DataState == v1.DataUpToDate
	})
	if vp.Status.Epoch != 1 {
		t.Fatalf("epoch %d, want 1", vp.Status.Epoch)
	}
	s.eventsWithout("Failover")

	// node-q is retired later: its Node deleted, its agent gone. The pair
	// is Degraded because a member's node no longer exists, which says to
	// replace it; nothing fails over (it is not the writer).
	q.kill()
	if err := k8s.Delete(context.Background(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: q.name}}); err != nil {
		t.Fatal(err)
	}
	vp = s.waitFor(20*time.Second, "Degraded/MemberNotFound, the member's message saying so", func(vp *v1.VolumePair) bool {
		c, ms := condOf(vp, v1.ConditionDegraded), vp.Status.MemberStatus(q.name)
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == ReasonMemberNotFound && strings.Contains(c.Message, "spec.backup.node") &&
			ms != nil && strings.Contains(ms.Message, "no longer exists")
	})
	if vp.Status.ActivePrimary != s.a.name || vp.Status.Epoch != 1 {
		t.Fatalf("the writer moved: %+v", vp.Status)
	}
	testkit.Eventually(t, 10*time.Second, "a MemberNotFound event", func() (bool, string) {
		ev := s.events()
		return strings.Contains(ev, ReasonMemberNotFound+": "+s.a.name+" runs without "+q.name), ev
	})
	s.eventsWithout("Failover")
}

// createNode creates a Ready Node object, deleted when the test ends (the
// controllers' suites otherwise run without Nodes).
func createNode(t *testing.T, name string) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := k8s.Create(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
	if err := k8s.Status().Update(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}) })
}

// TestFailoverRequestOnServingWriter (issue #19): a failover requested while
// the writer serves is cleared with a Warning event saying why. Before, the
// annotation stayed, and with a Manual policy the backup was promoted the
// moment the writer was next lost, without anyone asking then.
func TestFailoverRequestOnServingWriter(t *testing.T) {
	s := newStory(t, v1.ModeAsync, func(vp *v1.VolumePair) {
		vp.Spec.Failover.Policy = v1.PolicyManual
		vp.Spec.Failback.Policy = v1.PolicyManual
	})
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	for _, ann := range []string{v1.AnnotationFailoverRequested, v1.AnnotationFailbackRequested} {
		vp := s.get()
		patch := client.MergeFrom(vp.DeepCopy())
		vp.Annotations = map[string]string{ann: time.Now().Format(time.RFC3339)}
		if err := k8s.Patch(context.Background(), vp, patch); err != nil {
			t.Fatal(err)
		}
		s.waitFor(10*time.Second, ann+" cleared", func(vp *v1.VolumePair) bool { return vp.Annotations[ann] == "" })
	}
	testkit.Eventually(t, 10*time.Second, "RequestIgnored events", func() (bool, string) {
		ev := s.events()
		return strings.Count(ev, ReasonRequestIgnored+": failover request ignored") == 1 &&
			strings.Count(ev, ReasonRequestIgnored+": failback request ignored") == 1, ev
	})
	if vp := s.get(); vp.Status.Epoch != 1 || vp.Status.ActivePrimary != s.a.name {
		t.Fatalf("the request moved the writer: %+v", vp.Status)
	}

	// The writer is lost now: with the Manual policy, nothing happens
	// until someone asks again.
	s.a.kill()
	vp := s.waitFor(15*time.Second, "FailoverBlocked/ManualPolicy", func(vp *v1.VolumePair) bool {
		c := condOf(vp, v1.ConditionFailoverBlocked)
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == BlockedManualPolicy
	})
	if vp.Status.ActivePrimary != s.a.name || vp.Status.Epoch != 1 {
		t.Fatalf("failed over without a request: %+v", vp.Status)
	}
}

// TestPendingPairNodeCorrected: correcting a typo in a member's node of a
// pair that never started leaves nothing behind. Before, the misspelt node
// became a removed member "whose replica is deleted once the pair is in
// sync", which no agent could ever delete (RemovedMemberPending for ever),
// and a MemberReplaced event announced a full copy.
func TestPendingPairNodeCorrected(t *testing.T) {
	s := newStory(t, v1.ModeAsync, nil)
	typo := "node-aa-" + s.ns
	s.vp.Spec.Primary = v1.Member{Node: typo}
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	vp := s.pendingFor(PendingAgentNotRegistered, typo)
	patch := client.MergeFrom(vp.DeepCopy())
	vp.Spec.Primary.Node = s.a.name
	if err := k8s.Patch(context.Background(), vp, patch); err != nil {
		t.Fatal(err)
	}
	vp = s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	if len(vp.Status.RemovedMembers) != 0 || vp.Status.MemberStatus(typo) != nil || vp.Status.Epoch != 1 {
		t.Fatalf("the misspelt node is still in the status: %+v", vp.Status)
	}
	s.eventsWithout("MemberReplaced", "RemovedMemberPending", "Failover")
}

// TestDeletePendingPair: deleting a pair that never started (its primary's
// node has no agent) completes at once and warns about no replica: none
// was ever created. Before, a TeardownIncomplete event told the user to
// remove files by hand on a node where there were none.
func TestDeletePendingPair(t *testing.T) {
	s := newStory(t, v1.ModeAsync, nil)
	s.vp.Spec.Primary = v1.Member{Node: "node-nowhere-" + s.ns}
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.pendingFor(PendingAgentNotRegistered, "node-nowhere-"+s.ns)
	if err := k8s.Delete(context.Background(), s.get()); err != nil {
		t.Fatal(err)
	}
	s.waitGone()
	s.eventsWithout("TeardownIncomplete")
}
