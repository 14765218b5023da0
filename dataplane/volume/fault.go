package volume

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
)

// Fault returns why this member cannot take new writes even though its role
// and authority allow them, or nil. The cause is a failed write-intent
// journal (a full or failing disk under the replica's directory): writes to
// extents not already marked would be acknowledged without a durable mark,
// so they fail with EIO instead. While Fault is set, Status reports the
// member not writable with this reason, and the agent stops renewing the
// volume's authority Lease, so that if the fault lasts the Lease expires and
// the controller promotes the backup. It clears by itself once the journal
// can write again (bitmap.Journal.Err), and renewal resumes.
func (v *Volume) Fault() error {
	if err := v.journal.Err(); err != nil {
		return fmt.Errorf("write-intent journal failed: %w", err)
	}
	return nil
}

// SetJournalFaultHook installs fn as the write-intent journal's fault hook
// (bitmap.Journal.SetFaultHook): fault-injection tests use it to fill the
// journal's disk. nil removes it.
func (v *Volume) SetJournalFaultHook(fn func(bitmap.FaultOp) error) { v.journal.SetFaultHook(fn) }

// writeIntentError is what a client write gets when the journal could not
// mark its extents. The journal's own cause (ENOSPC on the replica's
// directory, say) is not the volume's: a client told ENOSPC would think its
// volume full. So it is EIO, except for a cancelled request or a closed
// volume, which keep their meaning.
func writeIntentError(off, n int64, err error) error {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("write-intent for [%d, +%d): %w", off, n, err)
	case errors.Is(err, bitmap.ErrClosed):
		return fmt.Errorf("write-intent for [%d, +%d): %v: %w", off, n, err, ErrClosed)
	}
	return fmt.Errorf("write-intent journal failed for [%d, +%d): %v: %w", off, n, err, syscall.EIO)
}
