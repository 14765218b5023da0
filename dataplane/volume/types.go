package volume

import (
	"fmt"
	"syscall"
	"time"
)

// Role is the role a member plays.
type Role string

// Roles.
const (
	RolePrimary Role = "Primary"
	RoleBackup  Role = "Backup"
	// RoleNone is the fenced state: after a restart, and for a member told to
	// stand aside. It serves nothing and accepts no replication.
	RoleNone Role = "None"
)

// Mode says when a client write is acknowledged.
type Mode string

// Modes.
const (
	ModeSync  Mode = "Sync"
	ModeAsync Mode = "Async"
)

// DataState says how far a member's data can be trusted.
type DataState string

// Data states.
const (
	UpToDate     DataState = "UpToDate"
	Outdated     DataState = "Outdated"
	Inconsistent DataState = "Inconsistent"
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
	// MergePeerBitmap ORs the returning member's own diff into the resync
	// (default true; false copies only this side's diff).
	MergePeerBitmap *bool `json:"mergePeerBitmap,omitempty"`
	// MaxBytesPerSecond caps the resync rate; 0 is unlimited.
	MaxBytesPerSecond int64 `json:"maxBytesPerSecond,omitempty"`
	// Hold asks an acting primary to hold new writes and drain its diff
	// (failback). Held writes are not failed.
	Hold bool `json:"hold,omitempty"`
	// AllowPromoteInconsistent lets a member with Inconsistent data become
	// primary. Only a user's explicit override sets it.
	AllowPromoteInconsistent bool `json:"allowPromoteInconsistent,omitempty"`
}

func (s Spec) mergePeer() bool { return s.MergePeerBitmap == nil || *s.MergePeerBitmap }

// CopyStatus reports a running resync.
type CopyStatus struct {
	Running        bool      `json:"running"`
	TotalBytes     int64     `json:"totalBytes"`
	DoneBytes      int64     `json:"doneBytes"`
	BytesPerSecond int64     `json:"bytesPerSecond"`
	ETASeconds     int64     `json:"etaSeconds"`
	StartTime      time.Time `json:"startTime,omitzero"`
	FullCopy       bool      `json:"fullCopy,omitempty"`
	// CopiedBytesTotal counts every byte of resync data sent since the agent
	// started, for tests and benchmarks.
	CopiedBytesTotal int64 `json:"copiedBytesTotal"`
}

// Status is the actual state the agent reports.
type Status struct {
	Name       string    `json:"name"`
	Size       int64     `json:"size"`
	RegionSize int64     `json:"regionSize"`
	Role       Role      `json:"role"`
	Epoch      uint64    `json:"epoch"`
	Mode       Mode      `json:"mode"`
	DataState  DataState `json:"dataState"`
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
	// records the peer as Outdated (invariant 2).
	WaitingForPeerOutdated int64 `json:"waitingForPeerOutdated"`
	// Holding is true while new writes are held for a failback; Drained when
	// nothing is left to ship.
	Holding         bool      `json:"holding"`
	Drained         bool      `json:"drained"`
	LastHoldSeconds float64   `json:"lastHoldSeconds"`
	HeldWrites      int64     `json:"heldWrites"`
	ForwardedWrites int64     `json:"forwardedWrites"`
	Counters        Counters  `json:"counters"`
	LastError       string    `json:"lastError,omitempty"`
	LastErrorTime   time.Time `json:"lastErrorTime,omitzero"`
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

// Errors the engine returns; the NBD layer maps them to errnos.
var (
	// ErrNotWriter: this member does not accept writes (not primary, fenced).
	ErrNotWriter = fmt.Errorf("not the writer: %w", syscall.EPERM)
	// ErrClosed: the volume is shut down.
	ErrClosed = fmt.Errorf("volume closed: %w", syscall.ESHUTDOWN)
)
