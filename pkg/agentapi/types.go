package agentapi

import (
	"fmt"
	"path/filepath"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Role is the role a member plays (the API's MemberRole: see the package
// doc).
type Role = v1.MemberRole

// Roles.
const (
	// RolePrimary serves client writes and mirrors them to its peer.
	RolePrimary = v1.RolePrimary
	// RoleBackup applies its peer's writes in order.
	RoleBackup = v1.RoleBackup
	// RoleNone is the fenced state: after a restart, and for a member told to
	// stand aside. It serves nothing and accepts no replication.
	RoleNone = v1.RoleNone
)

// Mode says when a client write is acknowledged (the API's ReplicationMode).
type Mode = v1.ReplicationMode

// Modes.
const (
	ModeSync  = v1.ModeSync
	ModeAsync = v1.ModeAsync
)

// DataState says how far a member's data can be trusted (the API's
// DataState; an agent never reports v1alpha1.DataUnknown).
type DataState = v1.DataState

// Data states an agent reports.
const (
	UpToDate     = v1.DataUpToDate
	Outdated     = v1.DataOutdated
	Inconsistent = v1.DataInconsistent
)

// Spec is the desired state the controller sets through the control API.
type Spec struct {
	// PairUID is the VolumePair's UID: the identity of the pair whose data
	// this replica must hold. A replica holding no data of this pair (new,
	// wiped, or left from another VolumePair of the same name) is
	// Inconsistent until a full copy completes. It also names the pair's
	// authority Lease.
	PairUID string `json:"pairUID,omitempty"`
	// Role is the desired role.
	Role Role `json:"role"`
	// Epoch is the authority epoch; it grows with every change of writer.
	// Frames from a lower epoch are refused.
	Epoch uint64 `json:"epoch"`
	// Mode is Sync or Async.
	Mode Mode `json:"mode"`
	// PeerNode names the other member.
	PeerNode string `json:"peerNode,omitempty"`
	// PeerAddress is host:port of the peer agent's replication listener. A
	// primary dials it; a backup accepts only its peer's Hello.
	PeerAddress string `json:"peerAddress,omitempty"`
	// MoreBackups are the writer's backups beyond the one PeerNode,
	// PeerAddress and Mode name (a pair of three or more members): the
	// writer mirrors every write to each of them, over a link of its own,
	// and keeps a dirty bitmap per backup (each lags on its own). Every
	// entry names its node, which no other entry and not PeerNode names.
	// An agent that does not know the field mirrors to the first backup
	// only: the controller sends it only to agents that advertise it.
	MoreBackups []Peer `json:"moreBackups,omitempty"`
	// MergePeerBitmap ORs the returning member's own diff into the resync
	// (default true, see MergesPeerBitmap; false copies only this side's
	// diff).
	MergePeerBitmap *bool `json:"mergePeerBitmap,omitempty"`
	// MaxBytesPerSecond caps the resync rate; 0 is unlimited.
	MaxBytesPerSecond int64 `json:"maxBytesPerSecond,omitempty"`
	// Hold asks an acting primary to hold new writes and drain its diff
	// (failback). Held writes are not failed.
	Hold bool `json:"hold,omitempty"`
	// Initialize lets a replica that holds no data of the pair (a new one)
	// become its primary: its contents become the pair's data. The
	// controller sets it only for the first writer of a pair that no
	// member ever held data of; without it a new or wiped replica is
	// never made primary (invariant 8, docs/architecture.md).
	Initialize bool `json:"initialize,omitempty"`
	// AllowPromoteInconsistent lets a member with Inconsistent data become
	// primary. Only a user's explicit override sets it.
	AllowPromoteInconsistent bool `json:"allowPromoteInconsistent,omitempty"`
	// Clients, when set, restricts the volume's NBD export to these
	// clients (VolumePair spec.clients); nil leaves it unrestricted. The
	// agent keeps it across restarts (the replica's clients.json).
	Clients *Clients `json:"clients,omitempty"`
}

// Peer is a member a writer mirrors to.
type Peer struct {
	// Node names the member.
	Node string `json:"node"`
	// Address is host:port of its agent's replication listener ("": not
	// known yet; the writer tracks what it lacks until it is).
	Address string `json:"address,omitempty"`
	// Mode is when a client write is acknowledged with respect to this
	// member: Sync (after it applied the write) or Async; "" is the
	// spec's Mode.
	Mode Mode `json:"mode,omitempty"`
}

// Peers returns every member the spec names besides this one: the first
// from PeerNode, PeerAddress and Mode (when PeerNode or PeerAddress is
// set), then MoreBackups, each with its mode resolved.
func (s Spec) Peers() []Peer {
	mode := s.Mode
	if mode == "" {
		mode = ModeAsync
	}
	var out []Peer
	if s.PeerNode != "" || s.PeerAddress != "" {
		out = append(out, Peer{Node: s.PeerNode, Address: s.PeerAddress, Mode: mode})
	}
	for _, p := range s.MoreBackups {
		if p.Mode == "" {
			p.Mode = mode
		}
		out = append(out, p)
	}
	return out
}

// ValidatePeers reports the first problem with the spec's members: with
// MoreBackups, every member names a node (PeerNode included), no node
// twice, and each mode is Sync, Async or empty.
func (s Spec) ValidatePeers() error {
	if len(s.MoreBackups) == 0 {
		return nil
	}
	if s.PeerNode == "" {
		return fmt.Errorf("moreBackups needs peerNode: every member of a pair of three or more is named")
	}
	seen := map[string]bool{s.PeerNode: true}
	for i, p := range s.MoreBackups {
		switch {
		case p.Node == "":
			return fmt.Errorf("moreBackups[%d].node is empty", i)
		case seen[p.Node]:
			return fmt.Errorf("moreBackups[%d].node %q is named twice", i, p.Node)
		case p.Mode != "" && p.Mode != ModeSync && p.Mode != ModeAsync:
			return fmt.Errorf("moreBackups[%d].mode %q: want %s or %s", i, p.Mode, ModeSync, ModeAsync)
		}
		seen[p.Node] = true
	}
	return nil
}

// Clients restricts who may use a volume's NBD export.
type Clients struct {
	// Nodes names the client nodes, for status (the agent does not
	// resolve them).
	Nodes []string `json:"nodes"`
	// Addresses are the IP addresses (or CIDR prefixes) of those nodes:
	// the only clients served. Empty: none.
	Addresses []string `json:"addresses"`
}

// Equal reports whether two restrictions are the same (order aside).
func (c *Clients) Equal(o *Clients) bool {
	if c == nil || o == nil {
		return c == nil && o == nil
	}
	return sameSet(c.Nodes, o.Nodes) && sameSet(c.Addresses, o.Addresses)
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	m := make(map[string]int, len(a))
	for _, x := range a {
		m[x]++
	}
	for _, x := range b {
		if m[x] == 0 {
			return false
		}
		m[x]--
	}
	return true
}

// MergesPeerBitmap is MergePeerBitmap with its default (true when unset).
func (s Spec) MergesPeerBitmap() bool { return s.MergePeerBitmap == nil || *s.MergePeerBitmap }

// CopyStatus reports a running resync.
type CopyStatus struct {
	Running        bool      `json:"running"`
	TotalBytes     int64     `json:"totalBytes"`
	DoneBytes      int64     `json:"doneBytes"`
	BytesPerSecond int64     `json:"bytesPerSecond"`
	ETASeconds     int64     `json:"etaSeconds"`
	StartTime      time.Time `json:"startTime,omitzero"`
	FullCopy       bool      `json:"fullCopy,omitempty"`
	// Reason says why the whole volume is copied.
	Reason string `json:"reason,omitempty"`
	// CopiedBytesTotal counts every byte of the volume resynced since the
	// agent started (regions of zeros included, though they travel as
	// Zero frames without data), for tests and benchmarks.
	CopiedBytesTotal int64 `json:"copiedBytesTotal"`
}

// Status is the actual state the agent reports.
type Status struct {
	// Name is "namespace/name".
	Name       string    `json:"name"`
	Size       int64     `json:"size"`
	RegionSize int64     `json:"regionSize"`
	Role       Role      `json:"role"`
	Epoch      uint64    `json:"epoch"`
	Mode       Mode      `json:"mode"`
	DataState  DataState `json:"dataState"`
	// DataStateReason says why the data is not UpToDate, when known (a new
	// or wiped replica, another pair's data, a copy not finished).
	DataStateReason string `json:"dataStateReason,omitempty"`
	// Joined is true when the replica holds the data of the pair PairUID:
	// it started the pair's data, or a full copy from a member holding it
	// completed. PairUID is empty for a replica joined before UIDs were
	// recorded, until the controller gives it its pair's UID.
	Joined  bool   `json:"joined,omitempty"`
	PairUID string `json:"pairUID,omitempty"`
	// UnmergedRegions counts the regions that differ from the peer's
	// because a resync did not merge this member's own diff
	// (mergePrimaryBitmap false: writes this member acknowledged that
	// never reached the peer). Both members are otherwise in sync.
	UnmergedRegions uint64 `json:"unmergedRegions,omitempty"`
	// Writable is true when this member accepts client writes now.
	Writable bool `json:"writable"`
	// Reason explains why the member is not writable.
	Reason string `json:"reason,omitempty"`
	// PeerConnected is true when the replication link is up and streaming.
	PeerConnected bool   `json:"peerConnected"`
	PeerNode      string `json:"peerNode,omitempty"`
	// OutOfSyncRegions/Bytes is the dirty bitmap: what the peer may lack.
	OutOfSyncRegions uint64 `json:"outOfSyncRegions"`
	OutOfSyncBytes   int64  `json:"outOfSyncBytes"`
	// BitmapsLost is true when the journal could not be read back and the
	// whole volume is treated as dirty.
	BitmapsLost bool       `json:"bitmapsLost,omitempty"`
	Copy        CopyStatus `json:"copy"`
	// OldestUnreplicatedSeconds is the age of the oldest write the peer does
	// not hold: not acknowledged yet, or, while it is away and until the
	// resync completes, written since it went away (or left unacknowledged
	// then).
	OldestUnreplicatedSeconds float64 `json:"oldestUnreplicatedSeconds"`
	// WaitingForPeerOutdated counts sync writes held until the controller
	// records the peer as Outdated (invariant 2, docs/architecture.md).
	WaitingForPeerOutdated int64 `json:"waitingForPeerOutdated"`
	// Holding is true while new writes are held for a failback; Drained when
	// nothing is left to ship.
	Holding bool `json:"holding"`
	// HoldSeconds is how long the current hold has lasted.
	HoldSeconds     float64 `json:"holdSeconds,omitempty"`
	Drained         bool    `json:"drained"`
	LastHoldSeconds float64 `json:"lastHoldSeconds"`
	HeldWrites      int64   `json:"heldWrites"`
	// Stopping is true once the agent was asked to stop (SIGTERM: a rolling
	// update, a node drain). The controller then hands this member's writer
	// role to its peer when the peer is in sync, the way a failback does
	// (hold, drain, switch), and never makes it the writer
	// (docs/architecture.md, "Agent restarts").
	Stopping bool `json:"stopping,omitempty"`
	// Tracked are the members whose differences from this replica its
	// bitmaps track: a writer's backups, a backup's primary and the other
	// backups it knows (Spec.PeerNode and Spec.MoreBackups).
	Tracked []string `json:"tracked,omitempty"`
	// Peers reports each member a writer mirrors to (Spec.Peers), in
	// order; the fields above sum them up: PeerConnected when every one is
	// connected, OutOfSync the union of their bitmaps, Copy the copies
	// running, OldestUnreplicatedSeconds the oldest of theirs. Empty on a
	// member that is not the writer.
	Peers []PeerStatus `json:"peers,omitempty"`
	// Clients is the restriction the export enforces (Spec.Clients).
	Clients         *Clients  `json:"clients,omitempty"`
	ForwardedWrites int64     `json:"forwardedWrites"`
	Counters        Counters  `json:"counters"`
	LastError       string    `json:"lastError,omitempty"`
	LastErrorTime   time.Time `json:"lastErrorTime,omitzero"`
}

// PeerStatus is what a writer reports of one member it mirrors to.
type PeerStatus struct {
	Node string `json:"node"`
	Mode Mode   `json:"mode"`
	// Connected is true when the link to it is up and streaming.
	Connected bool `json:"connected"`
	// OutOfSyncRegions/Bytes is the dirty bitmap of this member: what it
	// may lack.
	OutOfSyncRegions uint64     `json:"outOfSyncRegions"`
	OutOfSyncBytes   int64      `json:"outOfSyncBytes"`
	Copy             CopyStatus `json:"copy"`
	// OldestUnreplicatedSeconds is the age of the oldest write it lacks.
	OldestUnreplicatedSeconds float64 `json:"oldestUnreplicatedSeconds"`
	// Outdated is true when the controller recorded it Outdated at the
	// writer's epoch: sync writes no longer wait for it.
	Outdated bool `json:"outdated,omitempty"`
	// Drained is true while the writer holds writes (failback) and this
	// member holds every one it acknowledged: the writer role may move to
	// it.
	Drained bool `json:"drained,omitempty"`
}

// Counters are monotonically increasing totals.
type Counters struct {
	Writes         int64 `json:"writes"`
	WriteBytes     int64 `json:"writeBytes"`
	Reads          int64 `json:"reads"`
	ReadBytes      int64 `json:"readBytes"`
	Flushes        int64 `json:"flushes"`
	FramesSent     int64 `json:"framesSent"`
	FramesApplied  int64 `json:"framesApplied"`
	Reconnects     int64 `json:"reconnects"`
	RejectedFrames int64 `json:"rejectedFrames"`
}

// VolumeRequest is the body of PUT /v1/volumes/{namespace}/{name}.
type VolumeRequest struct {
	// Size and RegionSize create the replica when it does not exist.
	// RegionSize must match an existing one. A Size larger than the
	// existing replica's grows it, durably, before the spec is applied
	// (the answer's Status.Size is the new size; grow backups before the
	// writer); a smaller one is refused with 409 (a volume never shrinks),
	// one the node's file system cannot hold with 400, the replica keeping
	// its size.
	Size       int64 `json:"size"`
	RegionSize int64 `json:"regionSize"`
	// Spec is the desired state.
	Spec Spec `json:"spec"`
}

// PeerOutdatedRequest is the body of POST .../peer-outdated: the controller
// recorded the writer's peer Outdated at this authority epoch.
type PeerOutdatedRequest struct {
	Epoch uint64 `json:"epoch"`
	// Node names the member recorded Outdated; "" is every member the
	// writer mirrors to (what a controller that names none means).
	Node string `json:"node,omitempty"`
}

// ResyncRequest is the body of POST .../resync: regions the writer must copy
// to its peer again (the repair after `kubectl tandem verify`).
type ResyncRequest struct {
	First uint32 `json:"first"`
	Count uint32 `json:"count"`
}

// Info is the answer of GET /v1/info.
type Info struct {
	Node               string `json:"node"`
	NBDAddress         string `json:"nbdAddress"`
	ReplicationAddress string `json:"replicationAddress"`
	ControlAddress     string `json:"controlAddress"`
	Volumes            int    `json:"volumes"`
	// TLS is the certificate the agent presents, with mutual TLS on.
	TLS *TLSInfo `json:"tls,omitempty"`
}

// TLSInfo describes the agent's current TLS certificate.
type TLSInfo struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"` // hex
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
}

// Bitmap is the answer of GET .../bitmap: the dirty regions as inclusive runs.
type Bitmap struct {
	RegionSize int64       `json:"regionSize"`
	Runs       [][2]uint32 `json:"runs"`
}

// ChecksumAlgorithm names the hash in Checksums.Algorithm.
const ChecksumAlgorithm = "sha256"

// MaxChecksumRegions bounds the regions one checksums call hashes, so a
// single control API request reads at most this many regions.
const MaxChecksumRegions = 4096

// Checksums is the answer of GET .../checksums: one hex digest per region,
// for regions First, First+1, ... of the local replica.
type Checksums struct {
	RegionSize int64    `json:"regionSize"`
	First      uint32   `json:"first"`
	Algorithm  string   `json:"algorithm"`
	Sums       []string `json:"sums"`
}

// ErrorBody is the body of every error answer (4xx, 5xx).
type ErrorBody struct {
	Error string `json:"error"`
}

// ReplicaDir is where an agent with data directory dataDir (advertised on
// its agent Lease, v1alpha1.AnnDataDir) keeps the replica of
// namespace/name: the controller names it when it could not remove a
// replica.
func ReplicaDir(dataDir, namespace, name string) string {
	return filepath.Join(dataDir, "volumes", namespace, name)
}
