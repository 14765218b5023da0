package authority

import (
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"
)

// TestObserver: expiry is counted on the controller's clock from when it
// saw the Lease change, whatever renewTime says (an agent clock hours
// ahead or behind changes nothing), and from the first sight of a Lease
// (after a restart).
func TestObserver(t *testing.T) {
	const d = 3 * time.Second
	expiresAfter := d + ExpiryMargin
	ctrlStart := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)

	// step is one thing that happens, then an observation.
	type step struct {
		advance time.Duration                 // on the controller's clock
		change  func(l *coordinationv1.Lease) // what others did to the Lease (nil: nothing)
		expired bool
		// sinceChange and sinceHolder: how long before this observation
		// the last change and the holder's arrival were seen.
		sinceChange, sinceHolder time.Duration
	}
	renew := func(agentClock time.Time, rv string) func(*coordinationv1.Lease) {
		return func(l *coordinationv1.Lease) {
			t := metav1.NewMicroTime(agentClock)
			l.Spec.RenewTime, l.ResourceVersion = &t, rv
		}
	}
	cases := []struct {
		name  string
		renew time.Time // renewTime on the Lease when first seen
		steps []step
	}{
		{
			name:  "first sight counts from now even with an old renewTime",
			renew: ctrlStart.Add(-time.Hour),
			steps: []step{
				{0, nil, false, 0, 0},
				{expiresAfter, nil, false, expiresAfter, expiresAfter},
				{time.Millisecond, nil, true, expiresAfter + time.Millisecond, expiresAfter + time.Millisecond},
			},
		},
		{
			name:  "agent clock 5 s behind, renewing every second: never expires",
			renew: ctrlStart.Add(-5 * time.Second),
			steps: []step{
				{0, nil, false, 0, 0},
				{time.Second, renew(ctrlStart.Add(-4*time.Second), "2"), false, 0, time.Second},
				{time.Second, renew(ctrlStart.Add(-3*time.Second), "3"), false, 0, 2 * time.Second},
				{time.Second, renew(ctrlStart.Add(-2*time.Second), "4"), false, 0, 3 * time.Second},
				{expiresAfter, nil, false, expiresAfter, 3*time.Second + expiresAfter},
				{time.Millisecond, nil, true, expiresAfter + time.Millisecond, 3*time.Second + expiresAfter + time.Millisecond},
			},
		},
		{
			name:  "agent clock 5 s ahead, stops renewing: expires on time",
			renew: ctrlStart.Add(5 * time.Second),
			steps: []step{
				{0, nil, false, 0, 0},
				{time.Second, renew(ctrlStart.Add(6*time.Second), "2"), false, 0, time.Second},
				{expiresAfter + time.Millisecond, nil, true, expiresAfter + time.Millisecond, time.Second + expiresAfter + time.Millisecond},
			},
		},
		{
			name:  "renewTime unchanged but resourceVersion changed: a change",
			renew: ctrlStart,
			steps: []step{
				{0, nil, false, 0, 0},
				{expiresAfter, func(l *coordinationv1.Lease) { l.ResourceVersion = "2" }, false, 0, expiresAfter},
				{expiresAfter + time.Millisecond, nil, true, expiresAfter + time.Millisecond, 2*expiresAfter + time.Millisecond},
			},
		},
		{
			name:  "a move (new holder and epoch) restarts both counts",
			renew: ctrlStart,
			steps: []step{
				{0, nil, false, 0, 0},
				{2 * time.Second, func(l *coordinationv1.Lease) {
					Move(l, "n2", 2, true, d, ctrlStart)
					l.ResourceVersion = "9"
				}, false, 0, 0},
				{time.Second, renew(ctrlStart, "10"), false, 0, time.Second},
			},
		},
		{
			name:  "renewTime going backwards is still a change",
			renew: ctrlStart,
			steps: []step{
				{0, nil, false, 0, 0},
				{3 * time.Second, renew(ctrlStart.Add(-time.Minute), "1"), false, 0, 3 * time.Second},
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			clk := clocktesting.NewFakePassiveClock(ctrlStart)
			o := NewObserver(clk)
			l := leaseOf(t, pairA, "n1", 1)
			l.ResourceVersion = "1"
			rt := metav1.NewMicroTime(c.renew)
			l.Spec.RenewTime = &rt
			l.Spec.LeaseDurationSeconds = ptr.To(int32(d / time.Second))
			for i, s := range c.steps {
				clk.SetTime(clk.Now().Add(s.advance))
				if s.change != nil {
					s.change(l)
				}
				got := o.Observe(l.DeepCopy())
				now := clk.Now()
				if got.Expired != s.expired || now.Sub(got.LastChange) != s.sinceChange || now.Sub(got.HolderSince) != s.sinceHolder ||
					!got.ExpiresAt.Equal(got.LastChange.Add(expiresAfter)) || got.Duration != d {
					t.Fatalf("step %d: %+v (now %v); want expired=%v, last change %v ago, holder since %v ago",
						i, got, now, s.expired, s.sinceChange, s.sinceHolder)
				}
			}
		})
	}
}

// TestObserverForget: a Lease forgotten (deleted) and seen again counts
// from the new sight; Leases are kept apart by namespace and name.
func TestObserverForget(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(time.Unix(100, 0))
	o := NewObserver(clk)
	a, b := leaseOf(t, pairA, "n1", 1), leaseOf(t, pairB, "n1", 1)
	o.Observe(a)
	clk.SetTime(clk.Now().Add(10 * time.Second))
	if !o.Observe(a).Expired {
		t.Fatal("not expired 10 s after the only sight")
	}
	if o.Observe(b).Expired {
		t.Fatal("another Lease's first sight inherited a's age")
	}
	o.Forget(a.Namespace, a.Name)
	if o.Observe(a).Expired {
		t.Fatal("a forgotten Lease seen again is expired at once")
	}
}
