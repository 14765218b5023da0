package volume

import (
	"fmt"
	"syscall"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/store"
)

// ErrShrink is wrapped by Grow (and Open) when asked for a size below the
// replica's: a volume grows, it never shrinks.
var ErrShrink = fmt.Errorf("a volume never shrinks: %w", syscall.EINVAL)

// ErrGrowLimit is wrapped by Grow when the new size needs more write-intent
// extents than a journal keeps (bitmap.MaxDefaultExtents): a journal keeps
// the extent size it was created with, so a volume grows to at most 2^26
// of them (256 TiB with the default 4 MiB extents, 4 PiB with 64 MiB
// regions). A volume created that large gets larger extents instead.
var ErrGrowLimit = fmt.Errorf("too many write-intent extents: %w", syscall.EINVAL)

// Grow steps, in order (see Grow); growHook sees each once it is done.
const (
	growStepStore   = "store"
	growStepJournal = "journal"
	growStepMeta    = "meta"
)

// Grow makes the replica size bytes long, durably, while I/O runs (online
// volume expansion, docs/architecture.md "Growing a volume"). A size below
// the replica's wraps ErrShrink; its own size is a no-op. In order:
//
//  1. the store grows (a file is extended sparse with ftruncate and
//     fsynced; a block device must already be that large), so the new
//     space reads as zeros on every member;
//  2. the write-intent journal switches to the new size with a checkpoint
//     of the current dirty bitmap (bitmap.Journal.Grow);
//  3. the dirty bitmaps (one tracker per tracked member) grow with the new
//     regions clean: every member reads zeros there, none lacks anything;
//  4. the metadata records the new size: the commit point;
//  5. the volume's size changes: requests past the old end are admitted
//     (client I/O, a backup's frames), and the status reports it.
//
// Requests within the old size run throughout; none past it is admitted
// before step 5, so no write there is marked in a journal or tracker before
// the metadata holds the new size. A crash before step 4 leaves a replica
// that opens at the old size (its store file and journal files may be of
// the new one, which Open and the journal accept) with every dirty bit;
// after it, one that opens at the new size. A failure at any step leaves
// the replica at its old size and usable, and Grow may be called again.
func (v *Volume) Grow(size int64) error {
	v.growMu.Lock()
	defer v.growMu.Unlock()
	cur := v.size.Load()
	switch {
	case size < cur:
		return fmt.Errorf("volume %s: size %d is smaller than the replica's %d: %w", v.opts.Name, size, cur, ErrShrink)
	case size == cur:
		return nil
	}
	es := v.journal.ExtentSize()
	if err := bitmap.ValidateGeometry(size, v.opts.RegionSize, es); err != nil {
		return fmt.Errorf("volume %s: growing to %d bytes: %w: %w", v.opts.Name, size, err, syscall.EINVAL)
	}
	if n := (size + es - 1) / es; n > bitmap.MaxDefaultExtents && n > (cur+es-1)/es {
		return fmt.Errorf("volume %s: growing from %d to %d bytes needs %d extents of the journal's %d bytes, more than %d: %w",
			v.opts.Name, cur, size, n, es, bitmap.MaxDefaultExtents, ErrGrowLimit)
	}
	v.mu.Lock()
	closed := v.closed
	v.mu.Unlock()
	if closed {
		return ErrClosed
	}
	fail := func(step string, err error) error {
		err = fmt.Errorf("volume %s: growing from %d to %d bytes: %s: %w", v.opts.Name, cur, size, step, err)
		v.log.Error(err, "Grow failed; the replica keeps its size", "size", cur)
		return err
	}
	if err := store.Grow(v.store, size); err != nil {
		return fail("growing the store", err)
	}
	if err := v.growHook(growStepStore); err != nil {
		return fail("after the store", err)
	}
	// The snapshot holds no region past the old end: nothing is admitted
	// there yet.
	v.ckpt.Lock()
	snap := v.dirty()
	v.ckpt.Unlock()
	if err := v.journal.Grow(size, snap); err != nil {
		return fail("growing the bitmap journal", err)
	}
	if err := v.growHook(growStepJournal); err != nil {
		return fail("after the journal", err)
	}

	// Trackers are replaced and created under v.mu (Apply, Open): every
	// one is grown before the size changes, and any made later has the
	// new size.
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, t := range v.trackers {
		if err := t.Grow(size); err != nil {
			return fail("growing a dirty bitmap", err)
		}
	}
	for _, p := range v.peers {
		if err := p.tr.Grow(size); err != nil {
			return fail("growing a dirty bitmap", err)
		}
	}
	m := v.metaLocked()
	m.Size = size
	if err := v.writeMeta(m); err != nil {
		return fail("recording the size", err)
	}
	if err := v.growHook(growStepMeta); err != nil {
		// The metadata holds the new size: a crash here opens grown.
		return fail("after the metadata", err)
	}
	v.size.Store(size)
	v.notifyLocked()
	v.log.Info("Replica grown", "from", cur, "to", size)
	return nil
}

// growHook runs the test hook after a step of Grow.
func (v *Volume) growHook(step string) error {
	if h := v.growTestHook; h != nil {
		return h(step)
	}
	return nil
}
