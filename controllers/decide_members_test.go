package controllers

import (
	"strings"
	"testing"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// three is a healthy pair of three: A writes to B (spec.backup) and C (an
// additional backup), both connected and in sync, at epoch 1.
func three(cMode v1.ReplicationMode) View {
	peers := func(s *agentapi.Status) {
		s.Peers = []agentapi.PeerStatus{{Node: "b", Mode: agentapi.ModeAsync, Connected: true}, {Node: "c", Mode: cModeOr(cMode), Connected: true}}
		s.Tracked = []string{"b", "c"}
	}
	backupOf := func(sib string) func(*agentapi.Status) {
		return func(s *agentapi.Status) { s.PeerNode, s.Tracked = "a", []string{"a", sib} }
	}
	c := up("c", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true, backupOf("b")))
	c.Mode = cMode
	return View{
		Primary: up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, peers)),
		Backup:  up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true, backupOf("c"))),
		More:    []MemberView{c},
		Mode:    v1.ModeAsync, FailoverPolicy: v1.PolicyAutomatic, FailbackPolicy: v1.PolicyManual,
		Authority: AuthorityView{Exists: true, Holder: "a", Epoch: 1}, PairUID: "uid-1",
	}
}

func cModeOr(m v1.ReplicationMode) v1.ReplicationMode {
	if m == "" {
		return v1.ModeAsync
	}
	return m
}

// peer returns the writer's report of node in v.
func peer(v *View, node string) *agentapi.PeerStatus {
	w := v.member(v.Authority.Holder).Status
	for i := range w.Peers {
		if w.Peers[i].Node == node {
			return &w.Peers[i]
		}
	}
	return nil
}

// TestDecideThreeMembers: the transitions with three members.
func TestDecideThreeMembers(t *testing.T) {
	tests := []struct {
		name        string
		cMode       v1.ReplicationMode
		mut         func(*View)
		want        StepKind
		target      string
		wantBlocked string
		msg         string
	}{
		{name: "steady: nothing", mut: func(v *View) {}, want: StepNone, wantBlocked: BlockedNone},
		{name: "writer mirrors to B only: configure", mut: func(v *View) {
			v.Primary.Status.Peers = v.Primary.Status.Peers[:1]
		}, want: StepConfigure, target: "a"},
		{name: "C's mode changed: configure", cMode: v1.ModeSync, mut: func(v *View) {
			peer(v, "c").Mode = agentapi.ModeAsync
		}, want: StepConfigure, target: "a"},
		{name: "B does not know C: configure", mut: func(v *View) {
			v.Backup.Status.Tracked = []string{"a"}
		}, want: StepConfigure, target: "a"},
		{name: "writer lost, B lagging, C current: C promoted", mut: func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.LastWriterPeers = []agentapi.PeerStatus{{Node: "b", OutOfSyncRegions: 900}, {Node: "c", OutOfSyncRegions: 3}}
		}, want: StepFailover, target: "c"},
		{name: "writer lost, both current: spec.backup first", mut: func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.LastWriterPeers = []agentapi.PeerStatus{{Node: "b"}, {Node: "c"}}
		}, want: StepFailover, target: "b"},
		{name: "writer lost, B Outdated: C promoted", mut: func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.RecordedOutdated = true
		}, want: StepFailover, target: "c"},
		{name: "writer lost, C Inconsistent (being copied), B lagging: B promoted", mut: func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.More[0].Status.DataState = agentapi.Inconsistent
			v.LastWriterPeers = []agentapi.PeerStatus{{Node: "b", OutOfSyncRegions: 900}, {Node: "c", OutOfSyncRegions: 3}}
		}, want: StepFailover, target: "b"},
		{name: "writer and B lost: C promoted", mut: func(v *View) {
			v.Primary, v.Backup = lost("a"), lost("b")
			v.Authority.Expired = true
		}, want: StepFailover, target: "c"},
		{name: "all three lost: blocked, every member said", mut: func(v *View) {
			v.Primary, v.Backup, v.More[0] = lost("a"), lost("b"), lost("c")
			v.Authority.Expired = true
		}, want: StepNone, wantBlocked: BlockedBackupUnreachable, msg: "a and c are unreachable"},
		{name: "sync pair, writer and B lost: the Async C is not promoted by itself", cMode: v1.ModeAsync, mut: func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary, v.Backup = lost("a"), lost("b")
			v.Authority.Expired = true
		}, want: StepNone, wantBlocked: BlockedBackupUnreachable, msg: "c is an Async backup"},
		{name: "sync pair, writer and B lost, failover requested: C promoted", cMode: v1.ModeAsync, mut: func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary, v.Backup = lost("a"), lost("b")
			v.Authority.Expired = true
			v.FailoverRequested = true
		}, want: StepFailover, target: "c"},
		{name: "async pair, C Sync, writer lost: the Sync C before B", cMode: v1.ModeSync, mut: func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
		}, want: StepFailover, target: "c"},
		{name: "C (Sync) lost, writer waiting: record C Outdated", cMode: v1.ModeSync, mut: func(v *View) {
			v.More[0] = lost("c")
			v.More[0].Mode = v1.ModeSync
			peer(v, "c").Connected = false
			v.Primary.Status.WaitingForPeerOutdated = 1
		}, want: StepRecordOutdated, target: "c"},
		{name: "C (Sync) recorded Outdated: confirm it to the writer", cMode: v1.ModeSync, mut: func(v *View) {
			v.More[0] = lost("c")
			v.More[0].Mode = v1.ModeSync
			v.More[0].RecordedOutdated = true
			peer(v, "c").Connected = false
			v.Primary.Status.WaitingForPeerOutdated = 1
		}, want: StepConfirmOutdated, target: "a"},
		{name: "C (Async) lost: nothing to record", mut: func(v *View) {
			v.More[0] = lost("c")
			peer(v, "c").Connected = false
		}, want: StepNone, wantBlocked: BlockedNone},
		{name: "SWAP to B, A back in sync, failback requested: hold", mut: func(v *View) {
			v.Authority = AuthorityView{Exists: true, Holder: "b", Epoch: 2, FailedOver: true}
			v.FailbackRequested = true
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.PeerNode, s.Tracked = "b", []string{"b", "c"} })
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) {
				s.Peers = []agentapi.PeerStatus{{Node: "a", Mode: agentapi.ModeAsync, Connected: true}, {Node: "c", Mode: agentapi.ModeAsync, Connected: true}}
			})
			v.More[0].Status.Epoch, v.More[0].Status.PeerNode, v.More[0].Status.Tracked = 2, "b", []string{"a", "b"}
		}, want: StepHold, target: "b"},
		{name: "failback hold, A drained (C still lagging): switch to A", mut: func(v *View) {
			v.Authority = AuthorityView{Exists: true, Holder: "b", Epoch: 2, FailedOver: true}
			v.FailbackRequested = true
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.PeerNode, s.Tracked = "b", []string{"b", "c"} })
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) {
				s.Holding = true
				s.Peers = []agentapi.PeerStatus{{Node: "a", Mode: agentapi.ModeAsync, Connected: true, Drained: true},
					{Node: "c", Mode: agentapi.ModeAsync, Connected: true, OutOfSyncRegions: 40, OutOfSyncBytes: 40 << 16}}
			})
			v.More[0].Status.Epoch, v.More[0].Status.PeerNode, v.More[0].Status.Tracked = 2, "b", []string{"a", "b"}
		}, want: StepSwitch, target: "a"},
		{name: "planned switchover (spec.primary and spec.backup swapped): hold on A, then switch to B", mut: func(v *View) {
			v.Primary, v.Backup = v.Backup, v.Primary
			v.Backup.Status.Holding = true
			v.Backup.Status.Peers[0].Drained = true
		}, want: StepSwitch, target: "b"},
		{name: "stopping writer: hand over to B (spec.primary is the writer)", mut: func(v *View) {
			v.Primary.Status.Stopping = true
		}, want: StepHold, target: "a"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := three(tc.cMode)
			tc.mut(&v)
			got := Decide(v)
			if got.Kind != tc.want || (tc.target != "" && got.Target != tc.target) {
				t.Fatalf("Decide = %+v; want %s on %q", got, tc.want, tc.target)
			}
			if tc.wantBlocked != "" && got.Blocked != tc.wantBlocked {
				t.Fatalf("Decide = %+v; want blocked %s", got, tc.wantBlocked)
			}
			if tc.msg != "" && !strings.Contains(got.Message, tc.msg) {
				t.Fatalf("message %q lacks %q", got.Message, tc.msg)
			}
		})
	}
}

// TestDerivePhaseThreeMembers: SWAP while the preferred primary is away,
// COPY while any member is being copied, NORMAL once all are back.
func TestDerivePhaseThreeMembers(t *testing.T) {
	v := three("")
	if p := DerivePhase(v, ""); p != v1.PhasePair {
		t.Fatalf("steady: %s", p)
	}
	peer(&v, "c").Copy.Running = true
	if p := DerivePhase(v, ""); p != v1.PhaseCopy {
		t.Fatalf("copying to C: %s", p)
	}
	v = three("")
	v.Authority = AuthorityView{Exists: true, Holder: "b", Epoch: 2}
	v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) {
		s.Peers = []agentapi.PeerStatus{{Node: "a"}, {Node: "c", Connected: true}}
	})
	if p := DerivePhase(v, ""); p != v1.PhaseSwap {
		t.Fatalf("B writes, A away: %s", p)
	}
	v.Backup.Status.Peers[0].Connected = true
	if p := DerivePhase(v, ""); p != v1.PhaseNormal {
		t.Fatalf("B writes, A and C in sync: %s", p)
	}
}
