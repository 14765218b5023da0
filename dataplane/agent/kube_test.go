package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"

	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/authority"
)

type nopLog struct{}

func (nopLog) Info(string, ...any)         {}
func (nopLog) Error(error, string, ...any) {}

// pairOf is the pair a test volume "ns/name" belongs to, with a UID made
// from its name.
func pairOf(vol string) authority.Pair {
	ns, name, _ := strings.Cut(vol, "/")
	return authority.Pair{Namespace: ns, Name: name, UID: types.UID("uid-" + ns + "--" + name)} // "--": ns and name contain no "--" here
}

func leaseName(t testing.TB, vol string) string {
	t.Helper()
	n, err := authority.LeaseName(pairOf(vol).UID)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func authorityLease(vol, holder string, epoch uint64) *coordinationv1.Lease {
	l, err := authority.NewLease("tandem-system", pairOf(vol), holder, epoch, 3*time.Second, time.Now())
	if err != nil {
		panic(err)
	}
	l.ResourceVersion = "1"
	return l
}

// primaries is what Agent.Primaries returns for these volumes at epoch.
func primaries(epoch uint64, vols ...string) map[string]Primary {
	m := map[string]Primary{}
	for _, v := range vols {
		m[v] = Primary{Epoch: epoch, PairUID: string(pairOf(v).UID)}
	}
	return m
}

// TestKubeAuthorityRenewsManyVolumes: a node serving many primaries renews
// every authority Lease about once a second with one patch each (no Get
// while nobody else touched the Lease), concurrently; a Lease the
// controller moved meanwhile refuses the patch, is read and fences that
// volume only.
func TestKubeAuthorityRenewsManyVolumes(t *testing.T) {
	const n = 24
	var objs []runtime.Object
	var vols []string
	for i := range n {
		vol := fmt.Sprintf("apps/db-%02d", i)
		vols = append(vols, vol)
		objs = append(objs, authorityLease(vol, "node-a", 1))
	}
	prim := primaries(1, vols...)
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
	go func() { defer close(done); k.Run(ctx, func() map[string]Primary { return prim }, nopLog{}) }()
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
	l, err := cs.CoordinationV1().Leases("tandem-system").Get(ctx, leaseName(t, moved), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l.Spec.HolderIdentity = ptr.To("node-b")
	l.Annotations[authority.AnnEpoch] = "2"
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
		k.Run(ctx, func() map[string]Primary { return primaries(1, vol) }, nopLog{})
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

// TestKubeAuthorityGrantOnAgentClock: a grant runs on the agent's own
// (injected) clock from the start of the renewal, and ends FenceMargin
// before the lease duration, so the writer has fenced itself before the
// controller, counting d + ExpiryMargin from when it saw that renewal, may
// consider the Lease expired. renewTime is the agent's wall clock, whatever
// it says (here a year off): nobody computes with it.
func TestKubeAuthorityGrantOnAgentClock(t *testing.T) {
	const vol = "apps/db"
	cases := []struct {
		name  string
		lease time.Duration
	}{{"minimum", 2 * time.Second}, {"default", authority.DefaultLeaseDuration}, {"long", 300 * time.Second}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := authorityLease(vol, "node-a", 4)
			l.Spec.LeaseDurationSeconds = ptr.To(int32(c.lease / time.Second))
			cs := fake.NewClientset(l)
			t0 := time.Date(2031, 6, 1, 0, 0, 0, 0, time.UTC) // the agent's wall clock, far from the test's
			clk := clocktesting.NewFakePassiveClock(t0)
			k := NewKubeAuthority(cs.CoordinationV1(), "tandem-system", "node-a", WithClock(clk))
			if err := k.renew(context.Background(), vol, primaries(4, vol)[vol]); err != nil {
				t.Fatal(err)
			}
			got, err := cs.CoordinationV1().Leases("tandem-system").Get(context.Background(), l.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !got.Spec.RenewTime.Time.Equal(t0) {
				t.Errorf("renewTime = %v, want the agent clock's %v", got.Spec.RenewTime, t0)
			}
			end := c.lease - authority.FenceMargin(c.lease)
			for _, step := range []struct {
				at time.Duration
				ok bool
			}{{0, true}, {end - time.Millisecond, true}, {end, true}, {end + time.Millisecond, false}, {c.lease, false}} {
				clk.SetTime(t0.Add(step.at))
				err := k.Authorized(vol, 4)
				if (err == nil) != step.ok {
					t.Fatalf("%v after the renewal's start (lease %v): Authorized = %v, want ok=%v", step.at, c.lease, err, step.ok)
				}
				if err != nil && !strings.Contains(err.Error(), "self-fenced") {
					t.Fatalf("refusal %q does not say it fenced itself", err)
				}
			}
			if err := k.Authorized(vol, 3); err == nil {
				t.Fatal("authorized at another epoch")
			}
		})
	}
}

// TestKubeAuthorityOwnPairOnly: the agent renews only the Lease of its
// volume's pair. A Lease of that name annotated for another pair is not
// renewed (the patch's uid test fails) and fences the volume with a reason
// naming the other pair; a volume the controller sent no pair UID for is
// never authorised and costs no request.
func TestKubeAuthorityOwnPairOnly(t *testing.T) {
	const vol, other = "team-a/db", "team/a-db"
	foreign := authorityLease(other, "node-a", 1)
	foreign.Name = leaseName(t, vol) // under team-a/db's name, annotated for team/a-db
	foreign.Spec.RenewTime = nil
	cs := fake.NewClientset(foreign)
	var calls atomic.Int64
	cs.PrependReactor("*", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		calls.Add(1)
		return false, nil, nil
	})
	k := NewKubeAuthority(cs.CoordinationV1(), "tandem-system", "node-a")
	err := k.renew(context.Background(), vol, primaries(1, vol)[vol])
	if err == nil || !strings.Contains(err.Error(), "team/a-db") {
		t.Fatalf("renewing a Lease annotated for another pair: %v; want a refusal naming team/a-db", err)
	}
	if err := k.Authorized(vol, 1); err == nil || !strings.Contains(err.Error(), "team/a-db") {
		t.Fatalf("Authorized = %v; want a refusal naming team/a-db", err)
	}
	got, _ := cs.CoordinationV1().Leases("tandem-system").Get(context.Background(), foreign.Name, metav1.GetOptions{})
	if got.Spec.RenewTime != nil {
		t.Fatal("the agent renewed another pair's Lease")
	}

	calls.Store(0)
	const bare = "apps/no-uid"
	err = k.renew(context.Background(), bare, Primary{Epoch: 1})
	if err == nil || !strings.Contains(err.Error(), "UID") {
		t.Fatalf("renewing without a pair UID: %v", err)
	}
	if err := k.Authorized(bare, 1); err == nil || !strings.Contains(err.Error(), "UID") {
		t.Fatalf("a volume without a pair UID: Authorized = %v", err)
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("%d API calls for a volume without a pair UID", n)
	}
}

// TestKubeAuthorityNewPairSameName: a volume whose pair UID changes (the
// VolumePair was deleted and created again under the same name) keeps
// nothing of the old pair's grant.
func TestKubeAuthorityNewPairSameName(t *testing.T) {
	const vol = "apps/db"
	old := authorityLease(vol, "node-a", 1)
	cs := fake.NewClientset(old)
	k := NewKubeAuthority(cs.CoordinationV1(), "tandem-system", "node-a")
	if err := k.renew(context.Background(), vol, primaries(1, vol)[vol]); err != nil {
		t.Fatal(err)
	}
	if err := k.Authorized(vol, 1); err != nil {
		t.Fatal(err)
	}
	// The new pair's Lease does not exist yet (or is not reachable).
	if err := k.renew(context.Background(), vol, Primary{Epoch: 1, PairUID: "uid-new"}); err == nil {
		t.Fatal("renewed a Lease that does not exist")
	}
	if err := k.Authorized(vol, 1); err == nil {
		t.Fatal("the old pair's grant still authorises the new pair's volume")
	}
}

// TestKubeAuthorityPendingAtNewEpoch: a volume made the writer at an epoch
// no renewal has answered for yet is pending (requests wait), not refused,
// even when its last renewal at an older epoch was refused (a failback: the
// old writer got the Lease moved away at epoch 2 and gets it back at 3).
// Before, it answered "authority Lease is at epoch ..." or the old refusal,
// and the forwarded writes of the failback failed with EIO.
func TestKubeAuthorityPendingAtNewEpoch(t *testing.T) {
	const vol = "apps/db"
	cs := fake.NewClientset(authorityLease(vol, "node-b", 2))
	k := NewKubeAuthority(cs.CoordinationV1(), "tandem-system", "node-a")
	if err := k.Authorized(vol, 1); !errors.Is(err, volume.ErrAuthorityPending) {
		t.Fatalf("before any renewal: %v, want pending", err)
	}
	// At epoch 1 the renewal is refused: the Lease names node-b at 2.
	if err := k.renew(context.Background(), vol, primaries(1, vol)[vol]); err == nil {
		t.Fatal("renewed a Lease naming another node")
	}
	if err := k.Authorized(vol, 1); err == nil || errors.Is(err, volume.ErrAuthorityPending) {
		t.Fatalf("after the refusal at epoch 1: %v, want refused", err)
	}
	// The controller gives node-a the writer role at epoch 3.
	l, err := cs.CoordinationV1().Leases("tandem-system").Get(context.Background(), leaseName(t, vol), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	moved := authorityLease(vol, "node-a", 3)
	l.Spec.HolderIdentity, l.Annotations = moved.Spec.HolderIdentity, moved.Annotations
	if _, err := cs.CoordinationV1().Leases("tandem-system").Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := k.Authorized(vol, 3); !errors.Is(err, volume.ErrAuthorityPending) {
		t.Fatalf("made the writer at epoch 3, not renewed yet: %v, want pending", err)
	}
	if err := k.renew(context.Background(), vol, primaries(3, vol)[vol]); err != nil {
		t.Fatal(err)
	}
	if err := k.Authorized(vol, 3); err != nil {
		t.Fatalf("after the renewal at epoch 3: %v", err)
	}
}
