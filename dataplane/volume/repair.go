package volume

import (
	"context"
	"fmt"
	"syscall"
)

// RequestResync marks the regions [first, first+count) out of sync so the
// writer copies them to its peer again: the repair after an online verify
// found them different. The extents are journaled first, so the request
// survives a crash. Only the writer accepts it.
func (v *Volume) RequestResync(ctx context.Context, first, count uint32) error {
	rs := v.opts.RegionSize
	regions := uint32((v.size.Load() + rs - 1) / rs)
	if count == 0 || first >= regions || count > regions-first {
		return fmt.Errorf("regions [%d, +%d) outside the volume's %d regions: %w", first, count, regions, syscall.EINVAL)
	}
	if err := v.Writable(); err != nil {
		return fmt.Errorf("only the writer can resync regions to its peer: %w", err)
	}
	off := int64(first) * rs
	n := min(int64(count)*rs, v.size.Load()-off)
	v.ckpt.RLock()
	defer v.ckpt.RUnlock()
	if err := v.journal.Mark(ctx, off, n); err != nil {
		return fmt.Errorf("journal resync request: %w", err)
	}
	v.markAllHoled(off, n)
	v.log.Info("Resync of regions requested", "first", first, "count", count)
	return nil
}
