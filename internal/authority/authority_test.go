package authority

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
)

const (
	ns   = "tandem-system"
	uidA = "0f8c6c2e-6d1b-4c36-9a55-0d7b3c1f2a01"
	uidB = "7d1e2b55-1c9e-4d4b-8f0a-5a6b7c8d9e02"
)

var (
	pairA = Pair{Namespace: "team-a", Name: "db", UID: uidA}
	pairB = Pair{Namespace: "team", Name: "a-db", UID: uidB}
)

// TestLeaseNamesDoNotCollide: the pairs whose old names collided
// ("team-a/db" and "team/a-db" joined with "-"; two long names whose
// joined strings are equal and so hash alike) get distinct Leases, one per
// UID; names stay valid object names; a UID that could name something else
// is refused.
func TestLeaseNamesDoNotCollide(t *testing.T) {
	longNS, longName := "team-"+strings.Repeat("n", 50), strings.Repeat("d", 40)
	cases := []struct {
		name   string
		p, q   Pair
		legacy bool // their old names collide
	}{
		{"dash in namespace vs name", pairA, pairB, true},
		{"long names hashing alike", Pair{longNS + "-a", longName, uidA}, Pair{longNS, "a-" + longName, uidB}, true},
		{"same name, recreated object", Pair{"apps", "db", uidA}, Pair{"apps", "db", uidB}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := LegacyLeaseName(c.p.Namespace, c.p.Name) == LegacyLeaseName(c.q.Namespace, c.q.Name); got != c.legacy {
				t.Fatalf("legacy names collide = %v, want %v (the bug this package fixes)", got, c.legacy)
			}
			np, err := LeaseName(c.p.UID)
			if err != nil {
				t.Fatal(err)
			}
			nq, err := LeaseName(c.q.UID)
			if err != nil {
				t.Fatal(err)
			}
			if np == nq {
				t.Fatalf("%s and %s share the Lease %s", c.p, c.q, np)
			}
			for _, n := range []string{np, nq, LegacyLeaseName(c.p.Namespace, c.p.Name)} {
				if len(n) > 63 || !regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`).MatchString(n) {
					t.Errorf("%q is not a valid Lease name", n)
				}
			}
		})
	}
	if n, _ := LeaseName(uidA); n != "tandem-pair-"+uidA {
		t.Errorf("LeaseName = %q", n)
	}
	for _, bad := range []types.UID{"", "UPPER", "a/b", "../x", "-a", "a-", types.UID(strings.Repeat("a", 51)), "a b"} {
		if n, err := LeaseName(bad); err == nil {
			t.Errorf("LeaseName(%q) = %q, want an error", bad, n)
		}
	}
	if got := LegacyLeaseName("apps", "db"); got != "tandem-pair-apps-db" {
		t.Errorf("LegacyLeaseName = %q", got)
	}
}

func leaseOf(t *testing.T, p Pair, holder string, epoch uint64) *coordinationv1.Lease {
	t.Helper()
	l, err := NewLease(ns, p, holder, epoch, 3*time.Second, time.Unix(1000, 0))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestCheckOwner: only the uid annotation makes a Lease a pair's; the
// refusal names both pairs.
func TestCheckOwner(t *testing.T) {
	cases := []struct {
		name   string
		lease  func() *coordinationv1.Lease
		p      Pair
		ok     bool
		errHas []string
	}{
		{"own", func() *coordinationv1.Lease { return leaseOf(t, pairA, "n1", 1) }, pairA, true, nil},
		{"another pair's", func() *coordinationv1.Lease { return leaseOf(t, pairB, "n1", 1) }, pairA, false,
			[]string{"team/a-db", uidB, "team-a/db", uidA}},
		{"same namespace/name, other uid", func() *coordinationv1.Lease {
			return leaseOf(t, Pair{pairA.Namespace, pairA.Name, uidB}, "n1", 1)
		}, pairA, false, []string{uidB, uidA}},
		{"no uid annotation", func() *coordinationv1.Lease {
			l := leaseOf(t, pairA, "n1", 1)
			delete(l.Annotations, AnnVolumePairUID)
			return l
		}, pairA, false, []string{AnnVolumePairUID, "team-a/db"}},
		{"no annotations at all", func() *coordinationv1.Lease {
			l := leaseOf(t, pairA, "n1", 1)
			l.Annotations = nil
			return l
		}, pairA, false, []string{"(unnamed)"}},
		{"reader without uid", func() *coordinationv1.Lease { return leaseOf(t, pairA, "n1", 1) }, Pair{pairA.Namespace, pairA.Name, ""}, false, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := CheckOwner(c.lease(), c.p)
			if (err == nil) != c.ok {
				t.Fatalf("CheckOwner = %v, want ok=%v", err, c.ok)
			}
			if err != nil && !IsNotOwned(err) {
				t.Fatalf("error %T is not a NotOwnedError", err)
			}
			for _, s := range c.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not name %q", err, s)
				}
			}
		})
	}
}

func TestHolder(t *testing.T) {
	cases := []struct {
		name   string
		mut    func(*coordinationv1.Lease)
		holder string
		epoch  uint64
		ok     bool
	}{
		{"ok", func(*coordinationv1.Lease) {}, "n1", 7, true},
		{"no epoch", func(l *coordinationv1.Lease) { delete(l.Annotations, AnnEpoch) }, "n1", 0, false},
		{"bad epoch", func(l *coordinationv1.Lease) { l.Annotations[AnnEpoch] = "-1" }, "n1", 0, false},
		{"no holder", func(l *coordinationv1.Lease) { l.Spec.HolderIdentity = nil }, "", 7, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := leaseOf(t, pairA, "n1", 7)
			c.mut(l)
			h, e, err := Holder(l)
			if (err == nil) != c.ok || h != c.holder || e != c.epoch {
				t.Fatalf("Holder = %q, %d, %v; want %q, %d, ok=%v", h, e, err, c.holder, c.epoch, c.ok)
			}
		})
	}
	l := leaseOf(t, pairA, "n1", 7)
	Move(l, "n2", 8, true, 4*time.Second, time.Unix(2000, 0))
	if h, e, _ := Holder(l); h != "n2" || e != 8 || !FailedOver(l) || Duration(l) != 4*time.Second || *l.Spec.LeaseTransitions != 1 {
		t.Fatalf("after Move: %q %d failedOver=%v %v", h, e, FailedOver(l), Duration(l))
	}
	Move(l, "n1", 9, false, 0, time.Unix(2001, 0))
	if FailedOver(l) || Duration(l) != DefaultLeaseDuration {
		t.Fatalf("after a failback Move: failedOver=%v duration %v", FailedOver(l), Duration(l))
	}
}

// TestRenewPatch applies the agent's renewal to a Lease through the fake
// clientset (which runs JSON patch test operations as the API server does):
// it renews only its own pair's Lease, naming it, at its epoch.
func TestRenewPatch(t *testing.T) {
	start := time.Unix(5000, 0)
	cases := []struct {
		name  string
		lease func() *coordinationv1.Lease
		uid   types.UID
		node  string
		epoch uint64
		ok    bool
	}{
		{"own", func() *coordinationv1.Lease { return leaseOf(t, pairA, "n1", 3) }, uidA, "n1", 3, true},
		{"another pair's Lease", func() *coordinationv1.Lease {
			// Same object name as pairA's (a tampered or mistaken Lease),
			// annotated for pairB.
			l := leaseOf(t, pairB, "n1", 3)
			l.Name, _ = LeaseName(uidA)
			return l
		}, uidA, "n1", 3, false},
		{"no uid annotation", func() *coordinationv1.Lease {
			l := leaseOf(t, pairA, "n1", 3)
			delete(l.Annotations, AnnVolumePairUID)
			return l
		}, uidA, "n1", 3, false},
		{"moved to another node", func() *coordinationv1.Lease { return leaseOf(t, pairA, "n2", 4) }, uidA, "n1", 3, false},
		{"other epoch", func() *coordinationv1.Lease { return leaseOf(t, pairA, "n1", 4) }, uidA, "n1", 3, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := c.lease()
			cs := fake.NewClientset(l)
			patch, err := RenewPatch(c.uid, c.node, c.epoch, start)
			if err != nil {
				t.Fatal(err)
			}
			name, _ := LeaseName(c.uid)
			got, err := cs.CoordinationV1().Leases(ns).Patch(context.Background(), name, types.JSONPatchType, patch, metav1.PatchOptions{})
			if (err == nil) != c.ok {
				t.Fatalf("patch error = %v, want ok=%v", err, c.ok)
			}
			if err != nil {
				cur, _ := cs.CoordinationV1().Leases(ns).Get(context.Background(), name, metav1.GetOptions{})
				if !cur.Spec.RenewTime.Equal(l.Spec.RenewTime) {
					t.Fatal("a refused renewal changed renewTime")
				}
				return
			}
			if !got.Spec.RenewTime.Time.Equal(start) {
				t.Fatalf("renewTime = %v, want %v", got.Spec.RenewTime, start)
			}
		})
	}
	if _, err := RenewPatch("", "n1", 1, start); err == nil {
		t.Fatal("a renewal without a pair UID must be refused")
	}
}

func TestAdopt(t *testing.T) {
	old := leaseOf(t, pairA, "n2", 5)
	old.Name = LegacyLeaseName(pairA.Namespace, pairA.Name)
	delete(old.Annotations, AnnVolumePairUID)
	old.Annotations[AnnFailedOver] = "true"
	old.Spec.LeaseTransitions = ptr.To(int32(4))
	if !Adoptable(old, pairA) {
		t.Fatal("pairA's legacy Lease not adoptable")
	}
	if Adoptable(old, pairB) {
		t.Fatal("pairA's legacy Lease (same legacy name as pairB's) adoptable by pairB")
	}
	withUID := old.DeepCopy()
	withUID.Annotations[AnnVolumePairUID] = uidA
	if Adoptable(withUID, pairA) {
		t.Fatal("a Lease with a uid annotation is not of the legacy naming")
	}
	now := time.Unix(9000, 0)
	l, err := Adopt(old, pairA, now)
	if err != nil {
		t.Fatal(err)
	}
	h, e, _ := Holder(l)
	want, _ := LeaseName(uidA)
	if l.Name != want || h != "n2" || e != 5 || !FailedOver(l) || CheckOwner(l, pairA) != nil ||
		*l.Spec.LeaseTransitions != 4 || !l.Spec.RenewTime.Time.Equal(now) || Duration(l) != 3*time.Second {
		t.Fatalf("adopted Lease: %+v", l)
	}
}

// TestDefaultLeaseDurationMatchesCRD: DefaultLeaseDuration is the CRD's
// default for spec.failover.leaseDurationSeconds.
func TestDefaultLeaseDurationMatchesCRD(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "..", "config", "crd", "bases", "*volumepairs.yaml"))
	if err != nil || len(files) != 1 {
		t.Fatalf("CRD not found: %v %v", files, err)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`leaseDurationSeconds:\s*\n\s*default:\s*(\d+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no default for leaseDurationSeconds in the CRD")
	}
	if n, _ := strconv.Atoi(string(m[1])); time.Duration(n)*time.Second != DefaultLeaseDuration {
		t.Fatalf("CRD default %ss, DefaultLeaseDuration %v", m[1], DefaultLeaseDuration)
	}
}

// TestFenceBeforeExpiry: the agent's grant ends before the controller's
// expiry for every allowed duration, with room for the clock rates to
// differ by 2.5% each way.
func TestFenceBeforeExpiry(t *testing.T) {
	for s := 2; s <= 300; s++ {
		d := time.Duration(s) * time.Second
		agent := time.Duration(float64(GrantUntil(time.Time{}, d).Sub(time.Time{})) * 1.025)
		ctrl := time.Duration(float64(d+ExpiryMargin) * 0.975)
		if agent >= ctrl {
			t.Fatalf("%v: the agent may write %v after its renewal's start, the controller expires it %v after seeing it", d, agent, ctrl)
		}
	}
}

func FuzzHolder(f *testing.F) {
	f.Add("n1", "7", uidA, "team-a/db")
	f.Add("", "", "", "")
	f.Add("n", "18446744073709551616", "x", "/")
	f.Fuzz(func(t *testing.T, holder, epoch, uid, pair string) {
		l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "x",
			Annotations: map[string]string{AnnEpoch: epoch, AnnVolumePairUID: uid, AnnVolumePair: pair}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(holder)}}
		h, e, err := Holder(l)
		if want, perr := strconv.ParseUint(epoch, 10, 64); err == nil && (h != holder || perr != nil || e != want) {
			t.Fatalf("Holder = %q %d for %q %q", h, e, holder, epoch)
		}
		if err := CheckOwner(l, Pair{UID: types.UID(uid)}); (err == nil) != (uid != "") {
			t.Fatalf("CheckOwner(%q) = %v", uid, err)
		}
		_ = Owner(l).String()
	})
}
