package controllers

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestStoryFailbackUnderLoad: the automatic failback of a pair whose acting
// primary serves a client writing continuously (about 400 writes a second
// over a connection that stays open, as fio or a file system would) finishes
// within seconds, holds writes for at most a second, and the client sees no
// error and loses no write. Before, the hold started only when a probe saw
// nothing left to ship, which steady async writes rarely allow, so failback
// took tens of seconds of holds and releases, the phase flapped NORMAL↔COPY,
// and right after the switch the new writer refused forwarded writes
// ("authority Lease not yet renewed by this node"): the client got EIO.
func TestStoryFailbackUnderLoad(t *testing.T) {
	// One manager for every trial: two would reconcile the same pairs.
	startLoggedManager(t)
	for _, mode := range []v1.ReplicationMode{v1.ModeAsync, v1.ModeSync} {
		t.Run(string(mode), func(t *testing.T) {
			tl := stresstest.NewTally(t, "failback")
			for range stresstest.Trials(1) {
				tl.Trials.Add(1)
				tl.Faults.Add(1) // the writer's node lost, then back under load
				failbackUnderLoadTrial(t, mode)
				if t.Failed() {
					return
				}
			}
		})
	}
}

func failbackUnderLoadTrial(t *testing.T, mode v1.ReplicationMode) {
	s := newStory(t, mode, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		t.Fatal(err)
	}
	s.waitFor(20*time.Second, "PAIR in sync", pairInSync(s.a.name))
	s.a.kill()
	s.waitFor(30*time.Second, "failover to the backup", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.b.name && vp.Status.Epoch == 2 && cond(vp, v1.ConditionReady)
	})

	// The client: one open "connection" to the acting primary's
	// volume, writing numbered 4 KiB blocks over 256 blocks.
	e, err := s.b.agent().Lookup(s.ns + "/" + s.name)
	if err != nil {
		t.Fatal(err)
	}
	backend := e.Backend
	var (
		mu       sync.Mutex
		acked    = map[int64]uint64{} // block → sequence number of its last acknowledged write
		errs     []string
		maxLat   time.Duration
		slowAt   time.Time
		returned time.Time
		nwrites  uint64
		stop     = make(chan struct{})
		finished = make(chan struct{})
	)
	go func() {
		defer close(finished)
		buf := make([]byte, 4096)
		tick := time.NewTicker(2500 * time.Microsecond)
		defer tick.Stop()
		for seq := uint64(1); ; seq++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			blk := int64(seq*37) % 256
			binary.BigEndian.PutUint64(buf, seq)
			start := time.Now()
			err := backend.WriteAt(context.Background(), buf, blk*4096, seq%16 == 0)
			lat := time.Since(start)
			mu.Lock()
			nwrites++
			// Only writes from the old primary's return on: the
			// first ones after the failover waited, as they must
			// in Sync mode, until the lost member was recorded
			// Outdated (invariant 2).
			if lat > maxLat && !returned.IsZero() && start.After(returned) {
				maxLat, slowAt = lat, start
			}
			if err != nil {
				errs = append(errs, err.Error())
			} else {
				acked[blk] = seq
			}
			mu.Unlock()
		}
	}()

	// The writer runs alone before the old primary returns: in Sync mode
	// its first writes wait until the lost member is recorded Outdated
	// (invariant 2), which is not what this test measures.
	if mode == v1.ModeSync {
		s.waitFor(30*time.Second, "the lost member recorded Outdated", func(vp *v1.VolumePair) bool {
			ms := vp.Status.MemberStatus(s.a.name)
			return ms != nil && ms.DataState == v1.DataOutdated
		})
	}
	testkit.Eventually(t, 30*time.Second, "writes acknowledged by the lone writer", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return len(acked) >= 32, fmt.Sprintf("%d blocks acknowledged, %d errors", len(acked), len(errs))
	})

	// The old primary returns: COPY, NORMAL, failback to PAIR.
	s.a.start()
	started := time.Now()
	mu.Lock()
	returned = started
	mu.Unlock()
	vp := s.waitFor(60*time.Second, "failback under load", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == s.a.name && vp.Status.Epoch == 3 && cond(vp, v1.ConditionReady)
	})
	// From the old primary's return: the resync, then the failback.
	failback := time.Since(started)
	if vp.Status.LastFailbackTime == nil {
		t.Fatal("no lastFailbackTime")
	}
	// Keep writing through the old writer (forwarded) for a while.
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-finished
	mu.Lock()
	defer mu.Unlock()
	hold := statusOf(s.b, s.ns, s.name).LastHoldSeconds
	t.Logf("%s: failback %v after the old primary returned (resync included); hold %.3fs; %d writes, slowest %v at %v, %d errors",
		mode, failback.Round(time.Millisecond), hold, nwrites, maxLat.Round(time.Millisecond), slowAt.Sub(started).Round(time.Millisecond), len(errs))
	if len(errs) > 0 {
		t.Fatalf("the client got %d errors, first: %s", len(errs), errs[0])
	}
	if failback > 15*time.Second {
		t.Errorf("failback took %v under load", failback)
	}
	if hold > 1 || maxLat > time.Second {
		t.Errorf("the failback hold lasted %.3fs, the slowest write %v", hold, maxLat)
	}
	if ev := s.events(); strings.Contains(ev, "FailbackHoldReleased") {
		t.Errorf("a failback hold was released without switching:\n%s", ev)
	}

	// Nothing acknowledged is lost: every block holds its last
	// acknowledged write on the new writer, and the replicas agree.
	s.waitFor(20*time.Second, "in sync after failback", pairInSync(s.a.name))
	s.agentsInSync(s.a)
	s.sameData()
	data, err := os.ReadFile(s.a.dataPath(s.ns, s.name))
	if err != nil {
		t.Fatal(err)
	}
	for blk, seq := range acked {
		if got := binary.BigEndian.Uint64(data[blk*4096:]); got != seq {
			t.Fatalf("block %d holds write %d, the last acknowledged one was %d", blk, got, seq)
		}
	}
}
