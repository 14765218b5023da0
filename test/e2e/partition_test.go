//go:build e2e

package e2e

import (
	"math/rand/v2"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// Partitions, with the network namespaces of the local cluster:
// the acting primary cut from its backup only, from the API server only, the
// manager cut from both agents' control APIs, the primary's whole node cut
// off, and the primary's link flapping (down/up every 0.5-2 s, randomised,
// for about 20 s). Failback is Manual, so within a trial the authority
// moves at most once (to the other member); the next trial partitions
// whichever member is acting then. Per trial: no split brain (the members'
// acknowledgements never interleave, a client on the cut node itself
// included; the agents' own status never shows two writers), the pair
// converges after healing (in sync, replicas identical), Sync loses no
// acknowledged write. One RELIABILITY line per case; TANDEM_STRESS_TRIALS
// trials per case.
func TestPartition(t *testing.T) {
	if !netnsCluster() {
		t.Skip("partitions need the network-namespace cluster (local-cluster.sh up as root)")
	}
	for _, c := range []struct{ kind, mode, primary, backup string }{
		{"primary-backup", "Sync", "node-a", "node-b"},
		{"primary-apiserver", "Async", "node-b", "node-c"},
		{"controller-agents", "Sync", "node-c", "node-a"},
		{"whole-node", "Sync", "node-a", "node-b"},
		{"flapping-link", "Sync", "node-b", "node-c"},
	} {
		t.Run(c.kind, func(t *testing.T) { partitionCase(t, c.kind, c.mode, c.primary, c.backup) })
	}
}

const partitionPairSpec = `  failover: {probePeriodSeconds: 1, failureThreshold: 2, leaseDurationSeconds: 3}
  failback: {policy: Manual}
`

func partitionCase(t *testing.T, kind, mode, primary, backup string) {
	rng := caseRand(t)
	s := newStory(t, "part")
	s.touched[primary], s.touched[backup] = true, true
	s.apply(s.pairManifest(mode, primary, backup, "32Mi", partitionPairSpec))
	s.wait(60*time.Second, "PAIR", inSync(primary))
	r := newRig(s, mode, primary, backup)
	trials := stressTrials(1)
	done := 0
	start := time.Now()
	defer func() {
		r.stopMonitor()
		reliabilityLine(t, "partitions", done, r.nfault, r.nviolations())
		if done > 0 {
			t.Logf("partitions %s: %d trials in %.1fs (%.1fs per trial)", t.Name(), done, time.Since(start).Seconds(), time.Since(start).Seconds()/float64(done))
		}
	}()
	active := primary
	for i := 1; i <= trials; i++ {
		ts := time.Now()
		next, ok := partitionTrial(r, rng, kind, active, i)
		done++
		t.Logf("trial %d took %.1fs", i, time.Since(ts).Seconds())
		if !ok {
			return
		}
		active = next
	}
}

func partitionTrial(r *rig, rng *rand.Rand, kind, X string, i int) (string, bool) {
	t := r.t
	Y := r.other(X)
	r.beginTrial(i)
	lease := 3 * time.Second
	w := r.startWriter("", "")
	defer w.halt()
	var pinned *writer
	if kind == "whole-node" || kind == "flapping-link" {
		// A client on the cut node itself: it keeps talking to X.
		pinned = r.startWriter(X, "tandem-"+X)
		defer pinned.halt()
	}
	healed := false
	heal := func(nodes ...string) {
		for _, n := range nodes {
			lc(t, "heal", n)
		}
		healed = true
	}
	defer func() {
		if !healed {
			_, _ = lcRun("heal", X)
			_, _ = lcRun("heal", Y)
		}
	}()
	time.Sleep(jitter(rng, 300*time.Millisecond, 1200*time.Millisecond))
	t.Logf("trial %d: %s partition, acting primary %s", i, kind, X)
	switch kind {
	case "primary-backup":
		lc(t, "cut", X, Y)
		r.addFault(X, "cut-peer")
		hold := jitter(rng, 3*time.Second, 5*time.Second)
		// The cut must bite (established replication connections too):
		// keep it until X noticed (its detection may take a few seconds).
		if testkit.Wait(15*time.Second, X+" seeing its peer disconnected", func() bool { sm := r.lastSample(X); return sm.ok && !sm.st.PeerConnected }, testkit.Every(50*time.Millisecond)) != nil {
			t.Errorf("trial %d: %s still reports its peer connected 15 s after cut %s %s", i, X, X, Y)
		}
		t.Logf("trial %d: %s saw its peer disconnected %.2fs after the cut", i, X, time.Since(r.faults[len(r.faults)-1].at).Seconds())
		time.Sleep(time.Until(r.faults[len(r.faults)-1].at.Add(hold)))
		heal(X)
	case "primary-apiserver":
		lc(t, "cut-api", X)
		r.addFault(X, "cut-api")
		time.Sleep(jitter(rng, lease+2*time.Second, lease+4*time.Second))
		heal(X)
	case "controller-agents":
		lc(t, "cut-control", X)
		lc(t, "cut-control", Y)
		r.addFault("", "cut-control")
		time.Sleep(jitter(rng, 4*time.Second, 6*time.Second))
		heal(X, Y)
	case "whole-node":
		lc(t, "partition", X)
		r.addFault(X, "partition")
		time.Sleep(jitter(rng, lease+2*time.Second, lease+4*time.Second))
		heal(X)
	case "flapping-link":
		end := time.Now().Add(20 * time.Second)
		for k := 0; k < 40 && time.Now().Before(end); k++ {
			lc(t, "partition", X)
			r.addFault(X, "flap-down")
			time.Sleep(jitter(rng, 500*time.Millisecond, 2*time.Second))
			heal(X)
			time.Sleep(jitter(rng, 500*time.Millisecond, 2*time.Second))
		}
	}
	if pinned != nil {
		time.Sleep(time.Second)
		pinned.halt()
		t.Logf("trial %d: client on %s: %d writes acknowledged, %d errors", i, X, pinned.written, pinned.errs)
	}
	vp, ok := r.converged(120*time.Second, v1.PhasePair, v1.PhaseNormal)
	if !ok {
		t.Errorf("trial %d: no convergence within 120 s after healing; status %+v", i, vp.Status)
		return "", false
	}
	w.halt()
	final := vp.Status.ActivePrimary
	t.Logf("trial %d: converged: phase %s, acting primary %s (epoch %d)", i, vp.Status.Phase, final, vp.Status.Epoch)
	r.checkAckHandovers(1)
	r.checkOneWriter()
	r.checkAcked(final)
	r.checkIdentical()
	return final, true
}
