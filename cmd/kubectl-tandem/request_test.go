package main

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// healthyPair is in PAIR: node-a, the preferred primary, serves and
// mirrors to node-b.
func healthyPair() *storagev1alpha1.VolumePair {
	vp := testPair()
	vp.Status = storagev1alpha1.VolumePairStatus{
		Phase: storagev1alpha1.PhasePair, ActivePrimary: "node-a", Epoch: 3,
		Members: []storagev1alpha1.MemberStatus{
			{Node: "node-a", Role: storagev1alpha1.RolePrimary, DataState: storagev1alpha1.DataUpToDate, Connected: true, LastSeen: ptrTime(time.Second)},
			{Node: "node-b", Role: storagev1alpha1.RoleBackup, DataState: storagev1alpha1.DataUpToDate, Connected: true, LastSeen: ptrTime(time.Second)},
		},
		Conditions: []metav1.Condition{{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: "node-a serves the volume", LastTransitionTime: at(time.Hour)}},
	}
	return vp
}

// writerLostPair: node-a, the writer of a Manual pair, is lost; the
// controller waits for a request to promote node-b.
func writerLostPair() *storagev1alpha1.VolumePair {
	vp := healthyPair()
	vp.Spec.Failover.Policy = storagev1alpha1.PolicyManual
	vp.Status.Members[0].Connected = false
	vp.Status.Conditions = []metav1.Condition{
		{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionFalse, Reason: "WriterUnreachable", Message: "the agent on node-a does not answer", LastTransitionTime: at(time.Minute)},
		{Type: storagev1alpha1.ConditionFailoverBlocked, Status: metav1.ConditionTrue, Reason: "ManualPolicy", Message: "failover policy is Manual", LastTransitionTime: at(time.Minute)},
	}
	return vp
}

// waitingPair has a status but no writer yet (its members are not ready).
func waitingPair() *storagev1alpha1.VolumePair {
	vp := testPair()
	vp.Status = storagev1alpha1.VolumePairStatus{Phase: storagev1alpha1.PhasePair, Conditions: []metav1.Condition{
		{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionFalse, Reason: "NoWriter", Message: "no member holds the writer's authority yet", LastTransitionTime: at(time.Minute)},
	}}
	return vp
}

// swappedPair is in SWAP: node-b took over after node-a was lost.
func swappedPair() *storagev1alpha1.VolumePair {
	vp := healthyPair()
	vp.Status.Phase, vp.Status.ActivePrimary, vp.Status.Epoch = storagev1alpha1.PhaseSwap, "node-b", 4
	vp.Status.Conditions[0].Message = "node-b serves the volume"
	return vp
}

// TestRequestRefused: failover and failback refuse, naming the cause and
// what to use instead, a request the controller would not act on, and then
// set nothing (a request left set would fire later, when the user did not
// ask); they set the request when it can be acted on.
func TestRequestRefused(t *testing.T) {
	noStatus := testPair()
	deleting := writerLostPair()
	deleting.DeletionTimestamp = ptrTime(time.Minute)
	deleting.Finalizers = []string{storagev1alpha1.Finalizer}
	const swapCmd = `kubectl patch volumepair db -n prod --type=merge -p '{"spec":{"primary":{"node":"node-b"},"backup":{"node":"node-a"}}}'`
	for _, tt := range []struct {
		name string
		vp   *storagev1alpha1.VolumePair
		verb string
		want []string // in the error; none: the request is set
	}{
		{"failover of a healthy pair", healthyPair(), "failover", []string{
			"failover of volumepair prod/db refused, nothing was changed: the writer node-a is serving (condition Ready: Serving, node-a serves the volume)",
			"failover is for a writer that is lost",
			"For a planned switch of the writer to node-b while node-a serves (writes are held and drained: none is lost), swap spec.primary.node and spec.backup.node: " + swapCmd,
			"run this again once kubectl tandem status db -n prod shows Ready False",
		}},
		{"failover while the backup serves", swappedPair(), "failover", []string{
			"the writer node-b is serving",
			"node-b already took over from node-a; to give the writer role back to node-a, use kubectl tandem failback db -n prod",
		}},
		{"failover before the controller reported", noStatus, "failover", []string{
			"failover of volumepair prod/db refused, nothing was changed: the controller has not reported a status for it yet, so no member is the writer: is the Tandem manager running (kubectl tandem version)?",
		}},
		{"failover of a pair being deleted", deleting, "failover", []string{"the VolumePair is being deleted (since 2026-05-01T11:59:00Z)"}},
		{"failover of a pair that never had a writer", waitingPair(), "failover", []string{
			"failover of volumepair prod/db refused, nothing was changed: no member has been the writer yet (condition Ready: NoWriter, no member holds the writer's authority yet), so there is none to take the role from: kubectl tandem status db -n prod shows what the pair waits for"}},
		{"failback of a pair that never had a writer", waitingPair(), "failback", []string{"no member has been the writer yet"}},
		{"failover of a lost writer", writerLostPair(), "failover", nil},
		{"failback of a healthy pair", healthyPair(), "failback", []string{
			"failback of volumepair prod/db refused, nothing was changed: node-a (spec.primary) is already the writer (phase PAIR)",
			"there is nothing to give back",
			"For a planned switch of the writer to node-b, swap spec.primary.node and spec.backup.node: " + swapCmd,
		}},
		{"failback before the controller reported", noStatus, "failback", []string{"the controller has not reported a status for it yet"}},
		{"failback after a failover", swappedPair(), "failback", nil},
		{"failback during the copy back", copyingPair(), "failback", nil},
	} {
		res := runPluginFake(t, []client.Object{tt.vp.DeepCopy()}, tt.verb, "db")
		var got storagev1alpha1.VolumePair
		if err := res.c.Get(t.Context(), client.ObjectKey{Namespace: "prod", Name: "db"}, &got); err != nil {
			t.Fatal(err)
		}
		annotation := failoverRequest.annotation
		if tt.verb == "failback" {
			annotation = failbackRequest.annotation
		}
		set := got.Annotations[annotation] != "" && got.Annotations[annotation] != tt.vp.Annotations[annotation]
		if tt.want == nil {
			if res.err != nil || !set {
				t.Errorf("%s: %v, annotation %q; want the request set", tt.name, res.err, got.Annotations[annotation])
			}
			continue
		}
		if res.err == nil {
			t.Errorf("%s: the request was accepted:\n%s", tt.name, res.stdout)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(res.err.Error(), w) {
				t.Errorf("%s: error lacks %q:\n%v", tt.name, w, res.err)
			}
		}
		if set {
			t.Errorf("%s: refused, but annotation %s was set to %q", tt.name, annotation, got.Annotations[annotation])
		}
	}
}
