package controllers

import (
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
)

// TestWatchedRenewalCountsFromDelivery: a renewal the Lease watch delivers
// is timed when it arrives, so a round that reads the Lease later counts the
// expiry from the delivery. Before, only the rounds observed the Lease (one
// read per probe period): the last renewal of a writer that died was seen up
// to a probe period late and its failover came that much later (e2e story 2
// went from about 6.8 s to 8.7 s, once 11 s against its 10 s bound).
func TestWatchedRenewalCountsFromDelivery(t *testing.T) {
	t0 := time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(t0)
	r := &VolumePairReconciler{Namespace: "tandem-system", leases: authority.NewObserver(clk)}
	lease := func(rv string) *coordinationv1.Lease {
		return &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: "tandem-system", Name: "tandem-pair-x", ResourceVersion: rv,
				Labels: map[string]string{v1.LabelComponent: "authority"}, Annotations: map[string]string{authority.AnnEpoch: "1"}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To("node-a"), LeaseDurationSeconds: ptr.To(int32(6))},
		}
	}
	r.observeLease(lease("1"))
	clk.Step(1500 * time.Millisecond)
	r.observeLease(lease("2")) // the watch delivers the writer's last renewal
	renewed := clk.Now()
	clk.Step(1700 * time.Millisecond)
	// A Lease of another namespace is none of this controller's business.
	other := lease("9")
	other.Namespace = "elsewhere"
	r.observeLease(other)
	obs := r.leases.Observe(lease("2")) // the next round reads the same Lease
	if !obs.LastChange.Equal(renewed) {
		t.Fatalf("the last renewal counts from %v, want its delivery at %v", obs.LastChange.Sub(t0), renewed.Sub(t0))
	}
	if want := renewed.Add(6*time.Second + authority.ExpiryMargin); !obs.ExpiresAt.Equal(want) {
		t.Fatalf("expires at %v, want %v", obs.ExpiresAt.Sub(t0), want.Sub(t0))
	}
}
