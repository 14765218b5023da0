package controllers

import (
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

func TestLastKnown(t *testing.T) {
	prev := st(agentapi.RolePrimary, 1, agentapi.UpToDate, true)
	now := st(agentapi.RolePrimary, 1, agentapi.UpToDate, false)
	for _, tc := range []struct {
		name      string
		m         MemberView
		last      *agentapi.Status
		wantStale bool
		want      *agentapi.Status
	}{
		{"answered: this round's report", up("a", now), prev, false, now},
		{"one failed probe: the previous report", MemberView{Node: "a"}, prev, true, prev},
		{"suspect: no report", lost("a"), prev, false, nil},
		{"never answered: no report", MemberView{Node: "a"}, nil, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := lastKnown(tc.m, tc.last)
			if got.Stale != tc.wantStale || got.Status != tc.want {
				t.Fatalf("lastKnown = stale %v status %+v, want stale %v status %+v", got.Stale, got.Status, tc.wantStale, tc.want)
			}
			if tc.wantStale && !got.Reachable {
				t.Fatal("a stale member is shown as reachable")
			}
		})
	}
}

func TestEndpointFor(t *testing.T) {
	const ep = "nbd://10.0.0.1:10809/ns/db"
	prev := v1.VolumePairStatus{ActivePrimary: "a", Epoch: 3, Endpoint: ep}
	fenced := st(agentapi.RolePrimary, 3, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Writable = false })
	for _, tc := range []struct {
		name   string
		prev   v1.VolumePairStatus
		holder string
		epoch  int64
		writer MemberView
		nbd    string
		want   string
	}{
		{"writer serves", v1.VolumePairStatus{}, "a", 3, up("a", st(agentapi.RolePrimary, 3, agentapi.UpToDate, true)), ep, ep},
		{"writer serves, no NBD address published", prev, "a", 3, up("a", st(agentapi.RolePrimary, 3, agentapi.UpToDate, true)), "", ""},
		{"writer says it does not accept writes", prev, "a", 3, up("a", fenced), ep, ""},
		{"writer has no replica yet", prev, "a", 3, up("a", nil), ep, ""},
		{"writer unreachable, same holder and epoch: kept", prev, "a", 3, lost("a"), ep, ep},
		{"writer unreachable, authority moved", prev, "b", 4, lost("b"), ep, ""},
		{"writer unreachable, new epoch on the same node", prev, "a", 4, lost("a"), ep, ""},
		{"writer unreachable, never served", v1.VolumePairStatus{ActivePrimary: "a", Epoch: 3}, "a", 3, lost("a"), ep, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := endpointFor(tc.prev, tc.holder, tc.epoch, &tc.writer, tc.nbd); got != tc.want {
				t.Fatalf("endpointFor = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestRoundTimingNext(t *testing.T) {
	const p = 2 * time.Second
	for _, tc := range []struct {
		name string
		rt   roundTiming
		want time.Duration
	}{
		{"steady", roundTiming{period: p, stepNone: true, untilExpiry: 6 * time.Second}, p},
		{"after a step", roundTiming{period: p, acted: true}, 100 * time.Millisecond},
		{"lost writer, authority expires in 1 s", roundTiming{period: p, blocked: BlockedAuthorityNotExpired, untilExpiry: time.Second}, time.Second + 50*time.Millisecond},
		{"lost writer, authority expires in 5 s", roundTiming{period: p, blocked: BlockedAuthorityNotExpired, untilExpiry: 5 * time.Second}, p},
		{"promoted writer waiting for its first renewal", roundTiming{period: p, stepNone: true, writerFenced: true, untilExpiry: 6 * time.Second}, 250 * time.Millisecond},
		{"fenced writer, authority expired", roundTiming{period: p, stepNone: true, writerFenced: true, expired: true, untilExpiry: -time.Second}, p},
		{"writer missed a probe, silent in 0.5 s", roundTiming{period: p, stepNone: true, writerFailing: true, untilSilent: 500 * time.Millisecond}, 550 * time.Millisecond},
		{"writer missed a probe, silent in 3 s", roundTiming{period: p, stepNone: true, writerFailing: true, untilSilent: 3 * time.Second}, p},
		{"writer holding for a failback: switch as soon as drained", roundTiming{period: p, stepNone: true, holding: true, untilExpiry: 6 * time.Second}, 50 * time.Millisecond},
		{"writer missed a probe and its authority expires first", roundTiming{period: p, blocked: BlockedAuthorityNotExpired, untilExpiry: 300 * time.Millisecond, writerFailing: true, untilSilent: time.Second}, 350 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.rt.next(); got != tc.want {
				t.Fatalf("next() = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSynchronizedCondition(t *testing.T) {
	w := func(mut ...func(*agentapi.Status)) *MemberView {
		m := up("b", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, mut...))
		return &m
	}
	o := func(mut ...func(*agentapi.Status)) *MemberView {
		m := up("a", st(agentapi.RoleBackup, 2, agentapi.UpToDate, true, mut...))
		return &m
	}
	unmergedOn := func(n uint64) func(*agentapi.Status) { return func(s *agentapi.Status) { s.UnmergedRegions = n } }
	for _, tc := range []struct {
		name          string
		writer, other *MemberView
		want          bool
		reason, msg   string
	}{
		{"in sync", w(), o(), true, ReasonInSync, "same data"},
		{"peer disconnected", w(func(s *agentapi.Status) { s.PeerConnected = false }), o(), false, ReasonPeerDisconnected, "not connected"},
		{"full copy running, with its reason", w(func(s *agentapi.Status) {
			s.Copy = agentapi.CopyStatus{Running: true, TotalBytes: 100, DoneBytes: 10, FullCopy: true, Reason: "the replica on a is new or was wiped"}
		}), o(func(s *agentapi.Status) { s.DataState = agentapi.Inconsistent }), false, ReasonCopying, "full copy: the replica on a is new or was wiped"},
		// The second embodiment: the returning member kept writes it never
		// shipped; in sync otherwise, but not identical.
		{"unmerged regions on the returning member", w(), o(unmergedOn(7)), false, ReasonUnmergedRegions, "7 regions may differ between the members: a holds"},
		{"unmerged regions on the writer (after failback)", w(unmergedOn(2)), o(), false, ReasonUnmergedRegions, "2 regions may differ between the members: b holds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var conds []metav1.Condition
			setSynchronizedCondition(&conds, 1, tc.writer, []*MemberView{tc.other})
			c := meta.FindStatusCondition(conds, v1.ConditionSynchronized)
			if c == nil || (c.Status == metav1.ConditionTrue) != tc.want || c.Reason != tc.reason || !strings.Contains(c.Message, tc.msg) {
				t.Fatalf("Synchronized = %+v, want %v/%s with %q", c, tc.want, tc.reason, tc.msg)
			}
		})
	}
}

func TestTruncate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"short", 10, "short"},
		{"exactly10!", 10, "exactly10!"},
		{"a longer message", 10, "a longe…"},
		{"ééééé", 6, "é…"},
	} {
		if got := truncate(tc.in, tc.n); got != tc.want || len(got) > tc.n {
			t.Errorf("truncate(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
}
