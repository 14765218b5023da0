package volume

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// The engine reports its state in the control API's types (package
// agentapi, the contract between controller and agent). These aliases keep
// the engine's code and tests reading as before: volume.Status is
// agentapi.Status, volume.RolePrimary is agentapi.RolePrimary, and so on.
type (
	Role       = agentapi.Role
	Mode       = agentapi.Mode
	DataState  = agentapi.DataState
	Spec       = agentapi.Spec
	Status     = agentapi.Status
	CopyStatus = agentapi.CopyStatus
	Counters   = agentapi.Counters
)

// Roles, modes and data states (see agentapi).
const (
	RolePrimary  = agentapi.RolePrimary
	RoleBackup   = agentapi.RoleBackup
	RoleNone     = agentapi.RoleNone
	ModeSync     = agentapi.ModeSync
	ModeAsync    = agentapi.ModeAsync
	UpToDate     = agentapi.UpToDate
	Outdated     = agentapi.Outdated
	Inconsistent = agentapi.Inconsistent
)

// Errors the engine returns; the NBD layer maps them to errnos.
var (
	// ErrNotWriter: this member does not accept writes (not primary, fenced).
	ErrNotWriter = fmt.Errorf("not the writer: %w", syscall.EPERM)
	// ErrClosed: the volume is shut down.
	ErrClosed = fmt.Errorf("volume closed: %w", syscall.ESHUTDOWN)
	// ErrAuthorityPending is wrapped by an Authority that was not asked
	// yet for the member's current epoch: the member was just made the
	// writer and its first renewal has not completed. Client requests wait
	// for it (up to authorityWait) instead of failing: right after a
	// failback the requests forwarded by the old writer arrive before the
	// new writer's first renewal.
	ErrAuthorityPending = errors.New("authority not granted yet")
)
