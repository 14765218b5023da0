package controllers

// Split brain (invariant 1, docs/architecture.md): the primary's node is cut off from
// the API server and from the controller (and, in the "node" partition, from
// its backup too) while clients keep writing. Two clients write all the
// time, one to each member's export, as confused clients would; every write
// the client got acknowledged is logged with the node that acknowledged it
// and its start and end time. A sampler polls both members for "writable"
// every millisecond or so. The checks:
//
//   - self-fencing: the cut-off primary acknowledges nothing later than
//     leaseDurationSeconds after the cut (plus one write's latency);
//   - the backup is promoted (authority Lease acquired) only after the old
//     primary's last acknowledged write, and its first write starts later;
//   - no two nodes acknowledge writes in overlapping time windows, and no
//     sample ever sees both members writable (invariant 1);
//   - after healing the pair converges (failback to the preferred primary),
//     the replicas are identical, and in Sync mode no acknowledged write is
//     lost (invariant 2);
//   - when the primary loses only the API server it fences itself, and the
//     controller, which still reaches it, promotes the backup once the
//     authority has expired (availability), within a bound.
//
// Short by default (one trial per mode); TANDEM_STRESS_TRIALS=N runs N
// trials per mode and partition kind, with random cut moments.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// ackRec is one client write: who acknowledged it (or failed it), when.
type ackRec struct {
	node       string
	start, end time.Time
	block      int64
	data       []byte
	err        error
}

// oneWriterViolations checks invariant 1 on acknowledged writes: sorted by
// start, the acks form runs of one node each; a run's window [first start,
// last end] must not overlap the next run's, and there can be no more runs
// than writers the authority ever had (epochs).
//
// One overlap is by design: in a failback the old writer holds new writes,
// and once the roles are swapped it forwards them to the new writer
// (volume package doc, "Failback"), which applies them; their
// acknowledgements come back through the old writer and may end after the
// new writer's own first acknowledgement. forwarded is how many writes each
// node forwarded (agentapi.Status.ForwardedWrites): acks of the old writer
// that end after the new writer's first one are allowed if each of them
// started before it (they were in flight at the swap) and there are no more
// of them than the node forwarded.
func oneWriterViolations(acks []ackRec, epochs int, forwarded map[string]int64) []string {
	ok := make([]ackRec, 0, len(acks))
	for _, a := range acks {
		if a.err == nil {
			ok = append(ok, a)
		}
	}
	sort.Slice(ok, func(i, j int) bool { return ok[i].start.Before(ok[j].start) })
	type run struct {
		node        string
		first, last time.Time
		n           int
		acks        []ackRec
	}
	var runs []run
	for _, a := range ok {
		if n := len(runs); n > 0 && runs[n-1].node == a.node {
			if a.end.After(runs[n-1].last) {
				runs[n-1].last = a.end
			}
			runs[n-1].n++
			runs[n-1].acks = append(runs[n-1].acks, a)
			continue
		}
		runs = append(runs, run{node: a.node, first: a.start, last: a.end, n: 1, acks: []ackRec{a}})
	}
	// forwardedOverlap: every ack of prev ending at or after next's first
	// one started before it, and they are no more than prev forwarded.
	forwardedOverlap := func(prev, next run) bool {
		late := 0
		for _, a := range prev.acks {
			if a.end.Before(next.first) {
				continue
			}
			if !a.start.Before(next.first) {
				return false
			}
			late++
		}
		return int64(late) <= forwarded[prev.node]
	}
	var out []string
	for i := 1; i < len(runs); i++ {
		if !runs[i-1].last.Before(runs[i].first) && !forwardedOverlap(runs[i-1], runs[i]) {
			out = append(out, fmt.Sprintf("%s acknowledged writes until %s but %s started acknowledged writes at %s (%d and %d writes)",
				runs[i-1].node, runs[i-1].last.Format("15:04:05.000000"), runs[i].node, runs[i].first.Format("15:04:05.000000"), runs[i-1].n, runs[i].n))
		}
	}
	if len(runs) > epochs {
		var seq []string
		for _, r := range runs {
			seq = append(seq, fmt.Sprintf("%s×%d", r.node, r.n))
		}
		out = append(out, fmt.Sprintf("%d alternations of the acknowledging node with only %d writers: %s", len(runs), epochs, strings.Join(seq, " ")))
	}
	return out
}

func TestOneWriterCheckerCatchesOverlap(t *testing.T) {
	t0 := time.Now()
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	clean := []ackRec{{node: "a", start: at(0), end: at(1)}, {node: "a", start: at(2), end: at(3)}, {node: "b", start: at(10), end: at(11)}}
	if v := oneWriterViolations(clean, 2, nil); len(v) != 0 {
		t.Fatalf("clean history flagged: %v", v)
	}
	overlap := []ackRec{{node: "a", start: at(0), end: at(5)}, {node: "b", start: at(4), end: at(6)}}
	if v := oneWriterViolations(overlap, 2, nil); len(v) != 1 {
		t.Fatalf("overlap not flagged: %v", v)
	}
	flip := []ackRec{{node: "a", start: at(0), end: at(1)}, {node: "b", start: at(2), end: at(3)}, {node: "a", start: at(4), end: at(5)}}
	if v := oneWriterViolations(flip, 2, nil); len(v) != 1 {
		t.Fatalf("a b a with two writers not flagged: %v", v)
	}
	if v := oneWriterViolations(append(clean, ackRec{node: "a", start: at(7), end: at(8), err: fmt.Errorf("x")}), 2, nil); len(v) != 0 {
		t.Fatalf("a failed write counted as acknowledged: %v", v)
	}
	// Failback: a's held write, forwarded to b, is acknowledged after b's
	// own first write.
	held := []ackRec{{node: "a", start: at(0), end: at(1)}, {node: "a", start: at(2), end: at(9)}, {node: "b", start: at(8), end: at(8)}, {node: "b", start: at(10), end: at(11)}}
	if v := oneWriterViolations(held, 2, map[string]int64{"a": 1}); len(v) != 0 {
		t.Fatalf("a forwarded held write flagged: %v", v)
	}
	if v := oneWriterViolations(held, 2, nil); len(v) != 1 {
		t.Fatalf("the same overlap with nothing forwarded not flagged: %v", v)
	}
	twoLate := append([]ackRec{{node: "a", start: at(3), end: at(9)}}, held...)
	if v := oneWriterViolations(twoLate, 2, map[string]int64{"a": 1}); len(v) != 1 {
		t.Fatalf("two late acks with one write forwarded not flagged: %v", v)
	}
}

// reportOneWriter fails the test with the first few invariant-1 violations
// and counts them all.
func reportOneWriter(t *testing.T, acks []ackRec, epochs int, forwarded map[string]int64, violations *atomic.Int64) {
	t.Helper()
	v := oneWriterViolations(acks, epochs, forwarded)
	for i, s := range v {
		if i == 5 {
			t.Errorf("invariant 1: ... and %d more", len(v)-5)
			break
		}
		t.Errorf("invariant 1: %s", s)
	}
	if violations != nil {
		violations.Add(int64(len(v)))
	}
}

type partitionKind string

const (
	// cutControl: the primary loses the API server and the controller but
	// still reaches its backup.
	cutControl partitionKind = "control-plane"
	// cutNode: the primary loses everything (API server, controller,
	// backup): a whole-node partition.
	cutNode partitionKind = "node"
	// cutAPI: the primary loses only the API server; the controller and the
	// backup still reach it.
	cutAPI partitionKind = "api-server"
)

func TestSplitBrain(t *testing.T) {
	type cell struct {
		mode v1.ReplicationMode
		kind partitionKind
	}
	cells := []cell{{v1.ModeSync, cutNode}, {v1.ModeAsync, cutControl}, {v1.ModeSync, cutAPI}}
	trials := stresstest.Trials(0)
	if trials > 0 {
		cells = []cell{{v1.ModeSync, cutNode}, {v1.ModeSync, cutControl}, {v1.ModeSync, cutAPI},
			{v1.ModeAsync, cutNode}, {v1.ModeAsync, cutControl}, {v1.ModeAsync, cutAPI}}
	} else {
		trials = 1
	}
	// One manager for every cell, as in a cluster (one leader): a manager per
	// story would reconcile the other stories' pairs too, from a network view
	// the test did not cut. The blocker is keyed by endpoint, so one serves
	// all cells.
	mlog := &testLog{}
	blk := &blocker{blocked: map[string]bool{}}
	startManager(t, mlog, blk.client)
	for _, c := range cells {
		t.Run(string(c.mode)+"/"+string(c.kind), func(t *testing.T) {
			t.Parallel() // separate namespaces and nodes; mostly waiting on leases
			var violations, faults atomic.Int64
			done := 0
			t.Cleanup(func() {
				v := violations.Load()
				if t.Failed() && v == 0 {
					v = 1
				}
				t.Log(stresstest.Line("split-brain", t.Name(), int64(done), faults.Load(), int64(v)))
			})
			for trial := range trials {
				splitBrainTrial(t, mlog, blk, c.mode, c.kind, uint64(trial), &violations)
				faults.Add(1)
				done++
			}
		})
	}
}

// writeTo writes through n's export like s.write, with a deadline.
func (s *story) writeTo(ctx context.Context, n *node, off int64, data []byte) error {
	a := n.agent()
	if a == nil {
		return fmt.Errorf("%s is down", n.name)
	}
	e, err := a.Lookup(s.ns + "/" + s.name)
	if err != nil {
		return err
	}
	return e.Backend.WriteAt(ctx, data, off, true)
}

func (s *story) writable(n *node) bool {
	a := n.agent()
	if a == nil {
		return false
	}
	_, err := a.Lookup(s.ns + "/" + s.name)
	return err == nil
}

// forwarded reads how many writes each member forwarded to the other
// (agentapi.Status.ForwardedWrites) through its control API.
func (s *story) forwarded() map[string]int64 {
	out := map[string]int64{}
	for _, n := range []*node{s.a, s.b} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := agentapi.NewClient("http://"+n.ctrl, token).Get(ctx, s.ns, s.name)
		cancel()
		if err != nil {
			s.t.Fatalf("status of %s on %s: %v", s.name, n.name, err)
		}
		out[n.name] = st.ForwardedWrites
	}
	return out
}

const sbBlock = 4096

func splitBrainTrial(t *testing.T, mlog *testLog, blk *blocker, mode v1.ReplicationMode, kind partitionKind, trial uint64, violations *atomic.Int64) {
	rng := rand.New(rand.NewPCG(trial, uint64(len(kind))))
	s := newStory(t, mode, nil)
	t.Cleanup(func() {
		if t.Failed() {
			mlog.dumpMatching(t, s.ns)
		}
	})
	lease := time.Duration(s.vp.Spec.Failover.LeaseDurationSeconds) * time.Second
	if err := k8sCreate(s); err != nil {
		t.Fatal(err)
	}
	s.waitFor(30*time.Second, "PAIR in sync", pairInSync(s.a.name))
	fail := func(format string, args ...any) {
		t.Helper()
		violations.Add(1)
		t.Errorf(format, args...)
	}

	// Clients: one per member's export, each on its own half of the volume.
	var (
		mu   sync.Mutex
		acks []ackRec
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	half := s.vp.Spec.SizeBytes() / 2 / sbBlock
	for i, n := range []*node{s.a, s.b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := int64(0); ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				block := int64(i)*half + seq%half
				data := make([]byte, sbBlock)
				binary.BigEndian.PutUint64(data, uint64(seq))
				copy(data[8:], n.name)
				// A bounded wait: a sync write held without its peer
				// must not stop this client from trying again.
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				start := time.Now()
				err := s.writeTo(ctx, n, block*sbBlock, data)
				end := time.Now()
				cancel()
				mu.Lock()
				acks = append(acks, ackRec{node: n.name, start: start, end: end, block: block, data: data, err: err})
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	// Sampler: both members writable at once is a split brain.
	var samples, both atomic.Int64
	var bothAt, lastWritableA atomic.Value
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			t0 := time.Now()
			wa, wb := s.writable(s.a), s.writable(s.b)
			if wa {
				lastWritableA.Store(time.Now())
			}
			if wa && wb && time.Since(t0) < 50*time.Millisecond {
				both.Add(1)
				bothAt.Store(t0)
			}
			samples.Add(1)
			time.Sleep(2 * time.Millisecond)
		}
	}()

	// Cut at a random moment once the writer has acknowledged something.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := len(acks)
		okA := false
		for _, a := range acks {
			okA = okA || (a.err == nil && a.node == s.a.name)
		}
		mu.Unlock()
		if okA {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no write acknowledged by %s before the partition (%d attempts)", s.a.name, n)
		}
	}
	time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
	// In the "node" partition a probe in flight may still see the writer
	// waiting for its lost peer, so the backup may be recorded Outdated and
	// the writer lost before the confirmation reaches it: the failover must
	// happen all the same (TestOutdatedRecordedButNeverConfirmed).
	cut := time.Now()
	s.a.netw.apiCut.Store(true)
	if kind != cutAPI {
		blk.set("http://"+s.a.ctrl, true)
	}
	if kind == cutNode {
		s.a.netw.cutReplication(true)
	}
	if kind == cutAPI {
		apiOnlyTrial(t, s, trial, cut, lease, &mu, &acks, stop, &wg, &both, &lastWritableA, violations, fail)
		return
	}
	s.waitFor(40*time.Second, "failover to the backup", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2
	})
	promoted := time.Now()
	// Let the backup serve a while, then stop the clients (A's client may be
	// stuck in a held sync write until the heal; do not wait for it yet).
	waitAck := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		got := false
		for _, a := range acks {
			if a.node == s.b.name && a.err == nil {
				got = true
				break
			}
		}
		mu.Unlock()
		if got || time.Now().After(waitAck) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)

	acquired := s.authorityLease().Spec.AcquireTime.Time

	// Heal and let the pair converge: failback is Automatic.
	s.a.netw.apiCut.Store(false)
	s.a.netw.cutReplication(false)
	blk.set("http://"+s.a.ctrl, false)
	wg.Wait()
	s.waitFor(60*time.Second, "failback to PAIR in sync", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhasePair && pairInSync(s.a.name)(vp) && vp.Status.Epoch == 3
	})
	time.Sleep(300 * time.Millisecond)

	// Checks.
	var lastA, firstB ackRec
	failedA, okA, okB := 0, 0, 0
	for _, a := range acks {
		switch {
		case a.err != nil && a.node == s.a.name && a.start.After(cut):
			failedA++
		case a.err == nil && a.node == s.a.name:
			okA++
			if a.end.After(lastA.end) {
				lastA = a
			}
		case a.err == nil && a.node == s.b.name:
			okB++
			if firstB.start.IsZero() || a.start.Before(firstB.start) {
				firstB = a
			}
		}
	}
	t.Logf("trial %d %s/%s: cut at +0; %s's last ack %v after the cut; lease acquired by %s %v after the cut; %s's first ack started %v after the cut; failover observed %v after the cut; %d/%d acks on %s/%s, %d refused on %s after the cut; %d writable samples",
		trial, mode, kind, s.a.name, lastA.end.Sub(cut).Round(time.Millisecond), s.b.name, acquired.Sub(cut).Round(time.Millisecond),
		s.b.name, firstB.start.Sub(cut).Round(time.Millisecond), promoted.Sub(cut).Round(time.Millisecond), okA, okB, s.a.name, s.b.name, failedA, s.a.name, samples.Load())
	if okA == 0 || okB == 0 {
		t.Fatalf("the clients got no acknowledgement from one of the members (%d from %s, %d from %s)", okA, s.a.name, okB, s.b.name)
	}
	// Self-fencing within leaseDurationSeconds (plus one write in flight).
	lw, _ := lastWritableA.Load().(time.Time)
	t.Logf("trial %d: %s last seen writable %v after the cut", trial, s.a.name, lw.Sub(cut).Round(time.Millisecond))
	// The sampler stamps after the check: allow it a little scheduling slack.
	if lw.After(cut.Add(lease+200*time.Millisecond)) && lw.Before(promoted) {
		fail("%s still accepted writes %v after it was cut off from the API server; it must fence itself within leaseDurationSeconds (%v)", s.a.name, lw.Sub(cut), lease)
	}
	// The writer re-checks its authority before acknowledging (stillWriter),
	// so an acknowledgement trails the fence deadline only by the time
	// between that check and the client seeing it (scheduling, under load).
	// Before that fix it reached 0.7 s under CPU starvation. What matters
	// for invariant 1, no overlap with the promoted backup, is checked next;
	// the trail is only logged.
	if trail := lastA.end.Sub(cut.Add(lease)); trail > 0 {
		t.Logf("trial %d: %s's last acknowledgement trailed its fence deadline by %v (admitted before it)", trial, s.a.name, trail.Round(time.Millisecond))
	}
	if !acquired.After(lastA.end) {
		fail("the backup acquired the authority at %s, before the old primary's last acknowledged write ended at %s",
			acquired.Format("15:04:05.000000"), lastA.end.Format("15:04:05.000000"))
	}
	if !firstB.start.After(lastA.end) {
		fail("%s's first acknowledged write started at %s, before %s's last one ended at %s",
			s.b.name, firstB.start.Format("15:04:05.000000"), s.a.name, lastA.end.Format("15:04:05.000000"))
	}
	reportOneWriter(t, acks, 2, nil, violations)
	if n := both.Load(); n > 0 {
		fail("invariant 1: both members writable in %d samples (last at %v after the cut)", n, bothAt.Load().(time.Time).Sub(cut))
	}
	for _, a := range acks {
		if a.err != nil && a.node == s.a.name && a.start.After(cut.Add(lease+200*time.Millisecond)) && a.end.Before(promoted) &&
			!strings.Contains(a.err.Error(), "fenced") && !strings.Contains(a.err.Error(), "not the writer") {
			t.Errorf("a write refused by the fenced primary says %q; want the fencing reason", a.err)
			break
		}
	}

	// No acknowledged write lost (sync), replicas identical.
	s.sameData()
	lost := lostAcked(t, s, acks, func(a ackRec) bool {
		// async: the old primary's unreplicated writes are lost by design
		return mode == v1.ModeAsync && a.node == s.a.name
	})
	if lost > 0 {
		fail("%d acknowledged writes are missing from the converged replicas", lost)
	}
	ev := s.events()
	if n := strings.Count(ev, "Failover:"); n != 1 {
		fail("%d Failover events, want 1:\n%s", n, ev)
	}
}

func k8sCreate(s *story) error { return k8s.Create(context.Background(), s.vp) }

// dumpMatching logs the last 150 lines that contain sub.
func (l *testLog) dumpMatching(t testing.TB, sub string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var m []string
	for _, s := range l.lines {
		if strings.Contains(s, sub) {
			m = append(m, s)
		}
	}
	for _, s := range m[max(0, len(m)-150):] {
		t.Log(s)
	}
}

// apiOnlyTrial: the primary cannot reach the API server but the controller
// and the backup still reach it. It must fence itself within
// leaseDurationSeconds; the controller sees it answer probes as a fenced
// primary and, once its authority has expired, promotes the backup within a
// bound (before the fix it never did: the pair had no writer until the
// partition healed). One writer at a time throughout; after healing the
// pair fails back and no acknowledged write is lost, in either mode: the
// fenced writer still ships its last writes to the backup, and the failover
// waits until the backup holds them.
func apiOnlyTrial(t *testing.T, s *story, trial uint64, cut time.Time, lease time.Duration, mu *sync.Mutex, acks *[]ackRec,
	stop chan struct{}, wg *sync.WaitGroup, both *atomic.Int64, lastWritableA *atomic.Value, violations *atomic.Int64, fail func(string, ...any)) {
	// The writer renewed its authority last before the cut, so it expires
	// within lease+ExpiryMargin of seeing it; the controller looks again right
	// then, and promoting and configuring the backup take a few rounds.
	// Generous for -race on a loaded 2-CPU machine.
	bound := lease + authority.ExpiryMargin + 10*time.Second
	s.waitFor(bound, "failover to the backup after the writer lost the API server", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2
	})
	promoted := time.Now()
	for !s.writable(s.b) {
		if time.Since(cut) > bound {
			t.Fatalf("%s promoted but not writable %v after the cut", s.b.name, time.Since(cut).Round(time.Millisecond))
		}
		time.Sleep(10 * time.Millisecond)
	}
	bWritable := time.Now()
	// Let the backup's client get acknowledgements.
	for waitAck := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		mu.Lock()
		got := false
		for _, a := range *acks {
			if a.node == s.b.name && a.err == nil {
				got = true
				break
			}
		}
		mu.Unlock()
		if got {
			break
		}
		if time.Now().After(waitAck) {
			t.Fatalf("%s is the writer but its client got no acknowledgement", s.b.name)
		}
	}
	lw, _ := lastWritableA.Load().(time.Time)
	if lw.After(cut.Add(lease + 200*time.Millisecond)) {
		fail("%s still accepted writes %v after losing the API server; it must fence itself within leaseDurationSeconds (%v)", s.a.name, lw.Sub(cut), lease)
	}
	if s.writable(s.a) {
		fail("%s still writable after %s was promoted", s.a.name, s.b.name)
	}
	acquired := s.authorityLease().Spec.AcquireTime.Time

	// Heal; the old primary gets its role back (failback is Automatic).
	healed := time.Now()
	s.a.netw.apiCut.Store(false)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	var lastA ackRec
	for _, a := range *acks {
		if a.err == nil && a.node == s.a.name && a.start.Before(promoted) && a.end.After(lastA.end) {
			lastA = a
		}
	}
	t.Logf("trial %d API-server-only partition: cut at +0; %s last writable %v, last ack %v after the cut; authority acquired by %s %v, promotion observed %v, %s writable %v after the cut",
		trial, s.a.name, lw.Sub(cut).Round(time.Millisecond), lastA.end.Sub(cut).Round(time.Millisecond), s.b.name,
		acquired.Sub(cut).Round(time.Millisecond), promoted.Sub(cut).Round(time.Millisecond), s.b.name, bWritable.Sub(cut).Round(time.Millisecond))
	if !lastA.end.IsZero() && !acquired.After(lastA.end) {
		fail("the backup acquired the authority at %s, before the old primary's last acknowledged write ended at %s",
			acquired.Format("15:04:05.000000"), lastA.end.Format("15:04:05.000000"))
	}
	// Writers so far: one per epoch (a failback may already have happened,
	// forwarding the writes held on the old writer).
	fwd := s.forwarded()
	if fwd[s.a.name]+fwd[s.b.name] > 0 {
		t.Logf("trial %d: writes forwarded during the failback: %v", trial, fwd)
	}
	reportOneWriter(t, *acks, int(s.get().Status.Epoch), fwd, violations)
	if n := both.Load(); n > 0 {
		fail("invariant 1: both members writable in %d samples", n)
	}
	s.waitFor(60*time.Second, "failback to PAIR in sync", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhasePair && pairInSync(s.a.name)(vp) && vp.Status.Epoch == 3
	})
	t.Logf("trial %d: failback to %s done %v after healing", trial, s.a.name, time.Since(healed).Round(time.Millisecond))
	s.agentsInSync(s.a)
	s.sameData()
	if lost := lostAcked(t, s, *acks, nil); lost > 0 {
		fail("%d acknowledged writes are missing from the converged replicas", lost)
	}
	if n := strings.Count(s.events(), "Failover:"); n != 1 {
		fail("%d Failover events, want 1", n)
	}
}

// lostAcked counts the blocks whose last acknowledged write is not on the
// converged replicas (a block with a later failed write may hold either).
// Writes for which exempt (if not nil) is true may be lost.
func lostAcked(t *testing.T, s *story, acks []ackRec, exempt func(ackRec) bool) int {
	t.Helper()
	data, err := os.ReadFile(s.b.dataPath(s.ns, s.name))
	if err != nil {
		t.Fatal(err)
	}
	sorted := append([]ackRec(nil), acks...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].end.Before(sorted[j].end) })
	last := map[int64]ackRec{}
	unknown := map[int64]bool{}
	for _, a := range sorted {
		if a.err != nil {
			unknown[a.block] = true
			continue
		}
		delete(unknown, a.block)
		last[a.block] = a
	}
	lost := 0
	for b, a := range last {
		if unknown[b] || (exempt != nil && exempt(a)) {
			continue
		}
		if !bytes.Equal(data[b*sbBlock:(b+1)*sbBlock], a.data) {
			lost++
		}
	}
	return lost
}

type rtFunc func(*http.Request) (*http.Response, error)

func (f rtFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestOutdatedRecordedButNeverConfirmed: a sync writer loses its backup; the
// controller records the backup Outdated (step 1 of invariant 2) and then
// loses the writer, whose node is partitioned before the confirmation
// (PeerOutdated, step 2) reaches it. The writer therefore never continued
// alone: every write it acknowledged is on the backup, and promoting the
// backup once the writer's authority has expired loses nothing.
//
// Before the fix (hack/stress/findings.md, fixed item 7) the Outdated record
// blocked the failover for good (FailoverBlocked/BackupOutdated, even with a
// failover request), so the pair had no writer until the old one returned.
// Now the record says whether a confirmation may have left the controller
// (status.members[].outdatedConfirmation): one that provably never did
// leaves NotSent, which does not block.
func TestOutdatedRecordedButNeverConfirmed(t *testing.T) {
	s := newStory(t, v1.ModeSync, nil)
	var partitioned atomic.Bool
	partitionA := func() {
		partitioned.Store(true)
		s.a.netw.apiCut.Store(true)
	}
	startManager(t, s.log, func(endpoint, tok string) agentapi.API {
		c := agentapi.NewClient(endpoint, tok)
		if endpoint != "http://"+s.a.ctrl {
			return c
		}
		if partitioned.Load() {
			c.BaseURL = "http://127.0.0.1:1"
			c.HTTP.Timeout = 200 * time.Millisecond
			return c
		}
		c.HTTP.Transport = rtFunc(func(r *http.Request) (*http.Response, error) {
			if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/peer-outdated") {
				partitionA() // the partition hits just before the confirmation is sent
				return nil, errPartitioned
			}
			return http.DefaultTransport.RoundTrip(r)
		})
		return c
	})
	if err := k8sCreate(s); err != nil {
		t.Fatal(err)
	}
	s.waitFor(30*time.Second, "PAIR in sync", pairInSync(s.a.name))
	if err := s.write(s.a, 0, pattern(0x61, 4096)); err != nil {
		t.Fatal(err)
	}
	// The replication link breaks; a sync write is held.
	s.a.netw.cutReplication(true)
	held := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		held <- s.writeTo(ctx, s.a, 4096, pattern(0x62, 4096))
	}()
	deadline := time.Now().Add(20 * time.Second)
	for !partitioned.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the controller never tried to confirm the backup Outdated")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if ms := s.get().Status.MemberStatus(s.b.name); ms == nil || ms.DataState != v1.DataOutdated {
		t.Fatalf("backup not recorded Outdated before the confirmation: %+v", ms)
	}
	s.waitFor(10*time.Second, "the Outdated record saying no confirmation was sent", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus(s.b.name)
		return vp.Status.ActivePrimary == s.b.name ||
			(ms != nil && ms.DataState == v1.DataOutdated && ms.OutdatedConfirmation == v1.OutdatedNotSent)
	})
	select {
	case err := <-held:
		t.Fatalf("the held sync write completed (%v) though the writer was never told to continue alone", err)
	default:
	}
	vp := s.waitFor(30*time.Second, "failover to the backup, which holds every acknowledged write", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2
	})
	select {
	case err := <-held:
		if err == nil {
			t.Fatal("the held sync write was acknowledged though the writer was never told to continue alone")
		}
	default:
	}
	if ms := vp.Status.MemberStatus(s.b.name); ms == nil || ms.OutdatedConfirmation != "" {
		t.Fatalf("the promoted member still carries an Outdated confirmation: %+v", ms)
	}
	// The promoted backup holds every acknowledged write.
	buf := make([]byte, 4096)
	for wdeadline := time.Now().Add(20 * time.Second); !s.writable(s.b); {
		if time.Now().After(wdeadline) {
			t.Fatalf("%s promoted but never writable", s.b.name)
		}
		time.Sleep(10 * time.Millisecond)
	}
	e, err := s.b.agent().Lookup(s.ns + "/" + s.name)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Backend.ReadAt(context.Background(), buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, pattern(0x61, 4096)) {
		t.Fatal("the promoted backup lacks the write acknowledged before the partition")
	}
}
