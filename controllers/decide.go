package controllers

import (
	"fmt"
	"slices"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// MemberView is what the controller observed about one member this round.
type MemberView struct {
	// Node is the member's node.
	Node string
	// Field is the spec field that names it ("spec.backup.node"), for
	// messages.
	Field string
	// Unregistered is true when no agent has registered on the node (it
	// has no agent Lease): the node has no Tandem agent, or no such node
	// exists.
	Unregistered bool
	// NodeMissing is true when the cluster has Node objects but none for
	// this member: a typo in the spec, or a node deleted since.
	NodeMissing bool
	// Held is true when storage.tandem.dev/hold-resync names the member:
	// it is kept out of resync, fenced (role None), and never promoted
	// automatically.
	Held bool
	// Reachable is true when the agent answered the last probe.
	Reachable bool
	// Suspect is true after failureThreshold failed probes in a row, or when
	// the member's Node object is not Ready.
	Suspect bool
	// Status is the agent's report of the replica (nil: no report).
	Status *agentapi.Status
	// APILost is true when the member's agent has not renewed its agent
	// Lease since the authority last moved: it may have lost the API
	// server, and made the writer it could not renew its authority (it
	// would fence itself and be failed over again). No failback to it.
	APILost bool
	// Stale is true when Status is the member's previous report, shown
	// because the last probe failed but the member is not suspect yet
	// (status rendering only; Decide sees the failed probe).
	Stale bool
	// RecordedOutdated is true when the VolumePair's status records the
	// member as Outdated (written by the controller, invariant 2).
	RecordedOutdated bool
	// OutdatedNotSent is true when that record says no confirmation
	// (PeerOutdated) has left the controller: the writer never continued
	// alone, so the member still holds every acknowledged write. False for a
	// record whose confirmation may have reached the writer, or that
	// predates the field.
	OutdatedNotSent bool
	// Mode is the member's replication mode as a backup (spec.mode, or an
	// additional backup's own); "" is the pair's.
	Mode v1.ReplicationMode
	// GrowRefused is the agent's answer when it refused to grow the
	// replica to the View's Size less than growRetry ago ("" otherwise):
	// it is not asked again before then, or before spec.size changes.
	GrowRefused string
}

// AuthorityView is the per-pair authority Lease.
type AuthorityView struct {
	Exists     bool
	Holder     string
	Epoch      uint64
	Expired    bool // not seen renewed for leaseDuration + margin (authority.Observer)
	FailedOver bool // the holder is the backup because of a failover
}

// View is everything Decide needs.
type View struct {
	Primary, Backup MemberView // by spec
	// More are the additional backups (spec.additionalBackups), in order.
	More []MemberView
	// LastWriterPeers is the writer's last report of its backups
	// (agentapi.Status.Peers), kept while it does not answer: a lost
	// writer's successor is the most current backup it reported.
	LastWriterPeers []agentapi.PeerStatus
	// PairUID is the VolumePair's UID: the pair whose data a member must
	// hold to be trusted (invariant 8, docs/architecture.md).
	PairUID string
	// Size is spec.size in bytes: what every member must serve. A member
	// whose replica is smaller grows (online expansion, growStep).
	Size int64
	// DataInitialized is status.dataInitialized: some member has held the
	// pair's data, so a member without it is new or wiped, not a member of
	// a brand-new pair.
	DataInitialized   bool
	Mode              v1.ReplicationMode
	FailoverPolicy    v1.Policy
	FailbackPolicy    v1.Policy
	FailoverRequested bool
	FailbackRequested bool
	// ForcePromote is the member storage.tandem.dev/force-promote names
	// ("" none): promoted once the writer is lost even if it may lack
	// acknowledged writes (Outdated, Async, held) or the policy is Manual.
	ForcePromote string
	// ForcePromoteAge is how long this controller has seen that request
	// (it restarts from 0 with the controller).
	ForcePromoteAge time.Duration
	// HoldBackoff is true for a while after a failback hold was released
	// because it did not drain in time: no new hold yet.
	HoldBackoff bool
	Authority   AuthorityView
	// Clients is the NBD client restriction the members must enforce
	// (spec.clients with the nodes' addresses); nil: none.
	Clients *agentapi.Clients
}

// StepKind is the one data-affecting step a reconcile takes.
type StepKind string

// Steps.
const (
	StepNone            StepKind = "None"
	StepCreateAuthority StepKind = "CreateAuthority" // holder spec.primary, epoch 1
	StepConfigure       StepKind = "Configure"       // push role/epoch/mode/peer to the agents
	StepRecordOutdated  StepKind = "RecordOutdated"  // write Outdated for Target into status first
	StepConfirmOutdated StepKind = "ConfirmOutdated" // then tell the writer it may continue alone
	StepFailover        StepKind = "Failover"        // move authority to Target with epoch+1 (SWAP)
	StepHold            StepKind = "Hold"            // failback: hold writes on the writer and drain
	StepReleaseHold     StepKind = "ReleaseHold"     // give up a failback hold
	StepSwitch          StepKind = "Switch"          // failback: move authority to Target with epoch+1
	StepGrow            StepKind = "Grow"            // online expansion: grow Target's replica to spec.size
)

// Reasons for the FailoverBlocked condition.
const (
	BlockedNone                = "NotBlocked"
	BlockedManualPolicy        = "ManualPolicy"
	BlockedAuthorityNotExpired = "AuthorityNotExpired"
	BlockedBackupUnreachable   = "BackupUnreachable"
	BlockedBackupOutdated      = "BackupOutdated"
	BlockedBackupInconsistent  = "BackupInconsistent"
	BlockedBackupUnknown       = "BackupStateUnknown"
	BlockedBackupCatchingUp    = "BackupCatchingUp"
	BlockedBackupAsync         = "BackupAsync"
	BlockedDataLost            = "DataLost"
	BlockedBackupHeld          = "BackupHeld"
)

// Step is Decide's answer.
type Step struct {
	Kind   StepKind
	Target string // the node the step is about
	// Blocked says why a lost writer is not being replaced (BlockedNone
	// otherwise); Message explains it in words.
	Blocked string
	Message string
	// Handover is true for a Hold or Switch away from a writer whose agent
	// is stopping (a rolling update), not a failback towards spec.primary.
	Handover bool
	// Member is the member a ConfirmOutdated step is about (Target is the
	// writer told).
	Member string
	// Forced is true for a Failover that storage.tandem.dev/force-promote
	// asked for and that would otherwise be blocked; ForcedOver is the
	// reason it overrides.
	Forced     bool
	ForcedOver string
	// Pending says why a pair without an authority does not start yet
	// (PendingMemberNotFound, ...; "" when it starts or has started);
	// Message explains it and Target names the member it waits for.
	Pending string
}

// Reasons a new pair waits (Step.Pending, the Ready condition's reason
// while the phase is PENDING).
const (
	// PendingMemberNotFound: a member names a node the cluster does not
	// have.
	PendingMemberNotFound = "MemberNotFound"
	// PendingAgentNotRegistered: a member's node has no Tandem agent.
	PendingAgentNotRegistered = "AgentNotRegistered"
	// PendingPrimaryNotReady: spec.primary's agent registered but does not
	// answer, or its Node is not Ready.
	PendingPrimaryNotReady = "PrimaryNotReady"
)

// pending says why a new pair (no authority yet) may not start: a writer is
// given only to a member that answers, and a member without an agent would
// be lost the moment it became the writer (a failover that never was). A
// pair starts once every member's agent has registered and spec.primary's
// answers.
func pending(v *View) (reason, target, msg string) {
	for _, m := range v.all() {
		switch {
		case m.NodeMissing:
			return PendingMemberNotFound, m.Node, fmt.Sprintf("%s: node %q does not exist; correct the node name, or the pair starts once the node joins and its Tandem agent registers", m.Field, m.Node)
		case m.Unregistered:
			return PendingAgentNotRegistered, m.Node, fmt.Sprintf("%s: no Tandem agent has registered on node %q (the agent DaemonSet runs no pod there: check its node selector, tolerations and the pod's events); the pair starts once it registers", m.Field, m.Node)
		}
	}
	if p := &v.Primary; !p.Reachable || p.Suspect {
		return PendingPrimaryNotReady, p.Node, fmt.Sprintf("%s: the agent on %q does not answer or its Node is not Ready; the pair starts with %s as the writer once it does", p.Field, p.Node, p.Node)
	}
	return "", "", ""
}

// all returns every member: spec.primary, spec.backup, the additional
// backups.
func (v *View) all() []*MemberView {
	out := []*MemberView{&v.Primary, &v.Backup}
	for i := range v.More {
		out = append(out, &v.More[i])
	}
	return out
}

func (v *View) member(node string) *MemberView {
	for _, m := range v.all() {
		if m.Node == node {
			return m
		}
	}
	return &v.Primary
}

// others returns every member but node, in spec order (the preferred
// primary first when node is not it).
func (v *View) others(node string) []*MemberView {
	var out []*MemberView
	for _, m := range v.all() {
		if m.Node != node {
			out = append(out, m)
		}
	}
	return out
}

// other is the first of others: the peer of a pair of two.
func (v *View) other(node string) *MemberView {
	if node == v.Backup.Node {
		return &v.Primary
	}
	return &v.Backup
}

// modeOf is member m's replication mode as a backup.
func (v *View) modeOf(m *MemberView) v1.ReplicationMode {
	if m.Mode != "" {
		return m.Mode
	}
	return v.Mode
}

// anySync reports whether some member is a Sync backup: then a write is
// acknowledged only once each Sync backup holds it, and an Async backup
// may lack acknowledged writes.
func (v *View) anySync() bool {
	for _, m := range v.all() {
		if v.modeOf(m) == v1.ModeSync {
			return true
		}
	}
	return false
}

// matches reports whether member m plays role at the authority's epoch
// with the spec's mode, clients and members: a writer mirrors to every
// other member (with its mode); a backup follows the writer and knows the
// other backups.
func (v *View) matches(m *MemberView, role agentapi.Role) bool {
	s := m.Status
	if s == nil || s.Role != role || s.Epoch != v.Authority.Epoch || s.Mode != v.Mode || !s.Clients.Equal(v.Clients) {
		return false
	}
	others := v.others(m.Node)
	if role == agentapi.RolePrimary {
		if len(s.Peers) == 0 {
			// An agent that reports no members: a pair of two, its peer
			// named (a replaced member: the new peer).
			return len(others) == 1 && (s.PeerNode == "" || s.PeerNode == others[0].Node)
		}
		if len(s.Peers) != len(others) {
			return false
		}
		for _, o := range others {
			i := slices.IndexFunc(s.Peers, func(p agentapi.PeerStatus) bool { return p.Node == o.Node })
			if i < 0 || s.Peers[i].Mode != v.modeOf(o) {
				return false
			}
		}
		return true
	}
	writer := v.Authority.Holder
	if s.PeerNode != "" && s.PeerNode != writer {
		return false
	}
	if len(others) == 1 {
		return true
	}
	// A backup of several knows them all (its trackers of the others).
	want := make([]string, 0, len(others))
	for _, o := range others {
		want = append(want, o.Node)
	}
	got := slices.Clone(s.Tracked)
	slices.Sort(want)
	slices.Sort(got)
	return slices.Equal(want, got)
}

// IsHeld reports whether member m is held out of resync (and not the
// writer: a hold applies to a member returning to a writer).
func (v *View) IsHeld(m *MemberView) bool { return m.Held && m.Node != v.Authority.Holder }

// matchesHeld reports whether held member m is as a hold wants it: fenced
// (role None) at the authority's epoch, or without a replica (nothing to
// keep). False for a member not held.
func (v *View) matchesHeld(m *MemberView) bool {
	if !v.IsHeld(m) {
		return false
	}
	s := m.Status
	return s == nil || (s.Role == agentapi.RoleNone && s.Epoch == v.Authority.Epoch)
}

// HoldsData reports whether the member's replica holds the data of pair
// uid (a replica joined before UIDs were recorded holds its pair's).
func HoldsData(m *MemberView, uid string) bool {
	s := m.Status
	return s != nil && s.Joined && (s.PairUID == uid || s.PairUID == "")
}

// PairHasData reports whether the pair's data exists, or existed, on some
// member: then a member without it is new or was wiped, and only a full
// copy may bring it in. Otherwise the pair is brand new and its first
// writer starts its data (Spec.Initialize).
func (v *View) PairHasData() bool {
	if v.DataInitialized {
		return true
	}
	for _, m := range v.all() {
		if HoldsData(m, v.PairUID) {
			return true
		}
	}
	return false
}

// WriterLostData reports whether the authority's holder answers but holds
// none of the pair's data: its replica is gone (no replica on its agent),
// new or wiped, or a copy towards it never finished, and it does not serve.
// It can never serve the pair's data again without a full copy, so it is
// lost for failover purposes.
func WriterLostData(v View) bool {
	if !v.Authority.Exists || !v.PairHasData() {
		return false
	}
	w := v.member(v.Authority.Holder)
	if !w.Reachable || w.Suspect {
		return false
	}
	s := w.Status
	return s == nil || (s.Role != agentapi.RolePrimary && (!HoldsData(w, v.PairUID) || s.DataState == agentapi.Inconsistent))
}

// LinkTo is what the writer reports of its link to member m: its own
// entry in Status.Peers, or, from an agent that reports none (a pair of
// two), the status's summary.
func LinkTo(writer, m *MemberView) agentapi.PeerStatus {
	w := writer.Status
	if w == nil {
		return agentapi.PeerStatus{Node: m.Node}
	}
	for _, p := range w.Peers {
		if p.Node == m.Node {
			return p
		}
	}
	if len(w.Peers) > 0 || (w.PeerNode != "" && w.PeerNode != m.Node) {
		// Not a member the writer mirrors to (an agent from before
		// several backups mirrors to its first one only).
		return agentapi.PeerStatus{Node: m.Node}
	}
	return agentapi.PeerStatus{Node: m.Node, Mode: w.Mode, Connected: w.PeerConnected, OutOfSyncRegions: w.OutOfSyncRegions,
		OutOfSyncBytes: w.OutOfSyncBytes, Copy: w.Copy, OldestUnreplicatedSeconds: w.OldestUnreplicatedSeconds, Drained: w.Drained}
}

// InSync reports whether the writer holds member other fully in sync.
func InSync(writer, other *MemberView) bool {
	w, o := writer.Status, other.Status
	if w == nil || o == nil || w.Role != agentapi.RolePrimary {
		return false
	}
	p := LinkTo(writer, other)
	return p.Connected && p.OutOfSyncRegions == 0 && !p.Copy.Running && o.DataState == agentapi.UpToDate
}

// AllInSync reports whether the writer holds every other member in sync.
func AllInSync(writer *MemberView, others []*MemberView) bool {
	for _, o := range others {
		if !InSync(writer, o) {
			return false
		}
	}
	return true
}

// WriterFenced reports whether the authority's holder answers probes but
// reports itself not writable as the primary at the authority's epoch: it
// fenced itself, typically because it cannot renew its authority (it lost
// the API server).
func WriterFenced(v View) bool {
	if !v.Authority.Exists {
		return false
	}
	w := v.member(v.Authority.Holder)
	s := w.Status
	return w.Reachable && !w.Suspect && s != nil && s.Role == agentapi.RolePrimary && s.Epoch == v.Authority.Epoch && !s.Writable
}

// Decide is the pair's transition function: from what was observed, the
// single next step. It is pure; the reconciler carries the step out and
// calls Decide again on the next round (level-based).
func Decide(v View) Step {
	if !v.Authority.Exists {
		if reason, target, msg := pending(&v); reason != "" {
			return Step{Kind: StepNone, Blocked: BlockedNone, Pending: reason, Target: target, Message: msg}
		}
		return Step{Kind: StepCreateAuthority, Target: v.Primary.Node, Blocked: BlockedNone}
	}
	writer := v.member(v.Authority.Holder)
	others := v.others(v.Authority.Holder)

	// 1. A lost writer: promote the most current other member if it is
	// safe (docs/architecture.md, "Invariants and how they are kept").
	// A writer that still answers probes but fenced itself, and whose
	// authority has expired, is lost too: it cannot renew (it lost the API
	// server) and serves nothing until it can, while promoting a backup is
	// as safe as for an unreachable writer.
	fenced := WriterFenced(v) && v.Authority.Expired
	if WriterLostData(v) {
		// Its old incarnation may still have renewed the authority
		// before the replica was lost: wait for the authority to expire
		// like for any lost writer.
		if !v.Authority.Expired {
			return Step{Kind: StepNone, Blocked: BlockedAuthorityNotExpired,
				Message: "the writer " + writer.Node + " lost the pair's data (" + dataReason(writer) + "); " + names(others) + " is promoted once its authority expires"}
		}
		return failoverStep(&v, writer, others, false)
	}
	if writer.Suspect || fenced {
		return failoverStep(&v, writer, others, fenced)
	}

	// 2. Agents must play the roles the authority says, at its epoch.
	if writer.Reachable && !v.matches(writer, agentapi.RolePrimary) {
		return Step{Kind: StepConfigure, Target: writer.Node, Blocked: BlockedNone}
	}
	for _, o := range others {
		if o.Reachable && !v.matchesHeld(o) && !v.matches(o, agentapi.RoleBackup) {
			return Step{Kind: StepConfigure, Target: writer.Node, Blocked: BlockedNone}
		}
	}

	// 3. A Sync member lost: record it Outdated, then let the writer go on
	// without it.
	if w := writer.Status; w != nil {
		for _, o := range others {
			if v.modeOf(o) != v1.ModeSync {
				continue
			}
			link := LinkTo(writer, o)
			if link.Connected || (w.WaitingForPeerOutdated == 0 && !o.Suspect) {
				continue
			}
			if !o.RecordedOutdated {
				return Step{Kind: StepRecordOutdated, Target: o.Node, Blocked: BlockedNone}
			}
			if w.WaitingForPeerOutdated > 0 && !link.Outdated {
				return Step{Kind: StepConfirmOutdated, Target: writer.Node, Member: o.Node, Blocked: BlockedNone}
			}
		}
	}

	// 4. Online expansion: spec.size grew. Every backup that answers
	// first, then the writer.
	if st, ok := growStep(&v, writer, others); ok {
		return st
	}

	// 5. Failback (DELPAIR) or a planned switchover towards spec.primary.
	// The hold starts once what is left to ship can drain within it, not
	// when nothing is left: under steady writes in async mode something
	// almost always is. Under the hold the writer drains; then the roles
	// switch. A hold that does not drain in time is released (the writes
	// go on) and tried again a little later.
	// A writer whose agent is stopping (a rolling update) hands its role to
	// another member the same way (spec.primary if it can take it, else
	// the most current backup): its agent waits for that before it goes
	// (docs/architecture.md, "Agent restarts").
	holding := writer.Status != nil && writer.Status.Holding
	handover := writer.Status != nil && writer.Status.Stopping
	what := "failback"
	if handover {
		what = "the handover from the stopping agent on " + writer.Node
	}
	if v.Authority.Holder != v.Primary.Node || handover {
		target := &v.Primary
		if handover {
			target = handoverTarget(&v, writer, others)
		}
		wanted := handover || !v.Authority.FailedOver || v.FailbackPolicy == v1.PolicyAutomatic || v.FailbackRequested
		if wanted && target != nil && target.Reachable && !target.Suspect && FailbackReady(&v, writer, target) {
			if target.APILost && !holding {
				return Step{Kind: StepNone, Blocked: BlockedNone, Handover: handover,
					Message: what + " waits until the agent on " + target.Node + " reaches the API server again (it could not renew its authority)"}
			}
			switch {
			case holding && LinkTo(writer, target).Drained:
				return Step{Kind: StepSwitch, Target: target.Node, Blocked: BlockedNone, Handover: handover}
			case holding && writer.Status.HoldSeconds > MaxHoldSeconds:
				return Step{Kind: StepReleaseHold, Target: writer.Node, Blocked: BlockedNone, Message: HoldTimedOut, Handover: handover}
			case holding:
				return Step{Kind: StepNone, Blocked: BlockedNone, Message: "draining for " + what, Handover: handover}
			case v.HoldBackoff:
				return Step{Kind: StepNone, Blocked: BlockedNone, Handover: handover,
					Message: "the last hold did not drain in time; " + what + " is tried again shortly"}
			}
			return Step{Kind: StepHold, Target: writer.Node, Blocked: BlockedNone, Handover: handover}
		}
	}
	if holding {
		return Step{Kind: StepReleaseHold, Target: writer.Node, Blocked: BlockedNone, Handover: handover}
	}
	if handover {
		return Step{Kind: StepNone, Blocked: BlockedNone, Handover: true,
			Message: "the agent on " + writer.Node + " is stopping; its writer role moves to " + names(others) + " once one is reachable and in sync"}
	}
	return Step{Kind: StepNone, Blocked: BlockedNone}
}

// Smaller reports whether member m answers and serves less than the
// pair's size (spec.size): it has to grow. A member without a replica is
// created at spec.size; one that does not answer grows when it returns.
func (v *View) Smaller(m *MemberView) bool {
	return m.Reachable && m.Status != nil && m.Status.Size > 0 && m.Status.Size < v.Size
}

// growStep is the next step of an online expansion (spec.size grew), if
// one is due: every backup that answers grows first, one a step, in spec
// order; the writer grows once every backup that answers serves spec.size,
// so that it never exports more than a member it streams to holds (an
// agent refuses the stream of a writer larger than its replica). A backup
// that does not answer grows when it returns: its stream waits until then,
// and Decide asks it to grow as soon as its roles are in place, before the
// resync. A member whose agent refused (GrowRefused) is asked again after
// growRetry or once spec.size changes; meanwhile the writer does not grow
// past a backup that refused, and the pair serves the old size. A writer
// holding writes for a failback grows after the hold.
func growStep(v *View, writer *MemberView, others []*MemberView) (Step, bool) {
	backupsGrown := true
	for _, o := range others {
		if !v.Smaller(o) {
			continue
		}
		backupsGrown = false
		if o.GrowRefused == "" {
			return Step{Kind: StepGrow, Target: o.Node, Blocked: BlockedNone}, true
		}
	}
	if backupsGrown && v.Smaller(writer) && writer.GrowRefused == "" && !writer.Status.Holding {
		return Step{Kind: StepGrow, Target: writer.Node, Blocked: BlockedNone}, true
	}
	return Step{}, false
}

// StaleRequest names a request annotation that asks for nothing this pair
// can do, and says why: a failover while the writer serves (a failover
// replaces a lost writer), a failback while spec.primary already writes.
// Left in place, such a request would act later, unasked: a Manual
// failover policy would promote a backup the moment the writer was next
// lost. The controller clears it with a Warning event. "" when none is.
func StaleRequest(v View) (annotation, msg string) {
	if !v.Authority.Exists {
		return "", ""
	}
	writer := v.member(v.Authority.Holder)
	w := writer.Status
	serving := writer.Reachable && !writer.Suspect && !writer.Stale && w != nil && w.Role == agentapi.RolePrimary &&
		w.Epoch == v.Authority.Epoch && w.Writable && !w.Stopping
	if f := v.ForcePromote; f != "" {
		switch {
		case !slices.ContainsFunc(v.all(), func(m *MemberView) bool { return m.Node == f }):
			return v1.AnnotationForcePromote, fmt.Sprintf("force-promote request ignored and cleared: %q is not a member of the pair (%s)", f, names(v.all()))
		case f == v.Authority.Holder:
			return v1.AnnotationForcePromote, fmt.Sprintf("force-promote request ignored and cleared: %s already holds the writer's authority", f)
		case serving && !WriterLostData(v):
			return v1.AnnotationForcePromote, fmt.Sprintf("force-promote request ignored and cleared: the writer %s serves the volume, and a promotion replaces a lost writer. "+
				"For a planned switch of the writer, swap spec.primary.node with the member that should write (a switchover)", writer.Node)
		case v.ForcePromoteAge > v1.ForcePromoteTTL:
			return v1.AnnotationForcePromote, fmt.Sprintf("force-promote request of %s expired and cleared: it could not act for %v (FailoverBlocked said why); "+
				"a forced promotion is decided on what is known now, so ask again (kubectl tandem promote --force) once it can act", f, v1.ForcePromoteTTL)
		}
	}
	switch {
	case v.FailoverRequested && serving && !WriterLostData(v):
		return v1.AnnotationFailoverRequested, fmt.Sprintf("failover request ignored and cleared: the writer %s serves the volume, and a failover replaces a lost writer. "+
			"For a planned switch of the writer, swap spec.primary.node with the member that should write (a switchover)", writer.Node)
	case v.FailbackRequested && serving && v.Authority.Holder == v.Primary.Node:
		return v1.AnnotationFailbackRequested, fmt.Sprintf("failback request ignored and cleared: %s (spec.primary) already writes; nothing to fail back", writer.Node)
	}
	return "", ""
}

// names lists the members' nodes for messages ("b", "b or c").
func names(ms []*MemberView) string {
	out := ""
	for i, m := range ms {
		switch {
		case i == 0:
		case i == len(ms)-1:
			out += " or "
		default:
			out += ", "
		}
		out += m.Node
	}
	return out
}

// handoverTarget is the member a stopping writer hands its role to:
// spec.primary if it could take it now, else the first other member in
// sync.
func handoverTarget(v *View, writer *MemberView, others []*MemberView) *MemberView {
	var first *MemberView
	for _, o := range others {
		if o.Reachable && !o.Suspect && FailbackReady(v, writer, o) {
			if o.Node == v.Primary.Node {
				return o
			}
			if first == nil {
				first = o
			}
		}
	}
	if first == nil && len(others) > 0 {
		return others[0]
	}
	return first
}

// failoverStep promotes the most current member that may take over from
// the lost writer: among those failoverBlocked lets through, a Sync backup
// before an Async one, then the one the writer last reported the least
// behind, then spec order. If none may, it says why the first in spec
// order may not. A fenced writer still streaming to the chosen member is
// given time to ship what it acknowledged first.
func failoverStep(v *View, writer *MemberView, others []*MemberView, fenced bool) Step {
	if i := slices.IndexFunc(others, func(o *MemberView) bool { return o.Node == v.ForcePromote }); i >= 0 {
		// The member the operator named, and no other.
		t := others[i]
		if blocked, msg := failoverBlocked(v, writer, t); blocked != BlockedNone {
			return Step{Kind: StepNone, Blocked: blocked, Message: "force-promote " + t.Node + ": " + msg}
		}
		over := overridden(v, t)
		return Step{Kind: StepFailover, Target: t.Node, Blocked: BlockedNone, Forced: over != "", ForcedOver: over}
	}
	var best *MemberView
	var bestRank [2]uint64
	for _, o := range others {
		if blocked, _ := failoverBlocked(v, writer, o); blocked != BlockedNone {
			continue
		}
		rank := [2]uint64{1, ^uint64(0)}
		if v.modeOf(o) == v1.ModeSync {
			rank[0] = 0
		}
		for _, p := range v.LastWriterPeers {
			if p.Node == o.Node {
				rank[1] = p.OutOfSyncRegions
			}
		}
		if best == nil || rank[0] < bestRank[0] || (rank[0] == bestRank[0] && rank[1] < bestRank[1]) {
			best, bestRank = o, rank
		}
	}
	if best == nil {
		blocked, msg := failoverBlocked(v, writer, others[0])
		for _, o := range others[1:] {
			_, m := failoverBlocked(v, writer, o)
			msg += "; " + m
		}
		return Step{Kind: StepNone, Blocked: blocked, Message: msg}
	}
	if fenced && writer.Status.PeerConnected && LinkTo(writer, best).Connected && !InSync(writer, best) &&
		best.Status != nil && best.Status.DataState != agentapi.Inconsistent {
		// Still streaming to it: let it receive what the fenced writer
		// acknowledged before (async mode) first.
		return Step{Kind: StepNone, Blocked: BlockedBackupCatchingUp,
			Message: "the writer " + writer.Node + " fenced itself and its authority expired; " + best.Node + " is promoted once it holds every write " + writer.Node + " still ships to it"}
	}
	return Step{Kind: StepFailover, Target: best.Node, Blocked: BlockedNone}
}

// Failback hold budget: the hold is meant to last at most a second (docs/benchmarks.md).
const (
	// FailbackDrainBytes is the most a writer may still have to ship to
	// its peer for a failback hold to start: it drains in a small fraction
	// of the hold on any link a pair replicates over.
	FailbackDrainBytes = 8 << 20
	// MaxHoldSeconds: a hold that has not drained within this is released
	// and the failback tried again after HoldBackoff.
	MaxHoldSeconds = 1.5
	// HoldTimedOut is the message of a ReleaseHold step for a hold that did
	// not drain in time.
	HoldTimedOut = "the failback hold did not drain in time; writes go on and failback is tried again shortly"
)

// FailbackReady reports whether the writer may start a failback hold
// towards other now: the link is up, no copy runs, other holds the pair's
// data UpToDate and is not stopping, and what the writer has still to ship
// (live writes in flight, in async mode) is small enough to drain under the
// hold.
func FailbackReady(v *View, writer, other *MemberView) bool {
	w, o := writer.Status, other.Status
	if w == nil || o == nil || w.Role != agentapi.RolePrimary {
		return false
	}
	p := LinkTo(writer, other)
	return p.Connected && !p.Copy.Running && o.DataState == agentapi.UpToDate && !o.Stopping && HoldsData(other, v.PairUID) &&
		p.OutOfSyncBytes <= FailbackDrainBytes
}

// dataReason is the member's account of why its data is not usable.
func dataReason(m *MemberView) string {
	if m.Status == nil {
		return "no replica on its agent"
	}
	if m.Status.DataStateReason != "" {
		return m.Status.DataStateReason
	}
	return "its data is " + string(m.Status.DataState)
}

func failoverBlocked(v *View, writer, other *MemberView) (string, string) {
	switch {
	case WriterLostData(*v) && other.Reachable && !other.Suspect && !HoldsData(other, v.PairUID):
		return BlockedDataLost, "neither member holds the pair's data: " + writer.Node + ": " + dataReason(writer) + "; " + other.Node + ": " + dataReason(other) +
			". The data is lost; delete and recreate the VolumePair to start over from an empty volume"
	case !v.Authority.Expired:
		return BlockedAuthorityNotExpired, "the writer " + writer.Node + " is unreachable but its authority Lease is still being renewed or has not expired; it may still be serving"
	case (!other.Reachable || other.Suspect) && writer.Suspect:
		return BlockedBackupUnreachable, "the writer " + writer.Node + " and " + other.Node + " are unreachable"
	case !other.Reachable || other.Suspect:
		return BlockedBackupUnreachable, "the writer " + writer.Node + " fenced itself and its authority expired, and " + other.Node + " is unreachable"
	case other.Status == nil:
		return BlockedBackupUnknown, "the agent on " + other.Node + " has not reported the replica"
	case other.Status.DataState == agentapi.Inconsistent || !HoldsData(other, v.PairUID):
		return BlockedBackupInconsistent, "the replica on " + other.Node + " is Inconsistent (" + dataReason(other) + "); promoting it would serve corrupt or missing data"
	}
	if v.ForcePromote == other.Node {
		// What follows is what an operator may override (overridden).
		return BlockedNone, ""
	}
	return overridable(v, other)
}

// overridden is the reason force-promoting other overrides ("" when it
// would have been promoted anyway).
func overridden(v *View, other *MemberView) string {
	r, _ := overridable(v, other)
	if r == BlockedNone {
		return ""
	}
	return r
}

// overridable are the reasons a member may not be promoted that an operator
// may override with storage.tandem.dev/force-promote: it may lack
// acknowledged writes, it is held, or the policy asks for a request.
func overridable(v *View, other *MemberView) (string, string) {
	switch {
	case v.IsHeld(other):
		return BlockedBackupHeld, "the member " + other.Node + " is held out of resync (" + v1.AnnotationHoldResync + "): it may lack acknowledged writes; " +
			"remove it from the annotation to resync it, or force-promote it (kubectl tandem promote --force) to discard them"
	case (other.RecordedOutdated && !other.OutdatedNotSent) || other.Status.DataState == agentapi.Outdated:
		// A record whose confirmation never left the controller does not
		// block: the writer holds sync writes until it is told (invariant
		// 2), so it acknowledged nothing the other member lacks.
		return BlockedBackupOutdated, "the replica on " + other.Node + " is Outdated: the writer may have continued alone after it was lost; promoting it would lose acknowledged writes. " +
			"If the writer is gone for good, kubectl tandem promote --force " + other.Node + " promotes it and discards them"
	case v.modeOf(other) == v1.ModeAsync && v.anySync() && !v.FailoverRequested:
		return BlockedBackupAsync, "the replica on " + other.Node + " is an Async backup of a pair with Sync members: it may lack acknowledged writes; " +
			"set the annotation " + v1.AnnotationFailoverRequested + " (kubectl tandem failover) to promote it anyway"
	case v.FailoverPolicy == v1.PolicyManual && !v.FailoverRequested:
		return BlockedManualPolicy, "failover policy is Manual; set the annotation " + v1.AnnotationFailoverRequested + " (kubectl tandem failover) to promote " + other.Node
	}
	return BlockedNone, ""
}

// DerivePhase computes the pair's phase from the observations; last is the
// phase recorded before, kept when the writer cannot be observed.
func DerivePhase(v View, last v1.Phase) v1.Phase {
	if !v.Authority.Exists {
		return v1.PhasePair
	}
	writer := v.member(v.Authority.Holder)
	w := writer.Status
	if w == nil || w.Role != agentapi.RolePrimary {
		if last == "" || last == v1.PhasePending {
			return v1.PhasePair
		}
		return last
	}
	copying := false
	for _, o := range v.others(v.Authority.Holder) {
		p := LinkTo(writer, o)
		if p.Connected && (p.Copy.Running || (o.Status != nil && o.Status.DataState == agentapi.Inconsistent)) {
			copying = true
		}
	}
	if v.Authority.Holder == v.Primary.Node {
		if copying {
			return v1.PhaseCopy
		}
		return v1.PhasePair
	}
	// Writes in flight to the peer (async mode) are not a copy: the phase
	// is NORMAL while the link streams, whatever the bitmap holds for the
	// moment. SWAP while the preferred primary is away.
	switch {
	case !LinkTo(writer, &v.Primary).Connected:
		return v1.PhaseSwap
	case copying:
		return v1.PhaseCopy
	}
	return v1.PhaseNormal
}
