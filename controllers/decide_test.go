package controllers

import (
	"testing"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

func st(role agentapi.Role, epoch uint64, ds agentapi.DataState, connected bool, mut ...func(*agentapi.Status)) *agentapi.Status {
	s := &agentapi.Status{Role: role, Epoch: epoch, Mode: agentapi.ModeAsync, DataState: ds, PeerConnected: connected, Writable: role == agentapi.RolePrimary, Joined: ds != agentapi.Inconsistent}
	for _, m := range mut {
		m(s)
	}
	return s
}

func up(node string, s *agentapi.Status) MemberView {
	return MemberView{Node: node, Reachable: true, Status: s}
}
func lost(node string) MemberView { return MemberView{Node: node, Suspect: true} }

func TestDecide(t *testing.T) {
	auth := func(holder string, epoch uint64, expired, failedOver bool) AuthorityView {
		return AuthorityView{Exists: true, Holder: holder, Epoch: epoch, Expired: expired, FailedOver: failedOver}
	}
	holding := func(s *agentapi.Status) { s.Holding = true }
	drained := func(s *agentapi.Status) { s.Holding, s.Drained = true, true }
	waiting := func(s *agentapi.Status) {
		s.WaitingForPeerOutdated = 2
		s.PeerConnected = false
		s.Mode = agentapi.ModeSync
	}
	syncMode := func(s *agentapi.Status) { s.Mode = agentapi.ModeSync }
	// wiped: a new replica where the pair's data was (its disk replaced).
	wiped := func(s *agentapi.Status) {
		s.Joined, s.PairUID, s.Writable = false, "", false
		s.DataStateReason = "new replica: it holds no data of the pair until a full copy completes"
	}
	// fencedSelf: the writer answers probes but lost the API server, so it
	// cannot renew its authority and refuses writes.
	fencedSelf := func(s *agentapi.Status) {
		s.Writable = false
		s.Reason = "member a is fenced at epoch 1: authority Lease not renewed since ... (self-fenced): not the writer"
	}
	base := func() View {
		return View{
			Primary: up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true)), Backup: up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true)),
			Mode: v1.ModeAsync, FailoverPolicy: v1.PolicyAutomatic, FailbackPolicy: v1.PolicyManual, Authority: auth("a", 1, false, false),
			PairUID: "uid-1",
		}
	}
	tests := []struct {
		name        string
		mut         func(*View)
		want        StepKind
		target      string
		wantBlocked string
	}{
		{"new pair: create authority", func(v *View) { v.Authority = AuthorityView{} }, StepCreateAuthority, "a", BlockedNone},
		{"steady PAIR: nothing", func(v *View) {}, StepNone, "", BlockedNone},
		{"fresh agents: configure", func(v *View) { v.Primary.Status, v.Backup.Status = nil, nil }, StepConfigure, "a", BlockedNone},
		{"backup at old epoch: configure", func(v *View) { v.Backup.Status.Epoch = 0 }, StepConfigure, "a", BlockedNone},
		{"mode changed live: configure", func(v *View) { v.Mode = v1.ModeSync }, StepConfigure, "a", BlockedNone},
		{"primary lost, authority expired, Automatic: SWAP", func(v *View) { v.Primary = lost("a"); v.Authority.Expired = true }, StepFailover, "b", BlockedNone},
		{"primary lost, authority still valid: wait", func(v *View) { v.Primary = lost("a") }, StepNone, "", BlockedAuthorityNotExpired},
		{"primary unreachable to probes but renewing (partition from controller): no failover", func(v *View) {
			v.Primary = MemberView{Node: "a", Suspect: true}
		}, StepNone, "", BlockedAuthorityNotExpired},
		{"primary lost, Manual: blocked", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.FailoverPolicy = v1.PolicyManual
		}, StepNone, "", BlockedManualPolicy},
		{"primary lost, Manual + request: SWAP", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.FailoverPolicy = v1.PolicyManual
			v.FailoverRequested = true
		}, StepFailover, "b", BlockedNone},
		{"primary lost, backup Outdated (recorded): blocked", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.RecordedOutdated = true
		}, StepNone, "", BlockedBackupOutdated},
		{"primary lost, backup recorded Outdated but the confirmation never left (writer never went on alone): SWAP", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.RecordedOutdated, v.Backup.OutdatedNotSent = true, true
		}, StepFailover, "b", BlockedNone},
		{"primary lost, Outdated record not sent, authority still valid: wait", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary = lost("a")
			v.Backup.RecordedOutdated, v.Backup.OutdatedNotSent = true, true
		}, StepNone, "", BlockedAuthorityNotExpired},
		{"primary lost, Outdated record not sent, Manual: blocked by the policy only", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.FailoverPolicy = v1.PolicyManual
			v.Backup.RecordedOutdated, v.Backup.OutdatedNotSent = true, true
		}, StepNone, "", BlockedManualPolicy},
		{"primary lost, Outdated confirmation sent, failover requested: still blocked", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.FailoverPolicy = v1.PolicyManual
			v.FailoverRequested = true
			v.Backup.RecordedOutdated = true
		}, StepNone, "", BlockedBackupOutdated},
		{"primary lost, Outdated record not sent but the backup reports Outdated itself: blocked", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.RecordedOutdated, v.Backup.OutdatedNotSent = true, true
			v.Backup.Status.DataState = agentapi.Outdated
		}, StepNone, "", BlockedBackupOutdated},
		{"sync: Outdated recorded, not yet sent: confirm to the writer", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, waiting)
			v.Backup = lost("b")
			v.Backup.RecordedOutdated, v.Backup.OutdatedNotSent = true, true
		}, StepConfirmOutdated, "a", BlockedNone},
		{"writer lost only the API server: fenced, authority expired, backup in sync: SWAP", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, syncMode, fencedSelf)
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.UpToDate, true, syncMode)
			v.Authority.Expired = true
		}, StepFailover, "b", BlockedNone},
		{"writer fenced, authority not expired yet: wait, no failover", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, fencedSelf)
		}, StepNone, "", BlockedNone},
		{"writer writable but its Lease looks expired (skew, slow renewal): no failover", func(v *View) {
			v.Authority.Expired = true
		}, StepNone, "", BlockedNone},
		{"writer fenced, authority expired, still shipping to the backup (async): wait for it", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, fencedSelf, func(s *agentapi.Status) { s.OutOfSyncRegions = 3 })
			v.Authority.Expired = true
		}, StepNone, "", BlockedBackupCatchingUp},
		{"writer fenced, authority expired, link down, backup recorded Outdated (sent): blocked", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, syncMode, fencedSelf)
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.UpToDate, false, syncMode)
			v.Backup.RecordedOutdated = true
			v.Authority.Expired = true
		}, StepNone, "", BlockedBackupOutdated},
		{"writer fenced, authority expired, backup lost: blocked", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, fencedSelf)
			v.Backup = lost("b")
			v.Authority.Expired = true
		}, StepNone, "", BlockedBackupUnreachable},
		{"writer fenced, authority expired, Manual: blocked by the policy", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, fencedSelf)
			v.Authority.Expired = true
			v.FailoverPolicy = v1.PolicyManual
		}, StepNone, "", BlockedManualPolicy},
		{"writer fenced, authority expired, copy towards the backup running: blocked", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, fencedSelf, func(s *agentapi.Status) { s.Copy.Running = true; s.OutOfSyncRegions = 10 })
			v.Backup.Status.DataState = agentapi.Inconsistent
			v.Authority.Expired = true
		}, StepNone, "", BlockedBackupInconsistent},
		{"promoted writer not yet authorized at its new epoch: configure the old one, no failover", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, false, fencedSelf)
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, fencedSelf)
		}, StepConfigure, "b", BlockedNone},
		{"writer fenced at an older epoch than the authority's: configure, not failover", func(v *View) {
			v.Authority = auth("a", 3, true, false)
			v.Primary.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, fencedSelf)
			v.Backup.Status = st(agentapi.RoleBackup, 3, agentapi.UpToDate, true)
		}, StepConfigure, "a", BlockedNone},
		{"primary lost, backup Inconsistent: blocked", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.Status.DataState = agentapi.Inconsistent
		}, StepNone, "", BlockedBackupInconsistent},
		{"both lost: blocked", func(v *View) {
			v.Primary, v.Backup = lost("a"), lost("b")
			v.Authority.Expired = true
		}, StepNone, "", BlockedBackupUnreachable},
		{"after SWAP: promoted backup gets configured", func(v *View) {
			v.Primary = lost("a")
			v.Authority = auth("b", 2, false, true)
		}, StepConfigure, "b", BlockedNone},
		{"SWAP steady: old primary away, nothing", func(v *View) {
			v.Primary = lost("a")
			v.Authority = auth("b", 2, false, true)
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, false)
		}, StepNone, "", BlockedNone},
		{"old primary back: configured as backup (COPY follows)", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, false)
			v.Primary.Status = st(agentapi.RoleNone, 1, agentapi.UpToDate, false)
		}, StepConfigure, "b", BlockedNone},
		{"NORMAL, failback Manual: stay", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepNone, "", BlockedNone},
		{"NORMAL, failback requested: hold", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackRequested = true
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepHold, "b", BlockedNone},
		{"NORMAL, failback Automatic, holding not drained: wait", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, holding)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepNone, "", BlockedNone},
		{"NORMAL, failback Automatic, spec.primary has not reached the API server since the failover: wait", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
			v.Primary.APILost = true
		}, StepNone, "", BlockedNone},
		{"NORMAL, failback Automatic, spec.primary reached the API server again: hold", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepHold, "b", BlockedNone},
		{"NORMAL, drained: switch to spec.primary", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, drained)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepSwitch, "a", BlockedNone},
		// A writer whose agent is stopping (rolling update) hands over.
		{"writer's agent stopping, peer in sync: hold for the handover", func(v *View) {
			v.Primary.Status.Stopping = true
		}, StepHold, "a", BlockedNone},
		{"writer's agent stopping, drained: switch to the peer (spec.backup)", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, drained, func(s *agentapi.Status) { s.Stopping = true })
		}, StepSwitch, "b", BlockedNone},
		{"writer's agent stopping, peer catching up: wait", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Stopping = true; s.Copy.Running = true })
			v.Backup.Status.DataState = agentapi.Inconsistent
		}, StepNone, "", BlockedNone},
		{"writer's agent stopping, peer away: wait (nobody to hand over to)", func(v *View) {
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, func(s *agentapi.Status) { s.Stopping = true })
			v.Backup = lost("b")
		}, StepNone, "", BlockedNone},
		{"writer at spec.backup stopping after a failover, failback Manual: hand over anyway", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Stopping = true })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepHold, "b", BlockedNone},
		{"failback Automatic towards a stopping spec.primary: no hold", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Stopping = true })
		}, StepNone, "", BlockedNone},
		{"failback towards a stopping spec.primary while holding: release", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, holding)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Stopping = true })
		}, StepReleaseHold, "b", BlockedNone},
		{"COPY running: no failback yet", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Copy.Running = true; s.OutOfSyncRegions = 10 })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.Inconsistent, true)
		}, StepNone, "", BlockedNone},
		{"user swapped spec (switchover), in sync: hold", func(v *View) {
			// spec.primary is now b's old peer; authority still on the old writer, no failover.
			v.Primary, v.Backup = up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true)), up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true))
			v.Authority = auth("a", 1, false, false)
		}, StepHold, "a", BlockedNone},
		{"hold while peer lost: release", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, false, holding)
			v.Primary = MemberView{Node: "a"}
		}, StepReleaseHold, "b", BlockedNone},
		{"sync: backup lost and writes waiting: record Outdated", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, waiting)
			v.Backup = lost("b")
		}, StepRecordOutdated, "b", BlockedNone},
		{"sync: Outdated recorded: confirm to the writer", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, waiting)
			v.Backup = lost("b")
			v.Backup.RecordedOutdated = true
		}, StepConfirmOutdated, "a", BlockedNone},
		{"sync: link starting, nothing waiting: no outdating", func(v *View) {
			v.Mode = v1.ModeSync
			v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false, syncMode)
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.UpToDate, false, syncMode)
		}, StepNone, "", BlockedNone},
		{"backup lost (async): PAIR degraded, nothing to do", func(v *View) {
			v.Backup = lost("b")
			v.Primary.Status.PeerConnected = false
		}, StepNone, "", BlockedNone},
		// Failback under steady writes: a small diff in flight does not
		// keep the hold from starting; under the hold the writer drains.
		{"NORMAL under async writes (a few regions in flight): hold", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.OutOfSyncRegions, s.OutOfSyncBytes = 7, 7<<16 })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepHold, "b", BlockedNone},
		{"NORMAL with a large backlog: no hold yet", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.OutOfSyncRegions, s.OutOfSyncBytes = 1000, 1000<<16 })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepNone, "", BlockedNone},
		{"holding, still draining: keep holding", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, holding, func(s *agentapi.Status) { s.OutOfSyncRegions, s.OutOfSyncBytes, s.HoldSeconds = 2, 2<<16, 0.2 })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepNone, "", BlockedNone},
		{"holding past the budget without draining: release", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, holding, func(s *agentapi.Status) { s.OutOfSyncRegions, s.OutOfSyncBytes, s.HoldSeconds = 2, 2<<16, 2 })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepReleaseHold, "b", BlockedNone},
		{"a hold just timed out: no new hold during the backoff", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.HoldBackoff = true
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)
		}, StepNone, "", BlockedNone},
		// Identity (invariant 8): a writer whose disk was wiped comes back
		// as a new replica, or with none at all.
		{"writer wiped (new replica), authority not expired: wait", func(v *View) {
			v.DataInitialized = true
			v.Primary.Status = st(agentapi.RoleNone, 1, agentapi.Inconsistent, false, wiped)
			v.Backup.Status.PeerConnected = false
		}, StepNone, "", BlockedAuthorityNotExpired},
		{"writer wiped (new replica), authority expired: SWAP", func(v *View) {
			v.DataInitialized = true
			v.Primary.Status = st(agentapi.RoleNone, 1, agentapi.Inconsistent, false, wiped)
			v.Backup.Status.PeerConnected = false
			v.Authority.Expired = true
		}, StepFailover, "b", BlockedNone},
		{"writer has no replica any more, pair had data, authority expired: SWAP", func(v *View) {
			v.DataInitialized = true
			v.Primary.Status = nil
			v.Authority.Expired = true
		}, StepFailover, "b", BlockedNone},
		{"writer has no replica, status lost but the backup holds the data: wait, not configure", func(v *View) {
			v.Primary.Status = nil
		}, StepNone, "", BlockedAuthorityNotExpired},
		{"brand-new pair, no replicas yet: configure (the writer starts the data)", func(v *View) {
			v.Primary.Status, v.Backup.Status = nil, nil
		}, StepConfigure, "a", BlockedNone},
		{"both members wiped: data lost, nobody promoted", func(v *View) {
			v.DataInitialized = true
			v.Primary.Status = st(agentapi.RoleNone, 1, agentapi.Inconsistent, false, wiped)
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.Inconsistent, false, wiped)
			v.Authority.Expired = true
		}, StepNone, "", BlockedDataLost},
		{"primary lost, backup new (never copied to): blocked", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.Inconsistent, false, wiped)
		}, StepNone, "", BlockedBackupInconsistent},
		{"primary lost, backup holds another pair's data: blocked", func(v *View) {
			v.Primary = lost("a")
			v.Authority.Expired = true
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.UpToDate, false, func(s *agentapi.Status) { s.PairUID = "other" })
		}, StepNone, "", BlockedBackupInconsistent},
		{"NORMAL after a wipe, full copy running to spec.primary: no failback", func(v *View) {
			v.Authority = auth("b", 2, false, true)
			v.FailbackPolicy = v1.PolicyAutomatic
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Copy.Running, s.Copy.FullCopy = true, true })
			v.Primary.Status = st(agentapi.RoleBackup, 2, agentapi.Inconsistent, true, wiped)
		}, StepNone, "", BlockedNone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := base()
			tt.mut(&v)
			got := Decide(v)
			if got.Kind != tt.want || (tt.target != "" && got.Target != tt.target) || got.Blocked != tt.wantBlocked {
				t.Fatalf("Decide = %+v, want %s target %q blocked %s", got, tt.want, tt.target, tt.wantBlocked)
			}
		})
	}
}

func TestDerivePhase(t *testing.T) {
	a := func(holder string) AuthorityView { return AuthorityView{Exists: true, Holder: holder, Epoch: 2} }
	tests := []struct {
		name string
		v    View
		last v1.Phase
		want v1.Phase
	}{
		{"no authority", View{}, "", v1.PhasePair},
		{"primary writes, in sync", View{Primary: up("a", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)), Backup: up("b", st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)), Authority: a("a")}, "", v1.PhasePair},
		{"primary writes, backup lost", View{Primary: up("a", st(agentapi.RolePrimary, 2, agentapi.UpToDate, false)), Backup: lost("b"), Authority: a("a")}, v1.PhasePair, v1.PhasePair},
		{"primary resyncs returning backup", View{Primary: up("a", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Copy.Running = true })), Backup: up("b", st(agentapi.RoleBackup, 2, agentapi.Inconsistent, true)), Authority: a("a")}, v1.PhasePair, v1.PhaseCopy},
		{"backup writes alone", View{Primary: lost("a"), Backup: up("b", st(agentapi.RolePrimary, 2, agentapi.UpToDate, false)), Authority: a("b")}, v1.PhasePair, v1.PhaseSwap},
		{"backup copies to returning primary", View{Primary: up("a", st(agentapi.RoleBackup, 2, agentapi.Inconsistent, true)), Backup: up("b", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.Copy.Running = true })), Authority: a("b")}, v1.PhaseSwap, v1.PhaseCopy},
		{"backup writes, in sync", View{Primary: up("a", st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)), Backup: up("b", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true)), Authority: a("b")}, v1.PhaseCopy, v1.PhaseNormal},
		{"writer unobserved: keep last", View{Primary: lost("a"), Backup: lost("b"), Authority: a("a")}, v1.PhaseSwap, v1.PhaseSwap},
		// Async writes in flight are not a copy: the phase flapped
		// NORMAL↔COPY under steady writes.
		{"backup writes under async load, regions in flight", View{Primary: up("a", st(agentapi.RoleBackup, 2, agentapi.UpToDate, true)), Backup: up("b", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, func(s *agentapi.Status) { s.OutOfSyncRegions = 5 })), Authority: a("b")}, v1.PhaseNormal, v1.PhaseNormal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := DerivePhase(tt.v, tt.last); got != tt.want {
				t.Fatalf("DerivePhase = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestWriterFenced(t *testing.T) {
	fenced := func(s *agentapi.Status) { s.Writable = false }
	auth := AuthorityView{Exists: true, Holder: "a", Epoch: 1}
	tests := []struct {
		name string
		w    MemberView
		want bool
	}{
		{"writable primary", up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true)), false},
		{"fenced primary at the authority's epoch", up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true, fenced)), true},
		{"fenced primary at another epoch", up("a", st(agentapi.RolePrimary, 2, agentapi.UpToDate, true, fenced)), false},
		{"backup role", up("a", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true)), false},
		{"no report", up("a", nil), false},
		{"unreachable", lost("a"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := View{Primary: tt.w, Backup: up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true)), Authority: auth}
			if got := WriterFenced(v); got != tt.want {
				t.Fatalf("WriterFenced = %v, want %v", got, tt.want)
			}
		})
	}
	if WriterFenced(View{}) {
		t.Fatal("WriterFenced without an authority")
	}
}
