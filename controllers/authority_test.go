package controllers

// Authority Leases against a real API server: every pair has its own Lease
// even when the older "<ns>-<name>" naming made two pairs share one; a Lease
// that belongs to another pair is refused; expiry does not depend on the agent's wall clock; a teardown that
// cannot reach an agent says where the replica was left.

import (
	"context"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// authorityLeasesNaming lists the authority Leases whose volumepair
// annotation names ns/name (found by label and annotation, not by a name
// function, so the test reads the same objects whatever the naming).
func authorityLeasesNaming(t testing.TB, ns, name string) []coordinationv1.Lease {
	t.Helper()
	list, err := cs.CoordinationV1().Leases(opNS).List(context.Background(), metav1.ListOptions{
		LabelSelector: labels.SelectorFromSet(labels.Set{v1.LabelComponent: "authority"}).String()})
	if err != nil {
		t.Fatal(err)
	}
	var out []coordinationv1.Lease
	for _, l := range list.Items {
		if l.Annotations[authority.AnnVolumePair] == ns+"/"+name {
			out = append(out, l)
		}
	}
	return out
}

func holderOf(l *coordinationv1.Lease) (string, uint64) {
	h, e, _ := authority.Holder(l)
	return h, e
}

// TestCollidingPairsStayIndependent: "<base>-a/db" and "<base>/a-db" (one
// Lease under the older naming, "tandem-pair-<base>-a-db") on the same two
// nodes. Each gets its own Lease; a planned switchover of the first moves
// only its writer; deleting it deletes only its Lease. Before the fix the
// second pair's writer moved with the first's, without a drain.
func TestCollidingPairsStayIndependent(t *testing.T) {
	needEnvtest(t)
	tl := stresstest.NewTally(t, "split-brain")
	tl.Trials.Add(1)
	tl.Faults.Add(1) // two pairs whose Lease names used to collide
	lg := &testLog{}
	t.Cleanup(func() {
		if t.Failed() {
			lg.dump(t)
		}
	})
	base := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "coll-"}}
	if err := k8s.Create(context.Background(), base); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: base.Name + "-a"}}); err != nil {
		t.Fatal(err)
	}
	na, nb := newNode(t, "node-a-"+base.Name, lg), newNode(t, "node-b-"+base.Name, lg)
	na.start()
	nb.start()
	startManager(t, lg, nil)
	mk := func(ns, name string) *story {
		s := &story{t: t, ns: ns, name: name, log: lg, a: na, b: nb}
		s.vp = &v1.VolumePair{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: v1.VolumePairSpec{
				Size: resource.MustParse("16Mi"), RegionSize: ptr.To(resource.MustParse("64Ki")), Mode: v1.ModeAsync,
				Primary: v1.Member{Node: na.name}, Backup: v1.Member{Node: nb.name},
				Failover: v1.FailoverSpec{Policy: v1.PolicyAutomatic, ProbePeriodSeconds: 1, FailureThreshold: 2, LeaseDurationSeconds: 3},
				Failback: v1.FailbackSpec{Policy: v1.PolicyManual},
			},
		}
		if err := k8s.Create(context.Background(), s.vp); err != nil {
			t.Fatal(err)
		}
		return s
	}
	x, y := mk(base.Name+"-a", "db"), mk(base.Name, "a-db")
	if authority.LegacyLeaseName(x.ns, x.name) != authority.LegacyLeaseName(y.ns, y.name) {
		t.Fatal("test setup: the older names must collide")
	}
	x.waitFor(30*time.Second, "x in sync", pairInSync(na.name))
	y.waitFor(30*time.Second, "y in sync", pairInSync(na.name))
	for _, s := range []*story{x, y} {
		ls := authorityLeasesNaming(t, s.ns, s.name)
		if len(ls) != 1 {
			t.Errorf("%s/%s has %d authority Leases naming it, want its own one", s.ns, s.name, len(ls))
			continue // and see what a switchover of x does to y
		}
		if err := authority.CheckOwner(&ls[0], authority.PairOf(s.get())); err != nil {
			t.Error(err)
		}
	}

	// A planned switchover of x only: swap its members.
	vp := x.get()
	swap := client.MergeFrom(vp.DeepCopy())
	vp.Spec.Primary, vp.Spec.Backup = vp.Spec.Backup, vp.Spec.Primary
	if err := k8s.Patch(context.Background(), vp, swap); err != nil {
		t.Fatal(err)
	}
	// y keeps its writer and epoch throughout, and keeps accepting writes.
	deadline := time.Now().Add(30 * time.Second)
	for {
		yv := y.get()
		if yv.Status.ActivePrimary != na.name || yv.Status.Epoch != 1 {
			t.Fatalf("y's writer moved with x's switchover: %+v", yv.Status)
		}
		if h, e := holderOf(&authorityLeasesNaming(t, y.ns, y.name)[0]); h != na.name || e != 1 {
			t.Fatalf("y's authority moved with x's switchover: %s at epoch %d", h, e)
		}
		if err := y.write(na, 0, pattern(0x71, 4096)); err != nil {
			t.Fatalf("y's writer refused a write during x's switchover: %v", err)
		}
		if xv := x.get(); xv.Status.Phase == v1.PhasePair && pairInSync(nb.name)(xv) && xv.Status.Epoch == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("x's switchover did not finish: %+v", x.get().Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // a few more rounds of y
	if yv := y.get(); yv.Status.ActivePrimary != na.name || yv.Status.Epoch != 1 || !pairInSync(na.name)(yv) {
		t.Fatalf("y after x's switchover: %+v", yv.Status)
	}

	// Deleting x deletes x's Lease only.
	if err := k8s.Delete(context.Background(), x.get()); err != nil {
		t.Fatal(err)
	}
	x.waitGone()
	if n := len(authorityLeasesNaming(t, x.ns, x.name)); n != 0 {
		t.Fatalf("x's Lease survived its deletion (%d)", n)
	}
	ly := authorityLeasesNaming(t, y.ns, y.name)
	if len(ly) != 1 {
		t.Fatalf("deleting x took y's Lease: %d left", len(ly))
	}
	if h, e := holderOf(&ly[0]); h != na.name || e != 1 {
		t.Fatalf("y's Lease after x's deletion: %s at epoch %d", h, e)
	}
	time.Sleep(2 * time.Second)
	if err := y.write(na, 4096, pattern(0x72, 4096)); err != nil {
		t.Fatalf("y's writer refused a write after x was deleted: %v", err)
	}
	y.waitFor(10*time.Second, "y still in sync", pairInSync(na.name))
}

// TestForeignAuthorityLeaseRefused: the pair's Lease is rewritten to belong
// to another pair (its uid and volumepair annotations). The controller
// takes no step on it, even when the writer is lost: FailoverBlocked and
// Ready say why, naming the other pair, an event too, and the Lease stays as
// it is. Before the fix the annotation was never checked and the writer's
// loss moved the other pair's Lease.
func TestForeignAuthorityLeaseRefused(t *testing.T) {
	s := newStory(t, v1.ModeAsync, nil)
	startManager(t, s.log, nil)
	if err := k8sCreate(s); err != nil {
		t.Fatal(err)
	}
	s.waitFor(30*time.Second, "PAIR in sync", pairInSync(s.a.name))
	ls := authorityLeasesNaming(t, s.ns, s.name)
	if len(ls) != 1 {
		t.Fatalf("%d authority Leases", len(ls))
	}
	const otherUID = "0badc0de-0000-4000-8000-00000000beef"
	l := ls[0].DeepCopy()
	l.Annotations[authority.AnnVolumePair] = "other/pair"
	l.Annotations[authority.AnnVolumePairUID] = otherUID
	if _, err := cs.CoordinationV1().Leases(opNS).Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The writer's node dies: without the check, the Lease would be moved
	// once expired.
	s.a.kill()
	vp := s.waitFor(15*time.Second, "FailoverBlocked/AuthorityLeaseNotOwned", func(vp *v1.VolumePair) bool {
		c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked)
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == BlockedAuthorityNotOwned
	})
	c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked)
	for _, want := range []string{"other/pair", otherUID, s.ns + "/" + s.name, string(vp.UID)} {
		if !strings.Contains(c.Message, want) {
			t.Errorf("FailoverBlocked message %q does not name %q", c.Message, want)
		}
	}
	if r := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionReady); r == nil || r.Status != metav1.ConditionFalse || r.Reason != BlockedAuthorityNotOwned {
		t.Errorf("Ready = %+v, want False/%s", r, BlockedAuthorityNotOwned)
	}
	// Well past expiry and suspicion: still no step.
	time.Sleep(3*time.Second + authority.ExpiryMargin + 3*time.Second)
	vp = s.get()
	if vp.Status.ActivePrimary != s.a.name || vp.Status.Epoch != 1 {
		t.Fatalf("the controller acted on another pair's Lease: %+v", vp.Status)
	}
	got, err := cs.CoordinationV1().Leases(opNS).Get(context.Background(), l.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the other pair's Lease: %v", err)
	}
	if h, e := holderOf(got); h != s.a.name || e != 1 || got.Annotations[authority.AnnVolumePairUID] != otherUID {
		t.Fatalf("the other pair's Lease was changed: %s at epoch %d, uid %s", h, e, got.Annotations[authority.AnnVolumePairUID])
	}
	if ev := s.events(); !strings.Contains(ev, BlockedAuthorityNotOwned+": ") || !strings.Contains(ev, "other/pair") {
		t.Errorf("no %s event naming other/pair:\n%s", BlockedAuthorityNotOwned, ev)
	}
	// Deleting the pair leaves the other pair's Lease alone.
	if err := k8s.Delete(context.Background(), s.get()); err != nil {
		t.Fatal(err)
	}
	s.waitGone()
	if _, err := cs.CoordinationV1().Leases(opNS).Get(context.Background(), l.Name, metav1.GetOptions{}); err != nil {
		t.Fatalf("deleting the pair deleted another pair's Lease: %v", err)
	}
}

// skewedClock is the real clock shifted by d: wall times differ, elapsed
// times (monotonic) and timers do not.
type skewedClock struct {
	clock.RealClock
	d time.Duration
}

func (c skewedClock) Now() time.Time                  { return time.Now().Add(c.d) }
func (c skewedClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }

// TestAuthorityClockSkew: the writer's agent clock is 5 s behind, or 5 s
// ahead of, the controller's. While the controller cannot probe the writer
// but the writer keeps renewing, there is no failover (before the fix, 5 s
// behind made every renewal look expired: the backup was promoted while
// the writer still acknowledged writes). Once the writer is cut off, the
// backup is promoted only after the writer fenced itself: clients writing
// to both members never see two writers.
func TestAuthorityClockSkew(t *testing.T) {
	mlog := &testLog{}
	blk := &blocker{blocked: map[string]bool{}}
	startManager(t, mlog, blk.client)
	for _, skew := range []time.Duration{-5 * time.Second, 5 * time.Second} {
		t.Run("agent"+skew.String(), func(t *testing.T) {
			t.Parallel()
			tl := stresstest.NewTally(t, "split-brain")
			for range stresstest.Trials(1) {
				tl.Trials.Add(1)
				tl.Faults.Add(1) // the writer cut off
				clockSkewTrial(t, mlog, blk, skew)
				if t.Failed() {
					return
				}
			}
		})
	}
}

// clients writes to both members' exports until stopped, and samples
// whether both are writable at once.
type clients struct {
	s    *story
	mu   sync.Mutex
	acks []ackRec
	stop chan struct{}
	wg   sync.WaitGroup
	both atomic.Int64
	// lastWritableA is when s.a was last seen writable.
	lastWritableA atomic.Value
}

func startClients(s *story) *clients {
	c := &clients{s: s, stop: make(chan struct{})}
	half := s.vp.Spec.SizeBytes() / 2 / sbBlock
	for i, n := range []*node{s.a, s.b} {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			for seq := int64(0); ; seq++ {
				select {
				case <-c.stop:
					return
				default:
				}
				block := int64(i)*half + seq%half
				data := pattern(byte(seq), sbBlock)
				copy(data, n.name)
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				start := time.Now()
				err := s.writeTo(ctx, n, block*sbBlock, data)
				end := time.Now()
				cancel()
				c.mu.Lock()
				c.acks = append(c.acks, ackRec{node: n.name, start: start, end: end, block: block, data: data, err: err})
				c.mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			select {
			case <-c.stop:
				return
			default:
			}
			t0 := time.Now()
			wa, wb := s.writable(s.a), s.writable(s.b)
			if wa {
				c.lastWritableA.Store(time.Now())
			}
			if wa && wb && time.Since(t0) < 50*time.Millisecond {
				c.both.Add(1)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return c
}

// acked reports whether node acknowledged a write that started after t.
func (c *clients) acked(node string, after time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, a := range c.acks {
		if a.node == node && a.err == nil && a.start.After(after) {
			return true
		}
	}
	return false
}

func (c *clients) halt() []ackRec {
	close(c.stop)
	c.wg.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]ackRec(nil), c.acks...)
}

func clockSkewTrial(t *testing.T, mlog *testLog, blk *blocker, skew time.Duration) {
	// Async: the cut-off writer keeps acknowledging writes alone until it
	// fences itself, so an early promotion shows as two writers.
	s := newStory(t, v1.ModeAsync, nil)
	t.Cleanup(func() {
		if t.Failed() {
			mlog.dumpMatching(t, s.ns)
		}
	})
	s.a.kill()
	s.a.clock = skewedClock{d: skew}
	s.a.start()
	lease := time.Duration(s.vp.Spec.Failover.LeaseDurationSeconds) * time.Second
	if err := k8sCreate(s); err != nil {
		t.Fatal(err)
	}
	s.waitFor(30*time.Second, "PAIR in sync", pairInSync(s.a.name))
	c := startClients(s)
	for deadline := time.Now().Add(20 * time.Second); !c.acked(s.a.name, time.Time{}); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the writer acknowledged nothing")
		}
	}

	// 1. The controller loses the writer; the writer keeps renewing.
	ctrlEP := "http://" + s.a.ctrl
	blk.set(ctrlEP, true)
	from := time.Now()
	sawBlocked := false
	for time.Since(from) < 3*lease {
		vp := s.get()
		if vp.Status.ActivePrimary != s.a.name || vp.Status.Epoch != 1 {
			c.halt()
			t.Fatalf("agent clock %v: failover %v after the controller lost the writer, which still renews its authority: %+v",
				skew, time.Since(from).Round(time.Millisecond), vp.Status)
		}
		if cd := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked); cd != nil && cd.Status == metav1.ConditionTrue && cd.Reason == BlockedAuthorityNotExpired {
			sawBlocked = true
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !c.acked(s.a.name, from.Add(2*lease)) {
		t.Errorf("the writer stopped acknowledging writes while it could renew")
	}
	if !sawBlocked {
		t.Errorf("FailoverBlocked/AuthorityNotExpired never reported while the writer renewed")
	}

	// 2. The writer is cut off from everything.
	cut := time.Now()
	s.a.netw.apiCut.Store(true)
	s.a.netw.cutReplication(true)
	s.waitFor(40*time.Second, "failover to the backup", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2
	})
	promoted := time.Now()
	for deadline := time.Now().Add(20 * time.Second); !c.acked(s.b.name, cut); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the promoted backup acknowledged nothing")
		}
	}
	acquired := s.authorityLease().Spec.AcquireTime.Time // the controller's clock
	acks := c.halt()
	var lastA ackRec
	for _, a := range acks {
		if a.err == nil && a.node == s.a.name && a.end.After(lastA.end) {
			lastA = a
		}
	}
	lw, _ := c.lastWritableA.Load().(time.Time)
	t.Logf("agent clock %v: cut at +0; %s last writable %v, last ack %v; authority acquired by %s %v, promotion seen %v after the cut",
		skew, s.a.name, lw.Sub(cut).Round(time.Millisecond), lastA.end.Sub(cut).Round(time.Millisecond), s.b.name,
		acquired.Sub(cut).Round(time.Millisecond), promoted.Sub(cut).Round(time.Millisecond))
	if lw.After(cut.Add(lease)) {
		t.Errorf("%s still writable %v after it was cut off; it must fence itself within the lease (%v)", s.a.name, lw.Sub(cut), lease)
	}
	if !acquired.After(lastA.end) {
		t.Errorf("the backup acquired the authority at %s, before the old writer's last acknowledged write ended at %s",
			acquired.Format("15:04:05.000000"), lastA.end.Format("15:04:05.000000"))
	}
	reportOneWriter(t, acks, 2, nil, nil)
	if n := c.both.Load(); n > 0 {
		t.Errorf("invariant 1: both members writable in %d samples", n)
	}

	// 3. Heal: the pair converges back to its preferred writer.
	s.a.netw.apiCut.Store(false)
	s.a.netw.cutReplication(false)
	blk.set(ctrlEP, false)
	s.waitFor(60*time.Second, "failback to PAIR in sync", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhasePair && pairInSync(s.a.name)(vp) && vp.Status.Epoch == 3
	})
	s.agentsInSync(s.a)
	s.sameData()
	// Async: the cut-off writer's last writes never reached the backup and
	// are lost by design; the backup's all survive the failback.
	if lost := lostAcked(t, s, acks, func(a ackRec) bool { return a.node == s.a.name }); lost > 0 {
		t.Errorf("%d acknowledged writes are missing from the converged replicas", lost)
	}
}

// TestTeardownNamesOrphanedReplica: a pair deleted while one agent is
// unreachable leaves that replica's files; the TeardownIncomplete event says
// on which node, in which directory (the agent advertises its data
// directory on its Lease), and how to remove it.
func TestTeardownNamesOrphanedReplica(t *testing.T) {
	s := newStory(t, v1.ModeAsync, nil)
	startManager(t, s.log, nil)
	if err := k8sCreate(s); err != nil {
		t.Fatal(err)
	}
	s.waitFor(30*time.Second, "PAIR in sync", pairInSync(s.a.name))
	s.b.kill()
	if err := k8s.Delete(context.Background(), s.get()); err != nil {
		t.Fatal(err)
	}
	s.waitGone()
	dir := agentapi.ReplicaDir(s.b.dir, s.ns, s.name)
	var msg string
	for _, line := range strings.Split(s.events(), "\n") {
		if strings.HasPrefix(line, "TeardownIncomplete: ") {
			msg = line
		}
	}
	if msg == "" {
		t.Fatalf("no TeardownIncomplete event:\n%s", s.events())
	}
	for _, want := range []string{s.b.name, dir, "rm -rf " + dir} {
		if !strings.Contains(msg, want) {
			t.Errorf("TeardownIncomplete %q does not name %q", msg, want)
		}
	}
	if strings.Contains(msg, s.a.name) {
		t.Errorf("TeardownIncomplete names the member that was torn down: %q", msg)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Errorf("the orphaned replica is not where the event says: %v", err)
	}
}

// TestLegacyAuthorityLeaseAdopted: a Lease of the older naming
// ("tandem-pair-<ns>-<name>") is adopted by the pair it names, keeping its
// holder and epoch, and deleted; the pair whose older name is the same but
// that the Lease does not name ("<base>-a/db" for a Lease naming
// "<base>/a-db") leaves it alone and starts its own at epoch 1.
func TestLegacyAuthorityLeaseAdopted(t *testing.T) {
	needEnvtest(t)
	lg := &testLog{}
	t.Cleanup(func() {
		if t.Failed() {
			lg.dump(t)
		}
	})
	base := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "legacy-"}}
	if err := k8s.Create(context.Background(), base); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: base.Name + "-a"}}); err != nil {
		t.Fatal(err)
	}
	na, nb := newNode(t, "node-a-"+base.Name, lg), newNode(t, "node-b-"+base.Name, lg)
	na.start()
	nb.start()
	// The Lease an older controller made for <base>/a-db: writer node-a at
	// epoch 5.
	legacyName := authority.LegacyLeaseName(base.Name, "a-db")
	now := metav1.NewMicroTime(time.Now())
	legacy := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: opNS, Name: legacyName, Labels: map[string]string{v1.LabelComponent: "authority"},
			Annotations: map[string]string{authority.AnnEpoch: "5", authority.AnnVolumePair: base.Name + "/a-db"}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(na.name), LeaseDurationSeconds: ptr.To(int32(3)), RenewTime: &now, AcquireTime: &now},
	}
	if _, err := cs.CoordinationV1().Leases(opNS).Create(context.Background(), legacy, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	startManager(t, lg, nil)
	mk := func(ns, name string) *story {
		s := &story{t: t, ns: ns, name: name, log: lg, a: na, b: nb}
		s.vp = &v1.VolumePair{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: v1.VolumePairSpec{
				Size: resource.MustParse("16Mi"), RegionSize: ptr.To(resource.MustParse("64Ki")), Mode: v1.ModeAsync,
				Primary: v1.Member{Node: na.name}, Backup: v1.Member{Node: nb.name},
				Failover: v1.FailoverSpec{Policy: v1.PolicyAutomatic, ProbePeriodSeconds: 1, FailureThreshold: 2, LeaseDurationSeconds: 3},
				Failback: v1.FailbackSpec{Policy: v1.PolicyManual},
			},
		}
		if err := k8s.Create(context.Background(), s.vp); err != nil {
			t.Fatal(err)
		}
		return s
	}
	x, y := mk(base.Name+"-a", "db"), mk(base.Name, "a-db")
	y.waitFor(30*time.Second, "y at the adopted epoch", func(vp *v1.VolumePair) bool {
		return vp.Status.Epoch == 5 && vp.Status.ActivePrimary == na.name
	})
	x.waitFor(30*time.Second, "x in sync at its own epoch 1", func(vp *v1.VolumePair) bool {
		return pairInSync(na.name)(vp) && vp.Status.Epoch == 1
	})
	if _, err := cs.CoordinationV1().Leases(opNS).Get(context.Background(), legacyName, metav1.GetOptions{}); err == nil {
		t.Fatal("the adopted Lease of the older naming still exists")
	}
	ly := y.authorityLease()
	if h, e := holderOf(ly); h != na.name || e != 5 || authority.CheckOwner(ly, authority.PairOf(y.get())) != nil {
		t.Fatalf("y's adopted Lease: %s at epoch %d, annotations %v", h, e, ly.Annotations)
	}
	lx := x.authorityLease()
	if h, e := holderOf(lx); h != na.name || e != 1 || lx.Name == ly.Name {
		t.Fatalf("x's Lease %s: %s at epoch %d", lx.Name, h, e)
	}
	if ev := y.events(); !strings.Contains(ev, "AuthorityAdopted") {
		t.Errorf("no AuthorityAdopted event:\n%s", ev)
	}
}
