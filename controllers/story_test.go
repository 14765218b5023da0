package controllers

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

type story struct {
	t    testing.TB
	ns   string
	name string
	log  *testLog
	a, b *node
	vp   *v1.VolumePair
}

// blocker makes the controller's probes of one node fail (a partition between
// controller and agent), while the agent still reaches the API server.
type blocker struct {
	mu      sync.Mutex
	blocked map[string]bool
	fails   map[string]int // endpoint → calls still to fail (a slow answer)
}

// failNext makes the next n calls to endpoint fail.
func (b *blocker) failNext(endpoint string, n int) {
	b.mu.Lock()
	if b.fails == nil {
		b.fails = map[string]int{}
	}
	b.fails[endpoint] = n
	b.mu.Unlock()
}

// failing reports how many of failNext's calls have not been made yet.
func (b *blocker) failing(endpoint string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fails[endpoint]
}

func (b *blocker) set(endpoint string, on bool) {
	b.mu.Lock()
	b.blocked[endpoint] = on
	b.mu.Unlock()
}

func (b *blocker) client(endpoint, tok string) agentapi.API {
	c := agentapi.NewClient(endpoint, tok)
	b.mu.Lock()
	blocked := b.blocked[endpoint]
	if b.fails[endpoint] > 0 {
		b.fails[endpoint]--
		blocked = true
	}
	b.mu.Unlock()
	if blocked {
		c.BaseURL = "http://127.0.0.1:1" // nothing listens there
		c.HTTP.Timeout = 200 * time.Millisecond
	}
	return c
}

func newStory(t testing.TB, mode v1.ReplicationMode, mut func(*v1.VolumePair)) *story {
	needEnvtest(t)
	s := &story{t: t, log: &testLog{}, name: "db"}
	t.Cleanup(func() {
		if t.Failed() {
			s.log.dump(t)
		}
	})
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "story-"}}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	s.ns = ns.Name
	s.a, s.b = newNode(t, "node-a-"+s.ns, s.log), newNode(t, "node-b-"+s.ns, s.log)
	s.a.start()
	s.b.start()
	s.vp = &v1.VolumePair{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.ns, Name: s.name},
		Spec: v1.VolumePairSpec{
			Size: resource.MustParse("16Mi"), RegionSize: ptr.To(resource.MustParse("64Ki")), Mode: mode,
			Primary: v1.Member{Node: s.a.name}, Backup: v1.Member{Node: s.b.name},
			Failover: v1.FailoverSpec{Policy: v1.PolicyAutomatic, ProbePeriodSeconds: 1, FailureThreshold: 2, LeaseDurationSeconds: 3},
			Failback: v1.FailbackSpec{Policy: v1.PolicyAutomatic},
		},
	}
	if mut != nil {
		mut(s.vp)
	}
	return s
}

func (s *story) get() *v1.VolumePair {
	s.t.Helper()
	vp := &v1.VolumePair{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: s.ns, Name: s.name}, vp); err != nil {
		s.t.Fatal(err)
	}
	return vp
}

// waitFor polls the VolumePair until cond holds, and returns it.
func (s *story) waitFor(d time.Duration, what string, cond func(*v1.VolumePair) bool) *v1.VolumePair {
	s.t.Helper()
	var vp *v1.VolumePair
	testkit.Eventually(s.t, d, what, func() (bool, string) {
		vp = s.get()
		return cond(vp), fmt.Sprintf("status: %+v", vp.Status)
	}, testkit.Every(50*time.Millisecond))
	return vp
}

// agentsInSync waits until writer's agent itself reports its peer
// connected, nothing to copy and every client write applied by the peer,
// and the peer UpToDate: the replica files can be compared then. The
// VolumePair's status lags the agents by up to a probe period.
func (s *story) agentsInSync(writer *node) {
	s.t.Helper()
	peer := s.b
	if writer == s.b {
		peer = s.a
	}
	s.agentsInSyncWith(writer, peer)
}

// agentsInSyncWith is agentsInSync for any two nodes (a replaced member):
// the writer's report of its link to peer (linkInSync).
func (s *story) agentsInSyncWith(writer, peer *node) {
	s.t.Helper()
	s.linkInSync(writer, peer)
}

func cond(vp *v1.VolumePair, typ string) bool {
	return meta.IsStatusConditionTrue(vp.Status.Conditions, typ)
}

func condOf(vp *v1.VolumePair, typ string) *metav1.Condition {
	return meta.FindStatusCondition(vp.Status.Conditions, typ)
}

func pairInSync(writer string) func(*v1.VolumePair) bool {
	return func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == writer && cond(vp, v1.ConditionReady) && cond(vp, v1.ConditionSynchronized) &&
			vp.Status.ObservedGeneration == vp.Generation
	}
}

// write writes through the member's export, as an NBD client would.
func (s *story) write(n *node, off int64, data []byte) error {
	a := n.agent()
	if a == nil {
		return fmt.Errorf("%s is down", n.name)
	}
	e, err := a.Lookup(s.ns + "/" + s.name)
	if err != nil {
		return err
	}
	return e.Backend.WriteAt(context.Background(), data, off, true)
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func (s *story) sameData() {
	s.t.Helper()
	ha, hb := testkit.FileSHA256(s.t, s.a.dataPath(s.ns, s.name)), testkit.FileSHA256(s.t, s.b.dataPath(s.ns, s.name))
	if ha != hb {
		s.t.Fatalf("replicas differ: %s vs %s", ha, hb)
	}
}

func (s *story) events() string {
	var list corev1.EventList
	if err := k8s.List(context.Background(), &list, client.InNamespace(s.ns)); err != nil {
		s.t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range list.Items {
		b.WriteString(e.Reason + ": " + e.Message + "\n")
	}
	return b.String()
}

// TestStory is the whole user story against a real API server: PAIR →
// primary lost → SWAP → primary back → COPY → NORMAL → failback → PAIR, for
// both modes, with a controller restart during the COPY.
func TestStory(t *testing.T) {
	for _, mode := range []v1.ReplicationMode{v1.ModeAsync, v1.ModeSync} {
		t.Run(string(mode), func(t *testing.T) {
			s := newStory(t, mode, func(vp *v1.VolumePair) { vp.Spec.Resync.MaxBytesPerSecond = 1 << 20 })
			mgr := startManager(t, s.log, nil)
			if err := k8s.Create(context.Background(), s.vp); err != nil {
				t.Fatal(err)
			}
			vp := s.waitFor(20*time.Second, "PAIR, ready and in sync", func(vp *v1.VolumePair) bool {
				return vp.Status.Phase == v1.PhasePair && pairInSync(s.a.name)(vp) && vp.Status.Endpoint != ""
			})
			if vp.Status.Epoch != 1 || !strings.HasSuffix(vp.Status.Endpoint, "/"+s.ns+"/db") || !controllerutilHas(vp) {
				t.Fatalf("PAIR status: %+v (finalizers %v)", vp.Status, vp.Finalizers)
			}
			for i := range 8 {
				if err := s.write(s.a, int64(i)<<20, pattern(0x10+byte(i), 256<<10)); err != nil {
					t.Fatal(err)
				}
			}

			// The primary's node dies: SWAP.
			s.a.kill()
			killed := time.Now()
			for {
				if err := s.write(s.b, 12<<20, pattern(0xbb, 64<<10)); err == nil {
					break
				}
				if time.Since(killed) > 20*time.Second {
					t.Fatal("the backup never accepted writes after the primary was lost")
				}
				time.Sleep(20 * time.Millisecond)
			}
			t.Logf("%s failover: primary killed → first write accepted on the backup in %v", mode, time.Since(killed).Round(time.Millisecond))
			vp = s.waitFor(10*time.Second, "SWAP", func(vp *v1.VolumePair) bool {
				return vp.Status.Phase == v1.PhaseSwap && vp.Status.ActivePrimary == s.b.name
			})
			if vp.Status.Epoch != 2 || vp.Status.LastFailoverTime == nil || !cond(vp, v1.ConditionDegraded) {
				t.Fatalf("SWAP status: %+v", vp.Status)
			}
			if ms := vp.Status.MemberStatus(s.a.name); ms == nil || ms.Message == "" {
				t.Fatalf("lost member not reported: %+v", vp.Status.Members)
			}
			for i := range 16 {
				if err := s.write(s.b, int64(i)<<20+512<<10, pattern(0xc0+byte(i), 128<<10)); err != nil {
					t.Fatal(err)
				}
			}

			// The old primary returns: COPY; the manager crashes meanwhile.
			s.a.start()
			s.waitFor(20*time.Second, "COPY", func(vp *v1.VolumePair) bool { return vp.Status.Phase == v1.PhaseCopy })
			mgr.stop()
			time.Sleep(500 * time.Millisecond)
			startManager(t, s.log, nil)

			// Failback is Automatic: NORMAL, then PAIR with the original
			// primary at a new epoch.
			vp = s.waitFor(40*time.Second, "failback to PAIR", func(vp *v1.VolumePair) bool {
				return vp.Status.Phase == v1.PhasePair && pairInSync(s.a.name)(vp) && vp.Status.Epoch == 3
			})
			if vp.Status.LastFailbackTime == nil || vp.Status.Copy != nil || vp.Status.OutOfSyncBytes != 0 {
				t.Fatalf("after failback: %+v", vp.Status)
			}
			for _, m := range vp.Status.Members {
				if m.DataState != v1.DataUpToDate || !m.Connected && m.Node == s.a.name {
					t.Fatalf("member after failback: %+v", m)
				}
			}
			if err := s.write(s.a, 15<<20, pattern(0xdd, 4096)); err != nil {
				t.Fatalf("write after failback: %v", err)
			}
			s.waitFor(10*time.Second, "in sync", pairInSync(s.a.name))
			s.agentsInSync(s.a)
			s.sameData()
			ev := s.events()
			for _, want := range []string{"Failover", "Failback", "PhaseSWAP", "PhaseCOPY", "PhasePAIR"} {
				if !strings.Contains(ev, want) {
					t.Errorf("no %s event; events:\n%s", want, ev)
				}
			}
			// Epoch history: exactly one promotion per transition.
			if n := strings.Count(ev, "Failover:"); n != 1 {
				t.Errorf("%d Failover events, want 1 (no double promotion):\n%s", n, ev)
			}
			lease := s.authorityLease()
			if h, e, err := authority.Holder(lease); err != nil || e != 3 || h != s.a.name {
				t.Fatalf("authority after failback: holder %q epoch %d (%v)", h, e, err)
			}

			// Deletion tears the replicas down.
			if err := k8s.Delete(context.Background(), s.get()); err != nil {
				t.Fatal(err)
			}
			s.waitGone()
			if _, err := os.Stat(s.a.dataPath(s.ns, s.name)); !os.IsNotExist(err) {
				t.Fatalf("replica on %s not removed: %v", s.a.name, err)
			}
		})
	}
}

// authorityLease reads the pair's authority Lease (named after its UID).
func (s *story) authorityLease() *coordinationv1.Lease {
	s.t.Helper()
	name, err := authority.LeaseName(s.get().UID)
	if err != nil {
		s.t.Fatal(err)
	}
	l, err := cs.CoordinationV1().Leases(opNS).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		s.t.Fatal(err)
	}
	return l
}

func controllerutilHas(vp *v1.VolumePair) bool {
	for _, f := range vp.Finalizers {
		if f == v1.Finalizer {
			return true
		}
	}
	return false
}

func (s *story) waitGone() {
	s.t.Helper()
	testkit.Eventually(s.t, 15*time.Second, "the VolumePair deleted", func() (bool, error) {
		err := k8s.Get(context.Background(), client.ObjectKey{Namespace: s.ns, Name: s.name}, &v1.VolumePair{})
		return apierrors.IsNotFound(err), err
	}, testkit.Every(50*time.Millisecond))
}

// TestBackupLostAndPartition: a lost backup keeps PAIR with Degraded and
// comes back through COPY; a primary the controller cannot probe but that
// still renews its authority is never failed over.
func TestBackupLostAndPartition(t *testing.T) {
	blk := &blocker{blocked: map[string]bool{}}
	s := newStory(t, v1.ModeSync, nil)
	startManager(t, s.log, blk.client)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))

	// Backup lost: sync writes are held until the controller records it
	// Outdated, then continue; PAIR stays with Degraded.
	s.b.kill()
	done := make(chan error, 1)
	go func() { done <- s.write(s.a, 0, pattern(0x42, 64<<10)) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("sync write not released after the backup was lost")
	}
	vp := s.waitFor(10*time.Second, "PAIR degraded, backup Outdated", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus(s.b.name)
		return vp.Status.Phase == v1.PhasePair && cond(vp, v1.ConditionDegraded) && ms != nil && ms.DataState == v1.DataOutdated
	})
	if vp.Status.ActivePrimary != s.a.name || vp.Status.Epoch != 1 {
		t.Fatalf("backup loss moved the writer: %+v", vp.Status)
	}
	s.b.start()
	s.waitFor(20*time.Second, "backup back in sync", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus(s.b.name)
		return pairInSync(s.a.name)(vp) && ms != nil && ms.DataState == v1.DataUpToDate && !cond(vp, v1.ConditionDegraded)
	})
	s.agentsInSync(s.a)
	s.sameData()

	// Partition between the controller and the primary's agent only.
	blk.set("http://"+s.a.ctrl, true)
	deadline := time.Now().Add(3 * time.Duration(s.vp.Spec.Failover.LeaseDurationSeconds) * time.Second)
	sawBlocked := false
	for time.Now().Before(deadline) {
		vp := s.get()
		if vp.Status.ActivePrimary != s.a.name || vp.Status.Epoch != 1 {
			t.Fatalf("failover during a controller-only partition: %+v", vp.Status)
		}
		if c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked); c != nil && c.Status == metav1.ConditionTrue && c.Reason == BlockedAuthorityNotExpired {
			sawBlocked = true
		}
		if err := s.write(s.a, 1<<20, pattern(0x43, 4096)); err != nil {
			t.Fatalf("the primary must keep serving while it renews its authority: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !sawBlocked {
		t.Fatal("FailoverBlocked/AuthorityNotExpired never reported during the partition")
	}
	blk.set("http://"+s.a.ctrl, false)
	s.waitFor(10*time.Second, "healthy again", func(vp *v1.VolumePair) bool {
		c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked)
		return pairInSync(s.a.name)(vp) && c != nil && c.Status == metav1.ConditionFalse
	})
}

// TestMissedProbeKeepsStatus: one probe of the writer that gets no answer
// (a slow agent under load), fewer than failureThreshold, changes nothing a
// user or a client following status.endpoint sees: the endpoint stays, Ready
// stays True. Read through the live client every 20 ms, so a status patched
// for one round only is seen.
func TestMissedProbeKeepsStatus(t *testing.T) {
	blk := &blocker{blocked: map[string]bool{}}
	s := newStory(t, v1.ModeAsync, nil)
	startManager(t, s.log, blk.client)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	vp := s.waitFor(20*time.Second, "PAIR in sync", func(vp *v1.VolumePair) bool {
		return pairInSync(s.a.name)(vp) && vp.Status.Endpoint != ""
	})
	ep := vp.Status.Endpoint
	ctrl := "http://" + s.a.ctrl
	check := func(round int) {
		vp := s.get()
		if vp.Status.Endpoint != ep || !cond(vp, v1.ConditionReady) {
			t.Fatalf("round %d: one missed probe changed the status: endpoint %q (was %q), conditions %+v", round, vp.Status.Endpoint, ep, vp.Status.Conditions)
		}
		if ms := vp.Status.MemberStatus(s.a.name); ms == nil || ms.Role != v1.RolePrimary {
			t.Fatalf("round %d: the writer's member status lost its role after one missed probe: %+v", round, ms)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for round := 0; round < 3; round++ {
		blk.failNext(ctrl, 1)
		deadline := time.Now().Add(5 * time.Second)
		for blk.failing(ctrl) > 0 && time.Now().Before(deadline) {
			check(round)
		}
		if blk.failing(ctrl) > 0 {
			t.Fatal("the writer was not probed within 5s")
		}
		// The round after the failed probe patches the status: watch it.
		for until := time.Now().Add(1500 * time.Millisecond); time.Now().Before(until); {
			check(round)
		}
	}
}

// TestManualFailoverAndSwitchover: with a Manual policy a lost primary is
// not replaced until the user asks; swapping spec.primary and spec.backup is
// a planned switchover with no write lost.
func TestManualFailoverAndSwitchover(t *testing.T) {
	s := newStory(t, v1.ModeAsync, func(vp *v1.VolumePair) {
		vp.Spec.Failover.Policy = v1.PolicyManual
		vp.Spec.Failback.Policy = v1.PolicyManual
	})
	startManager(t, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))

	// Planned switchover: swap the members in spec.
	if err := s.write(s.a, 0, pattern(0x51, 64<<10)); err != nil {
		t.Fatal(err)
	}
	vp := s.get()
	swap := client.MergeFrom(vp.DeepCopy()) // status patches race with an Update; a patch does not
	vp.Spec.Primary, vp.Spec.Backup = vp.Spec.Backup, vp.Spec.Primary
	if err := k8s.Patch(context.Background(), vp, swap); err != nil {
		t.Fatal(err)
	}
	vp = s.waitFor(20*time.Second, "switchover to node-b", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhasePair && pairInSync(s.b.name)(vp) && vp.Status.Epoch == 2
	})
	if vp.Status.LastFailoverTime != nil {
		t.Fatal("a switchover is not a failover")
	}
	s.agentsInSync(s.b)
	s.sameData()

	// Manual failover: the writer (now node-b) dies; nothing happens until
	// the user asks.
	s.b.kill()
	vp = s.waitFor(15*time.Second, "FailoverBlocked/ManualPolicy", func(vp *v1.VolumePair) bool {
		c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked)
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == BlockedManualPolicy
	})
	if vp.Status.ActivePrimary != s.b.name {
		t.Fatal("failover happened without the user's request")
	}
	patch := client.MergeFrom(vp.DeepCopy())
	vp.Annotations = map[string]string{v1.AnnotationFailoverRequested: time.Now().Format(time.RFC3339)}
	if err := k8s.Patch(context.Background(), vp, patch); err != nil {
		t.Fatal(err)
	}
	vp = s.waitFor(15*time.Second, "SWAP on request", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhaseSwap && vp.Status.ActivePrimary == s.a.name && vp.Status.Epoch == 3
	})
	if vp.Annotations[v1.AnnotationFailoverRequested] != "" {
		s.waitFor(5*time.Second, "request annotation cleared", func(vp *v1.VolumePair) bool {
			return vp.Annotations[v1.AnnotationFailoverRequested] == ""
		})
	}
	if err := s.write(s.a, 64<<10, pattern(0x52, 64<<10)); err != nil {
		t.Fatal(err)
	}
	_ = strconv.Itoa
}
