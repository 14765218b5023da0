package v1alpha1

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ReplicationMode says when a client write is acknowledged.
// +kubebuilder:validation:Enum=Sync;Async
type ReplicationMode string

const (
	// ModeSync acknowledges a write after every Sync member holds it.
	ModeSync ReplicationMode = "Sync"
	// ModeAsync acknowledges a write after the local copy holds it; the backup
	// receives it later, in order.
	ModeAsync ReplicationMode = "Async"
)

// Policy says whether the controller acts by itself or waits for the user.
// +kubebuilder:validation:Enum=Automatic;Manual
type Policy string

const (
	// PolicyAutomatic lets the controller act as soon as the conditions hold.
	PolicyAutomatic Policy = "Automatic"
	// PolicyManual waits for the user's request annotation.
	PolicyManual Policy = "Manual"
)

// Phase is the pair's phase as the controller sees it (docs/architecture.md, "Phases").
// +kubebuilder:validation:Enum=PENDING;PAIR;SWAP;COPY;NORMAL
type Phase string

const (
	// PhasePending: the pair has not started: a member's node does not
	// exist or has no Tandem agent, or spec.primary's agent does not
	// answer. The Ready condition says which; nothing was created yet.
	PhasePending Phase = "PENDING"
	// PhasePair: the preferred primary serves and mirrors to the backup.
	PhasePair Phase = "PAIR"
	// PhaseSwap: the preferred primary was lost; the backup serves and records
	// every region it writes. Nothing is copied.
	PhaseSwap Phase = "SWAP"
	// PhaseCopy: a copy runs from the acting primary to a returning member.
	PhaseCopy Phase = "COPY"
	// PhaseNormal: both members are identical, the backup is still the acting
	// primary; failback is next.
	PhaseNormal Phase = "NORMAL"
)

// MemberRole is the role a member currently plays.
// +kubebuilder:validation:Enum=Primary;Backup;None
type MemberRole string

const (
	// RolePrimary serves client writes and mirrors them.
	RolePrimary MemberRole = "Primary"
	// RoleBackup applies the primary's writes in order.
	RoleBackup MemberRole = "Backup"
	// RoleNone holds data but neither serves nor receives writes.
	RoleNone MemberRole = "None"
)

// DataState says how far a member's data can be trusted.
// +kubebuilder:validation:Enum=UpToDate;Outdated;Inconsistent;Unknown
type DataState string

const (
	// DataUpToDate: the member holds every acknowledged write.
	DataUpToDate DataState = "UpToDate"
	// DataOutdated: a crash-consistent image that misses recent writes.
	DataOutdated DataState = "Outdated"
	// DataInconsistent: a copy towards this member is incomplete.
	DataInconsistent DataState = "Inconsistent"
	// DataUnknown: the member has not reported.
	DataUnknown DataState = "Unknown"
)

// OutdatedConfirmation says whether the writer may have been told that a
// member recorded Outdated is Outdated (invariant 2, docs/architecture.md). A sync-mode writer that
// lost its peer acknowledges writes the peer lacks only after it was told.
// +kubebuilder:validation:Enum=NotSent;Sent
type OutdatedConfirmation string

const (
	// OutdatedNotSent: the Outdated record is written but no confirmation
	// has left the controller, so the writer has not continued alone and the
	// member still holds every acknowledged write; it may be promoted.
	OutdatedNotSent OutdatedConfirmation = "NotSent"
	// OutdatedSent: a confirmation may have reached the writer, which may
	// have acknowledged writes the member lacks; it is never promoted
	// automatically.
	OutdatedSent OutdatedConfirmation = "Sent"
)

// Condition types reported in status.conditions.
const (
	// ConditionReady is True when the active primary serves the volume.
	ConditionReady = "Ready"
	// ConditionSynchronized is True when both members hold identical data.
	ConditionSynchronized = "Synchronized"
	// ConditionDegraded is True when only one member holds current data.
	ConditionDegraded = "Degraded"
	// ConditionFailoverBlocked is True when the primary is lost but the
	// controller does not promote the backup, with the reason why.
	ConditionFailoverBlocked = "FailoverBlocked"
	// ConditionExpanding is True while spec.size is larger than what a
	// member serves (one that does not answer: as it last reported): the
	// controller grows the backups that answer first, then the writer, and
	// a member that does not answer when it returns (reason Expanding), or
	// an agent refused to grow (reason ExpansionRefused, the message names
	// the node and its answer; the pair keeps serving at the old size).
	// False (NotExpanding) once every member serves spec.size.
	ConditionExpanding = "Expanding"
)

// Annotations a user sets to ask for an action the policy leaves to them.
const (
	// AnnotationFailoverRequested asks for a failover when spec.failover.policy is Manual.
	AnnotationFailoverRequested = "storage.tandem.dev/failover-requested"
	// AnnotationFailbackRequested asks for a failback when spec.failback.policy is Manual.
	AnnotationFailbackRequested = "storage.tandem.dev/failback-requested"
	// AnnotationForcePromote names a member to promote although it may
	// lack acknowledged writes (it is Outdated, or an Async backup of a
	// pair with Sync members), once the writer is lost and its authority
	// expired: disaster recovery when the writer's node is gone for good.
	// The writes the lost writer acknowledged that the member lacks are
	// discarded for good: when the old writer returns it is resynced from
	// the promoted member. Never a member whose data is Inconsistent.
	// kubectl tandem promote --force sets it; the controller clears it.
	AnnotationForcePromote = "storage.tandem.dev/force-promote"
	// AnnotationForcePromoteBy says who asked for the force-promote (the
	// plugin sets the user its credentials authenticate as); recorded in
	// status.lastForcePromotion and the event.
	AnnotationForcePromoteBy = "storage.tandem.dev/force-promote-by"
	// AnnotationHoldResync lists members (comma-separated nodes) the
	// controller keeps out of resync: a member that returns stays fenced
	// (role None) with its data as it came back, so an operator can look
	// at it first; removing the node from the list resyncs it (which
	// overwrites what it wrote since it left). A held member is never
	// promoted automatically.
	AnnotationHoldResync = "storage.tandem.dev/hold-resync"
)

// Region size bounds and default.
const (
	MinRegionSize     int64 = 4 << 10
	MaxRegionSize     int64 = 64 << 20
	DefaultRegionSize int64 = 64 << 10
)

// MaxRegions is the most regions a volume has (spec.size / spec.regionSize):
// the data path numbers regions with 32 bits (dataplane/bitmap.MaxRegions:
// roaring bitmaps of uint32, the journal's extent runs, the agents' checksum
// API). The largest volume is MaxRegions regions: 16Ti - 4Ki with 4Ki
// regions, 256Ti - 64Ki with the default 64Ki, 256Pi - 64Mi with 64Mi. The
// CEL rules on VolumePairSpec spell this number out.
//
// The size rules compare quantities (compareTo) instead of converting them
// with asInteger(): the quantity parser keeps some whole numbers of bytes as
// decimals (100Ti, 1.5Ti, 100000Gi, 1Pi: three or more digits before a Ti,
// any Pi), for which isInteger() is false and asInteger() fails, so those
// valid sizes were refused. The multiple check divides approximately, then
// compares the nearest whole number of regions exactly; it runs only below
// the region limit, where that product is an int64.
const MaxRegions int64 = 1<<32 - 1

// Member names the node that holds one copy of the volume.
type Member struct {
	// node is the name of the Kubernetes node whose agent holds this copy.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	Node string `json:"node"`
}

// BackupMember names the node of one more backup, and when a write is
// acknowledged with respect to it.
type BackupMember struct {
	// node is the name of the Kubernetes node whose agent holds this copy.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	Node string `json:"node"`
	// mode is this backup's replication mode: Sync (a write is
	// acknowledged once it holds it too) or Async (it receives writes in
	// order, never holding them up beyond its queue). Default: spec.mode.
	// +optional
	Mode ReplicationMode `json:"mode,omitempty"`
}

// RemovedMember is a node replaced out of a pair whose replica is still to
// be deleted.
type RemovedMember struct {
	// node is the replaced member's node.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node"`
	// message says what the deletion waits for.
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	Message string `json:"message,omitempty"`
}

// ForcePromotion records a promotion forced with the
// storage.tandem.dev/force-promote annotation.
type ForcePromotion struct {
	// node is the member promoted.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node"`
	// from is the writer it replaced.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	From string `json:"from,omitempty"`
	// epoch is the authority epoch it was promoted at.
	// +optional
	Epoch int64 `json:"epoch,omitempty"`
	// time is when.
	// +required
	Time metav1.Time `json:"time"`
	// requestedBy is storage.tandem.dev/force-promote-by as it was set.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	RequestedBy string `json:"requestedBy,omitempty"`
	// blockedBy is why it would not have been promoted without force
	// (BackupOutdated, BackupAsync, BackupHeld, ManualPolicy).
	// +optional
	// +kubebuilder:validation:MaxLength=64
	BlockedBy string `json:"blockedBy,omitempty"`
}

// ForcePromoteSeen is a pending force-promote request as the controller
// first saw it.
type ForcePromoteSeen struct {
	// node is the member the request names.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node"`
	// since is when the controller first saw the request for that node.
	// +required
	Since metav1.Time `json:"since"`
}

// FailoverSpec tunes loss detection and automatic promotion.
// +kubebuilder:validation:XValidation:rule="!has(self.leaseDurationSeconds) || !has(self.probePeriodSeconds) || self.leaseDurationSeconds > self.probePeriodSeconds",message="spec.failover.leaseDurationSeconds must be greater than spec.failover.probePeriodSeconds"
type FailoverSpec struct {
	// policy says whether a lost primary is replaced by the backup automatically
	// or only when the user sets the storage.tandem.dev/failover-requested annotation.
	// +optional
	// +kubebuilder:default=Automatic
	Policy Policy `json:"policy,omitempty"`

	// probePeriodSeconds is how often the controller probes each member's agent.
	// +optional
	// +kubebuilder:default=2
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=60
	ProbePeriodSeconds int32 `json:"probePeriodSeconds,omitempty"`

	// failureThreshold is how many consecutive failed probes make a member suspect.
	// +optional
	// +kubebuilder:default=3
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=30
	FailureThreshold int32 `json:"failureThreshold,omitempty"`

	// leaseDurationSeconds is how long the writer's authority lasts without
	// renewal. A writer that cannot renew stops accepting writes (self-fencing);
	// the backup is promoted only after the authority has expired.
	// +optional
	// +kubebuilder:default=6
	// +kubebuilder:validation:Minimum=2
	// +kubebuilder:validation:Maximum=300
	LeaseDurationSeconds int32 `json:"leaseDurationSeconds,omitempty"`
}

// FailbackSpec says when the original primary gets its role back after a resync.
type FailbackSpec struct {
	// policy Automatic fails back as soon as the pair is NORMAL; Manual waits
	// for the storage.tandem.dev/failback-requested annotation.
	// +optional
	// +kubebuilder:default=Manual
	Policy Policy `json:"policy,omitempty"`
}

// ResyncSpec tunes the copy towards a returning member.
type ResyncSpec struct {
	// mergePrimaryBitmap ORs the returning member's own diff (writes it
	// acknowledged that never reached the peer) into the copy, so both sides end
	// identical. false copies only the acting primary's diff.
	// +optional
	// +kubebuilder:default=true
	MergePrimaryBitmap *bool `json:"mergePrimaryBitmap,omitempty"`

	// maxBytesPerSecond caps the copy rate; 0 means unlimited.
	// +optional
	// +kubebuilder:default=0
	// +kubebuilder:validation:Minimum=0
	MaxBytesPerSecond int64 `json:"maxBytesPerSecond,omitempty"`
}

// VolumePairSpec declares the volume, its members and how they replicate.
// +kubebuilder:validation:XValidation:rule="self.primary.node != self.backup.node",message="spec.backup.node must differ from spec.primary.node"
// +kubebuilder:validation:XValidation:rule="!has(self.additionalBackups) || self.additionalBackups.all(b, b.node != self.primary.node && b.node != self.backup.node && self.additionalBackups.exists_one(c, c.node == b.node))",message="spec.additionalBackups: every member's node must differ from the others' (spec.primary, spec.backup and each additional backup)"
// +kubebuilder:validation:XValidation:rule="!has(self.regionSize) || !isQuantity(string(self.size)) || !isQuantity(string(self.regionSize)) || quantity(string(self.regionSize)).compareTo(quantity('4Ki')) < 0 || quantity(string(self.regionSize)).compareTo(quantity('64Mi')) > 0 || !(int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5) in [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864]) || quantity(string(self.size)).compareTo(quantity('0').add(4294967295 * int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5))) <= 0",messageExpression="'spec.size must be at most ' + {4096: '17592186040320 bytes (16Ti - 4Ki, 4294967295 regions of 4Ki)', 8192: '35184372080640 bytes (32Ti - 8Ki, 4294967295 regions of 8Ki)', 16384: '70368744161280 bytes (64Ti - 16Ki, 4294967295 regions of 16Ki)', 32768: '140737488322560 bytes (128Ti - 32Ki, 4294967295 regions of 32Ki)', 65536: '281474976645120 bytes (256Ti - 64Ki, 4294967295 regions of 64Ki)', 131072: '562949953290240 bytes (512Ti - 128Ki, 4294967295 regions of 128Ki)', 262144: '1125899906580480 bytes (1Pi - 256Ki, 4294967295 regions of 256Ki)', 524288: '2251799813160960 bytes (2Pi - 512Ki, 4294967295 regions of 512Ki)', 1048576: '4503599626321920 bytes (4Pi - 1Mi, 4294967295 regions of 1Mi)', 2097152: '9007199252643840 bytes (8Pi - 2Mi, 4294967295 regions of 2Mi)', 4194304: '18014398505287680 bytes (16Pi - 4Mi, 4294967295 regions of 4Mi)', 8388608: '36028797010575360 bytes (32Pi - 8Mi, 4294967295 regions of 8Mi)', 16777216: '72057594021150720 bytes (64Pi - 16Mi, 4294967295 regions of 16Mi)', 33554432: '144115188042301440 bytes (128Pi - 32Mi, 4294967295 regions of 32Mi)', 67108864: '288230376084602880 bytes (256Pi - 64Mi, 4294967295 regions of 64Mi)'}[int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5)] + ': the dirty bitmaps number regions with 32 bits; a larger spec.regionSize allows a larger volume'",message="spec.size must be at most 4294967295 regions of spec.regionSize (16Ti - 4Ki with 4Ki regions, 256Ti - 64Ki with the default 64Ki, 256Pi - 64Mi with 64Mi): the dirty bitmaps number regions with 32 bits; a larger spec.regionSize allows a larger volume",fieldPath=".size",reason="FieldValueInvalid"
// +kubebuilder:validation:XValidation:rule="!has(self.regionSize) || !isQuantity(string(self.size)) || !isQuantity(string(self.regionSize)) || quantity(string(self.regionSize)).compareTo(quantity('4Ki')) < 0 || quantity(string(self.regionSize)).compareTo(quantity('64Mi')) > 0 || !(int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5) in [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864]) || !quantity(string(self.size)).isGreaterThan(quantity('0')) || quantity(string(self.size)).compareTo(quantity('0').add(4294967295 * int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5))) > 0 || quantity(string(self.size)).sub(int(quantity(string(self.size)).asApproximateFloat() / double(int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5)) + 0.5) * int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5)).compareTo(quantity('0')) == 0",messageExpression="'spec.size must be a multiple of spec.regionSize (' + {4096: '4Ki', 8192: '8Ki', 16384: '16Ki', 32768: '32Ki', 65536: '64Ki', 131072: '128Ki', 262144: '256Ki', 524288: '512Ki', 1048576: '1Mi', 2097152: '2Mi', 4194304: '4Mi', 8388608: '8Mi', 16777216: '16Mi', 33554432: '32Mi', 67108864: '64Mi'}[int(quantity(string(self.regionSize)).asApproximateFloat() + 0.5)] + '): ' + string(self.size) + ' is not a whole number of regions'",message="spec.size must be a multiple of spec.regionSize: a volume is a whole number of regions",fieldPath=".size",reason="FieldValueInvalid"
// +kubebuilder:validation:XValidation:rule="([oldSelf.primary.node, oldSelf.backup.node] + (has(oldSelf.additionalBackups) ? oldSelf.additionalBackups.map(b, b.node) : [])).filter(n, !(n in ([self.primary.node, self.backup.node] + (has(self.additionalBackups) ? self.additionalBackups.map(b, b.node) : [])))).size() <= 1",message="spec.primary, spec.backup and spec.additionalBackups: replace or remove one member at a time (swapping members, a planned switchover, and adding backups are fine)"
type VolumePairSpec struct {
	// size is the volume's size in bytes: a whole number of regions
	// (spec.regionSize), at most 4294967295 of them (256Ti - 64Ki with the
	// default 64Ki regions, 16Ti - 4Ki with 4Ki, 256Pi - 64Mi with 64Mi).
	// It may grow on a live pair, never shrink: the controller grows every
	// backup first, then the writer (online expansion; status.size is what
	// the writer serves, the Expanding condition says how far it got). A
	// member that does not answer grows when it returns, before its resync.
	// +required
	// +kubebuilder:validation:XValidation:rule="!isQuantity(string(self)) || quantity(string(self)).isGreaterThan(quantity('0'))",message="spec.size must be greater than 0"
	// +kubebuilder:validation:XValidation:rule="!isQuantity(string(self)) || !isQuantity(string(oldSelf)) || quantity(string(self)).compareTo(quantity(string(oldSelf))) >= 0",messageExpression="'spec.size cannot shrink (from ' + string(oldSelf) + ' to ' + string(self) + '): a volume only grows'",message="spec.size cannot shrink: a volume only grows"
	Size resource.Quantity `json:"size"`

	// regionSize is the granularity of the dirty bitmaps: one bit per region.
	// A power of two from 4Ki to 64Mi. Immutable.
	// +optional
	// +kubebuilder:default="64Ki"
	// +kubebuilder:validation:XValidation:rule="isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('4Ki')) >= 0 && quantity(string(self)).compareTo(quantity('64Mi')) <= 0 && int(quantity(string(self)).asApproximateFloat() + 0.5) in [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864] && quantity(string(self)).sub(int(quantity(string(self)).asApproximateFloat() + 0.5)).compareTo(quantity('0')) == 0",message="spec.regionSize must be a power of two from 4Ki to 64Mi: the granularity of the dirty bitmaps (one bit per region), which the agents accept in that range only"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity(string(oldSelf))) == 0",message="spec.regionSize is immutable"
	RegionSize *resource.Quantity `json:"regionSize,omitempty"`

	// mode Sync acknowledges a write after every Sync member holds it;
	// Async after the local copy. It is the mode of spec.backup, and of
	// each additional backup that names none. May change on a live pair.
	// +required
	Mode ReplicationMode `json:"mode"`

	// primary is the preferred primary: it serves writes whenever it is healthy.
	// +required
	Primary Member `json:"primary"`

	// backup takes over when the primary is lost. Swapping primary and backup
	// asks for a planned switchover.
	// +required
	Backup Member `json:"backup"`

	// additionalBackups are further copies of the volume, each on its own
	// node (three copies: one additional backup). The writer mirrors every
	// write to each backup and tracks what each lacks on its own; when the
	// writer is lost the most current eligible backup takes over
	// (spec.backup first among equals) and the others resync from it by
	// diff. Adding one gives it a full copy; removing one deletes its
	// replica once the others are in sync.
	// +optional
	// +listType=map
	// +listMapKey=node
	// +kubebuilder:validation:MaxItems=2
	AdditionalBackups []BackupMember `json:"additionalBackups,omitempty"`

	// failover tunes loss detection and promotion of the backup.
	// +optional
	// +kubebuilder:default={}
	Failover FailoverSpec `json:"failover,omitempty"`

	// failback says when the original primary gets its role back.
	// +optional
	// +kubebuilder:default={}
	Failback FailbackSpec `json:"failback,omitempty"`

	// resync tunes the copy towards a returning member.
	// +optional
	// +kubebuilder:default={}
	Resync ResyncSpec `json:"resync,omitempty"`

	// clients, when set, restricts the writer's NBD export to the nodes it
	// names: a client connecting from any other address is refused, and the
	// requests of one already connected fail with EPERM once its node is
	// removed. The CSI driver sets it to the node a Pod uses the volume
	// from (ControllerPublishVolume), which is what keeps a Pod left on a
	// lost node from writing after its replacement started elsewhere.
	// Absent: any client the agents' --nbd-allowed-clients admit.
	// +optional
	Clients *ClientsSpec `json:"clients,omitempty"`
}

// ClientsSpec names the nodes whose NBD clients the writer serves.
type ClientsSpec struct {
	// nodes are Kubernetes node names; a node's addresses are those in its
	// Node object's status. Empty: no client at all.
	// +required
	// +listType=set
	// +kubebuilder:validation:MaxItems=4
	// +kubebuilder:validation:items:MaxLength=253
	Nodes []string `json:"nodes"`
}

// CopyProgress reports a running copy.
type CopyProgress struct {
	// target is the node receiving the copy.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	Target string `json:"target,omitempty"`
	// totalBytes is what the copy must transfer: the union of both diffs.
	// +optional
	TotalBytes int64 `json:"totalBytes,omitempty"`
	// doneBytes is what has been transferred so far.
	// +optional
	DoneBytes int64 `json:"doneBytes,omitempty"`
	// bytesPerSecond is the recent transfer rate.
	// +optional
	BytesPerSecond int64 `json:"bytesPerSecond,omitempty"`
	// etaSeconds is the estimated time left.
	// +optional
	ETASeconds int64 `json:"etaSeconds,omitempty"`
	// startTime is when the copy began.
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`
	// fullCopy is true when the whole volume is copied: the target is new or
	// was wiped, holds another VolumePair's data, or lost its bitmaps.
	// +optional
	FullCopy bool `json:"fullCopy,omitempty"`
	// reason says why a full copy is needed.
	// +optional
	// +kubebuilder:validation:MaxLength=512
	Reason string `json:"reason,omitempty"`
}

// MemberStatus is what the controller last learned about one member.
type MemberStatus struct {
	// node is the member's node.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node"`
	// role is the role the member currently plays.
	// +optional
	Role MemberRole `json:"role,omitempty"`
	// dataState says how far the member's data can be trusted.
	// +optional
	DataState DataState `json:"dataState,omitempty"`
	// connected is true when the member's agent answers and its replication link is up.
	// +optional
	Connected bool `json:"connected,omitempty"`
	// lastSeen is when the member's agent last answered a probe.
	// +optional
	LastSeen *metav1.Time `json:"lastSeen,omitempty"`
	// outOfSyncBytes is, for a backup, what it lacks of the writer's data
	// as the writer reports it; for the writer, its own dirty bitmaps in
	// bytes (what some backup lacks).
	// +optional
	OutOfSyncBytes int64 `json:"outOfSyncBytes,omitempty"`
	// mode is the member's replication mode (backups only).
	// +optional
	Mode ReplicationMode `json:"mode,omitempty"`
	// copy reports a copy running towards this member.
	// +optional
	Copy *CopyProgress `json:"copy,omitempty"`
	// message explains the member's state in words.
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	Message string `json:"message,omitempty"`
	// outdatedConfirmation, for a member whose dataState the controller
	// recorded as Outdated, says whether the writer may have been told so:
	// NotSent while no confirmation has left the controller (the member still
	// holds every acknowledged write), Sent once one may have reached the
	// writer. An Outdated record without it counts as Sent.
	// +optional
	OutdatedConfirmation OutdatedConfirmation `json:"outdatedConfirmation,omitempty"`
}

// VolumePairStatus is the observed state of a VolumePair.
type VolumePairStatus struct {
	// phase is PENDING, PAIR, SWAP, COPY or NORMAL (docs/architecture.md, "Phases").
	// +optional
	Phase Phase `json:"phase,omitempty"`
	// activePrimary names the node that serves writes now.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	ActivePrimary string `json:"activePrimary,omitempty"`
	// epoch is the authority epoch; it grows with every change of writer.
	// +optional
	Epoch int64 `json:"epoch,omitempty"`
	// size is the volume's size as the writer serves it (its NBD export),
	// as it last reported: spec.size once an expansion completed, the
	// size before it while the backups grow (the writer grows last, so
	// every member that answered then serves at least this much). Absent
	// until the writer first reports.
	// +optional
	Size *resource.Quantity `json:"size,omitempty"`
	// endpoint is the nbd:// URI of the active primary's export. Empty while
	// no member accepts writes; kept while the active primary does not answer
	// the controller but still holds the authority at this epoch (it may
	// still serve), and moves when the authority does.
	// +optional
	// +kubebuilder:validation:MaxLength=512
	Endpoint string `json:"endpoint,omitempty"`
	// outOfSyncBytes is what a copy would transfer now: the union of both
	// diffs. Always written, so kubectl shows 0 for a pair in sync.
	// +optional
	OutOfSyncBytes int64 `json:"outOfSyncBytes"`
	// unmergedRegions counts the regions in which the members hold
	// different data although the pair is otherwise in sync: with
	// spec.resync.mergePrimaryBitmap false a resync does not copy what the
	// returning member wrote alone (writes it acknowledged that never
	// reached the other member), so those regions keep its version there.
	// They shrink as the regions are written again or repaired
	// (kubectl tandem verify --repair).
	// +optional
	UnmergedRegions int64 `json:"unmergedRegions,omitempty"`
	// copy reports a running copy.
	// +optional
	Copy *CopyProgress `json:"copy,omitempty"`
	// members reports each member.
	// +optional
	// +listType=map
	// +listMapKey=node
	// +kubebuilder:validation:MaxItems=4
	Members []MemberStatus `json:"members,omitempty"`
	// membersInSync is how many members hold the writer's data, out of how
	// many there are ("3/3"), for kubectl get.
	// +optional
	// +kubebuilder:validation:MaxLength=8
	MembersInSync string `json:"membersInSync,omitempty"`
	// removedMembers are nodes replaced out of the pair (a member's node
	// changed in the spec) whose replicas are still to be deleted: that
	// happens once the pair is in sync with its new member, so the old
	// copy is kept until redundancy is back; a node that does not answer
	// keeps its replica until it does (message says where).
	// +optional
	// +listType=map
	// +listMapKey=node
	// +kubebuilder:validation:MaxItems=16
	RemovedMembers []RemovedMember `json:"removedMembers,omitempty"`
	// lastFailoverTime is when the backup was last promoted.
	// +optional
	LastFailoverTime *metav1.Time `json:"lastFailoverTime,omitempty"`
	// lastFailbackTime is when the original primary last got its role back.
	// +optional
	LastFailbackTime *metav1.Time `json:"lastFailbackTime,omitempty"`
	// lastForcePromotion records the last promotion forced with the
	// storage.tandem.dev/force-promote annotation (kubectl tandem promote
	// --force): who asked, which member, and what would have blocked it.
	// +optional
	LastForcePromotion *ForcePromotion `json:"lastForcePromotion,omitempty"`
	// forcePromoteSeen is when the controller first saw the pending
	// storage.tandem.dev/force-promote request, and for which node. A
	// request that cannot act is cleared ForcePromoteTTL after it; kept in
	// the status, the count survives a manager restart or a leader change.
	// +optional
	ForcePromoteSeen *ForcePromoteSeen `json:"forcePromoteSeen,omitempty"`
	// conditions: Ready, Synchronized, Degraded, FailoverBlocked, Expanding.
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=16
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// clients are the client nodes the writer enforces now (see
	// spec.clients), as its agent last reported them; absent while the
	// export is unrestricted or the writer has not confirmed yet.
	// +optional
	Clients *ClientsSpec `json:"clients,omitempty"`
	// dataInitialized is true once a member has held the pair's data. From
	// then on a member without it (a new replica, a wiped disk, a replica
	// of another VolumePair) is Inconsistent: it receives a full copy and is
	// never promoted or failed back to before the copy completes; and if
	// neither member holds it, the pair reports its data lost rather than
	// serving an empty volume.
	// +optional
	DataInitialized bool `json:"dataInitialized,omitempty"`
	// observedGeneration is the generation the status was computed from.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
}

// VolumePair is a block volume kept on two or more nodes, with automatic
// failover and resync of only what changed.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=vp,categories=tandem
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mode`
// +kubebuilder:printcolumn:name="Primary",type=string,JSONPath=`.spec.primary.node`
// +kubebuilder:printcolumn:name="Active",type=string,JSONPath=`.status.activePrimary`
// +kubebuilder:printcolumn:name="Backup",type=string,JSONPath=`.spec.backup.node`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Status",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="In-Sync",type=string,JSONPath=`.status.membersInSync`
// +kubebuilder:printcolumn:name="Out-Of-Sync",type=integer,format=int64,JSONPath=`.status.outOfSyncBytes`
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.status.size`,priority=1
// +kubebuilder:printcolumn:name="Claim",type=string,JSONPath=`.metadata.annotations.csi\.tandem\.dev/pvc`,priority=1
// +kubebuilder:printcolumn:name="Unmerged",type=integer,format=int64,JSONPath=`.status.unmergedRegions`,priority=1
// +kubebuilder:printcolumn:name="Epoch",type=integer,JSONPath=`.status.epoch`,priority=1
// +kubebuilder:printcolumn:name="Endpoint",type=string,JSONPath=`.status.endpoint`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VolumePair struct {
	metav1.TypeMeta `json:",inline"`
	// +optional
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec declares the pair.
	// +required
	Spec VolumePairSpec `json:"spec"`

	// status is the observed state.
	// +optional
	Status VolumePairStatus `json:"status,omitempty"`
}

// VolumePairList is a list of VolumePairs.
//
// +kubebuilder:object:root=true
type VolumePairList struct {
	metav1.TypeMeta `json:",inline"`
	// +optional
	metav1.ListMeta `json:"metadata,omitempty"`
	// items are the VolumePairs.
	Items []VolumePair `json:"items"`
}
