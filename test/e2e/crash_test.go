//go:build e2e

package e2e

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// Crash matrix: SIGKILL the primary's agent, the backup's agent,
// the manager or a whole node, in Async and Sync, at a random moment among
// PAIR (steady writes), SWAP (just after a failover started), COPY (a
// throttled resync running) and failback (the copy just finished, the roles
// about to switch back). Each trial restores what was killed, waits for the
// pair to converge back to PAIR on its preferred primary, and checks the
// §4 invariants 1-5 (see reliability_test.go). One RELIABILITY line per cell;
// TANDEM_STRESS_TRIALS trials per cell (default 2), one pair reused across
// the trials of a cell.
func TestCrashMatrix(t *testing.T) {
	pairs := [][2]string{{"node-a", "node-b"}, {"node-b", "node-c"}, {"node-c", "node-a"}}
	i := 0
	for _, target := range []string{"primary-agent", "backup-agent", "manager", "node"} {
		for _, mode := range []string{"Async", "Sync"} {
			p := pairs[i%len(pairs)]
			i++
			t.Run(target+"-"+mode, func(t *testing.T) { crashCell(t, target, mode, p[0], p[1]) })
		}
	}
	// A lost disk: the agent is killed and its data directory
	// wiped before it restarts; the member must come back through a full
	// copy, never serving or reported in sync before it completes.
	for _, c := range []struct{ target, mode string }{{"backup-disk", "Async"}, {"primary-disk", "Sync"}} {
		p := pairs[i%len(pairs)]
		i++
		t.Run(c.target+"-"+c.mode, func(t *testing.T) { crashCell(t, c.target, c.mode, p[0], p[1]) })
	}
}

const crashPairSpec = `  failover: {probePeriodSeconds: 1, failureThreshold: 2, leaseDurationSeconds: 3}
  failback: {policy: Automatic}
  resync: {maxBytesPerSecond: 6291456}
`

func crashCell(t *testing.T, target, mode, primary, backup string) {
	rng := caseRand(t)
	s := newStory(t, "crash")
	s.touched[primary], s.touched[backup] = true, true
	t.Cleanup(func() { _, _ = lcRun("start-manager") })
	s.apply(s.pairManifest(mode, primary, backup, "32Mi", crashPairSpec))
	s.wait(60*time.Second, "PAIR", inSync(primary))
	r := newRig(s, mode, primary, backup)
	trials := stressTrials(2) // a few per cell in make test-e2e; 30 in make stress
	done := 0
	start := time.Now()
	defer func() {
		r.stopMonitor()
		reliabilityLine(t, "crash-matrix", done, r.nfault, r.nviolations())
		if done > 0 {
			t.Logf("crash-matrix %s: %d trials in %.1fs (%.1fs per trial)", t.Name(), done, time.Since(start).Seconds(), time.Since(start).Seconds()/float64(done))
		}
	}()
	for i := 1; i <= trials; i++ {
		ts := time.Now()
		ok := crashTrial(r, rng, target, i)
		done++
		t.Logf("trial %d took %.1fs", i, time.Since(ts).Seconds())
		if !ok {
			return
		}
	}
}

// crashTrial runs one trial; false when the pair did not recover (the cell
// stops: later trials would not mean anything).
func crashTrial(r *rig, rng *rand.Rand, target string, i int) bool {
	t := r.t
	X, Y := r.members[0], r.members[1]
	r.beginTrial(i)
	moment := []string{"PAIR", "SWAP", "COPY", "FAILBACK"}[rng.IntN(4)]
	wipe := target == "primary-disk" || target == "backup-disk"
	if wipe {
		// The disk is lost while the pair runs; the bitmaps cannot cover a
		// member that lost everything, so only the other invariants are
		// checked (the full copy is).
		moment = "PAIR"
	}
	t.Logf("trial %d: kill %s during %s", i, target, moment)
	w := r.startWriter("", "")
	defer w.halt()

	down := map[string]bool{} // "agent/<node>", "node/<node>", "manager"
	killAgent := func(n string) {
		lc(t, "kill-agent", n)
		r.addFault(n, "kill-agent")
		down["agent/"+n] = true
	}
	startAgent := func(n string) {
		lc(t, "start-agent", n)
		delete(down, "agent/"+n)
	}
	wipeDisk := func(n string) {
		dir := filepath.Dir(r.s.replicaPath(n))
		killAgent(n)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatalf("wipe %s: %v", dir, err)
		}
		r.addFault(n, "wipe-disk")
	}
	strike := func(primary, backup string) {
		switch target {
		case "primary-agent":
			killAgent(primary)
		case "backup-agent":
			killAgent(backup)
		case "manager":
			lc(t, "kill-manager")
			r.addFault("", "kill-manager")
			down["manager"] = true
		case "node":
			lc(t, "kill-node", primary)
			r.addFault(primary, "kill-node")
			down["node/"+primary] = true
		case "primary-disk":
			wipeDisk(primary)
		case "backup-disk":
			wipeDisk(backup)
		}
	}
	acting := func(def string) string {
		if n := r.writable(); n != "" {
			return n
		}
		return def
	}

	time.Sleep(jitter(rng, 300*time.Millisecond, 1200*time.Millisecond))
	if moment == "PAIR" {
		strike(X, Y)
	} else {
		killAgent(X) // the failover every later moment needs
		swapped := r.waitWritable(Y, 20*time.Second)
		if !swapped {
			// Refusing to promote an Inconsistent member is invariant 4,
			// not a failure; anything else is.
			if c := apimeta.FindStatusCondition(r.s.get().Status.Conditions, v1.ConditionFailoverBlocked); c == nil ||
				c.Status != metav1.ConditionTrue || c.Reason != "BackupInconsistent" {
				t.Errorf("trial %d: %s not writable 20 s after the primary's agent was killed (FailoverBlocked %+v)", i, Y, c)
				restoreAll(r, down)
				return false
			}
			t.Logf("trial %d: failover refused while %s is Inconsistent (invariant 4); no %s this trial", i, Y, moment)
			moment = "none"
		}
		switch moment {
		case "SWAP":
			time.Sleep(jitter(rng, 0, 500*time.Millisecond))
			if target == "backup-agent" {
				// The backup of SWAP is the old primary: it crashes again
				// while it rejoins.
				startAgent(X)
				time.Sleep(jitter(rng, 0, time.Second))
				killAgent(X)
			} else {
				strike(Y, X)
			}
		case "COPY", "FAILBACK":
			time.Sleep(jitter(rng, 300*time.Millisecond, 800*time.Millisecond))
			startAgent(X)
			if moment == "COPY" {
				p, ok := r.waitPhase(20*time.Second, v1.PhaseCopy)
				time.Sleep(jitter(rng, 0, 300*time.Millisecond))
				a := acting(Y)
				t.Logf("trial %d: phase %s (COPY seen: %v), acting primary %s", i, p, ok, a)
				strike(a, r.other(a))
				break
			}
			// Failback: from the end of the copy (Y has nothing left to
			// ship, peer connected) until the roles switch back; the
			// monitor's samples are finer than the VolumePair's phase.
			ok := testkit.Wait(30*time.Second, "the copy done", func() bool {
				sm, x := r.lastSample(Y), r.lastSample(X)
				return sm.ok && (sm.st.Holding || (sm.st.Writable && sm.st.PeerConnected && !sm.st.Copy.Running && sm.st.OutOfSyncBytes == 0)) ||
					x.ok && x.st.Writable // the failback already happened
			}, testkit.Every(50*time.Millisecond)) == nil
			time.Sleep(jitter(rng, 0, 600*time.Millisecond))
			a := acting(Y)
			sm := r.lastSample(Y)
			t.Logf("trial %d: copy done: %v; %s holding=%v writable=%v; acting primary %s", i, ok, Y, sm.st.Holding, sm.st.Writable, a)
			strike(a, r.other(a))
		}
	}
	time.Sleep(jitter(rng, 200*time.Millisecond, time.Second))
	restoreAll(r, down)

	// Invariant 3, as soon as both members answer again.
	if !wipe && testkit.Wait(20*time.Second, "both members answering", func() bool {
		for _, n := range r.members {
			if sm := r.lastSample(n); !sm.ok || time.Since(sm.at) > 300*time.Millisecond {
				return false
			}
		}
		return true
	}, testkit.Every(50*time.Millisecond)) == nil {
		r.checkBitmapsCover(w)
	}

	vp, ok := r.converged(120*time.Second, v1.PhasePair)
	if !ok || vp.Status.ActivePrimary != X {
		t.Errorf("trial %d: not back to PAIR on %s within 120 s after the restore; status %+v", i, X, vp.Status)
		return false
	}
	w.halt()
	r.checkOneWriter()
	r.checkAcked(X)
	r.checkIdentical()
	return true
}

func restoreAll(r *rig, down map[string]bool) {
	for k := range down {
		var err error
		var out string
		switch {
		case k == "manager":
			out, err = lcRun("start-manager")
		case k[:5] == "node/":
			out, err = lcRun("restore-node", k[5:])
		default:
			out, err = lcRun("start-agent", k[6:])
		}
		if err != nil {
			r.t.Errorf("restore %s: %v\n%s", k, err, out)
		}
		delete(down, k)
	}
	r.t.Logf("trial %d: restored at %s", r.trial, time.Now().Format("15:04:05.000"))
}
