package agent

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

type nopLog struct{}

func (nopLog) Info(string, ...any)         {}
func (nopLog) Error(error, string, ...any) {}

func authorityLease(vol, holder string, epoch uint64) *coordinationv1.Lease {
	ns, name, _ := cutName(vol)
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: "tandem-system", Name: v1.AuthorityLeaseName(ns, name), ResourceVersion: "1",
			Annotations: map[string]string{v1.AnnEpoch: strconv.FormatUint(epoch, 10)}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(holder), LeaseDurationSeconds: ptr.To(int32(3))},
	}
}

// TestKubeAuthorityRenewsManyVolumes: a node serving many primaries renews
// every authority Lease about once a second with one patch each (no Get
// while nobody else touched the Lease), concurrently; a Lease the
// controller moved meanwhile refuses the patch, is read and fences that
// volume only.
func TestKubeAuthorityRenewsManyVolumes(t *testing.T) {
	const n = 24
	var objs []runtime.Object
	prim := map[string]uint64{}
	for i := range n {
		vol := fmt.Sprintf("apps/db-%02d", i)
		prim[vol] = 1
		objs = append(objs, authorityLease(vol, "node-a", 1))
	}
	cs := fake.NewClientset(objs...)
	var gets, patches, others atomic.Int64
	cs.PrependReactor("*", "leases", func(a k8stesting.Action) (bool, runtime.Object, error) {
		switch a.GetVerb() {
		case "get":
			gets.Add(1)
		case "patch":
			patches.Add(1)
		default:
			others.Add(1)
		}
		return false, nil, nil
	})
	// Each API call takes 100 ms (outside the fake's lock, which serialises
	// its reactors): renewing 24 volumes one after another would take
	// 2.4 s a round and the 3 s grants would lapse; concurrently a round
	// takes a fraction of a second.
	k := NewKubeAuthority(slowLeases{cs.CoordinationV1(), 100 * time.Millisecond}, "tandem-system", "node-a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); k.Run(ctx, func() map[string]uint64 { return prim }, nopLog{}) }()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(5 * time.Second)
	for {
		ok := 0
		for vol := range prim {
			if k.Authorized(vol, 1) == nil {
				ok++
			}
		}
		if ok == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d volumes authorized after 5 s", ok, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	g0, p0 := gets.Load(), patches.Load()
	time.Sleep(3200 * time.Millisecond) // three more rounds
	g, p := gets.Load()-g0, patches.Load()-p0
	if g != 0 || others.Load() != 0 {
		t.Errorf("steady renewals issued %d Gets and %d other calls; want only patches", g, others.Load())
	}
	if p < 2*n {
		t.Errorf("%d patches in 3.2 s for %d volumes; want ≥ %d (each renewed every second)", p, n, 2*n)
	}
	ls, err := cs.CoordinationV1().Leases("tandem-system").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls.Items {
		// Renewed at most a round (1 s) plus a slow pass ago; the Lease
		// lasts 3 s.
		if age := time.Since(l.Spec.RenewTime.Time); age > 2*time.Second {
			t.Errorf("%s last renewed %v ago", l.Name, age)
		}
	}

	// The controller moves one volume's authority to node-b.
	moved := "apps/db-07"
	l, err := cs.CoordinationV1().Leases("tandem-system").Get(ctx, v1.AuthorityLeaseName("apps", "db-07"), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l.Spec.HolderIdentity = ptr.To("node-b")
	l.Annotations[v1.AnnEpoch] = "2"
	if err := cs.Tracker().Update(coordinationv1.SchemeGroupVersion.WithResource("leases"), l, "tandem-system"); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(6 * time.Second)
	for k.Authorized(moved, 1) == nil {
		if time.Now().After(deadline) {
			t.Fatal("the volume whose authority moved is still authorized 6 s later")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := k.Authorized(moved, 1); err == nil || !contains(err.Error(), `names "node-b" at epoch 2`) {
		t.Errorf("moved volume: Authorized = %v, want a refusal naming node-b at epoch 2", err)
	}
	got, _ := cs.CoordinationV1().Leases("tandem-system").Get(ctx, l.Name, metav1.GetOptions{})
	if h := ptr.Deref(got.Spec.HolderIdentity, ""); h != "node-b" {
		t.Errorf("the renewal overwrote the moved authority: holder %q", h)
	}
	for vol := range prim {
		if vol != moved {
			if err := k.Authorized(vol, 1); err != nil {
				t.Errorf("%s lost its authority when another volume's moved: %v", vol, err)
			}
		}
	}
}

// slowLeases delays every Get and Update of the Leases it hands out.
type slowLeases struct {
	coordclient.LeasesGetter
	delay time.Duration
}

func (s slowLeases) Leases(ns string) coordclient.LeaseInterface {
	return slowLeaseClient{s.LeasesGetter.Leases(ns), s.delay}
}

type slowLeaseClient struct {
	coordclient.LeaseInterface
	delay time.Duration
}

// wait is the API server's delay; a caller whose context ends first gets
// its error, as from a real client (the fake ignores contexts).
func (c slowLeaseClient) wait(ctx context.Context) error {
	select {
	case <-time.After(c.delay):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c slowLeaseClient) Get(ctx context.Context, name string, o metav1.GetOptions) (*coordinationv1.Lease, error) {
	if err := c.wait(ctx); err != nil {
		return nil, err
	}
	return c.LeaseInterface.Get(ctx, name, o)
}

func (c slowLeaseClient) Update(ctx context.Context, l *coordinationv1.Lease, o metav1.UpdateOptions) (*coordinationv1.Lease, error) {
	if err := c.wait(ctx); err != nil {
		return nil, err
	}
	return c.LeaseInterface.Update(ctx, l, o)
}

// TestKubeAuthoritySlowAPIServer: with the default 6 s Lease, an API server
// that takes 2.5 s for every call (overloaded) keeps the writer authorized
// without a gap: a renewal is one request, it may take up to the Lease
// duration less a second, and a slow one is followed at once by the next.
// (With a fixed 2 s timeout and a Get before the Update it never renewed.)
func TestKubeAuthoritySlowAPIServer(t *testing.T) {
	const vol = "apps/db"
	l := authorityLease(vol, "node-a", 1)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(6))
	cs := fake.NewClientset(l)
	k := NewKubeAuthority(slowLeases{cs.CoordinationV1(), 2500 * time.Millisecond}, "tandem-system", "node-a")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.Run(ctx, func() map[string]uint64 { return map[string]uint64{vol: 1} }, nopLog{})
	}()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(9 * time.Second)
	for k.Authorized(vol, 1) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not authorized 9 s after the start with 2.5 s API calls: %v", k.Authorized(vol, 1))
		}
		time.Sleep(20 * time.Millisecond)
	}
	from := time.Now()
	for time.Since(from) < 6*time.Second {
		if err := k.Authorized(vol, 1); err != nil {
			t.Fatalf("authority lapsed %.1fs after the first grant with 2.5 s API calls and a 6 s Lease: %v", time.Since(from).Seconds(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
