package volume

import (
	"fmt"
	"path/filepath"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
)

// unmergedFile holds the unmerged regions (bitmap.WriteRegionSet).
const unmergedFile = "unmerged"

// keepUnmerged adds the regions of own, this member's diff that the primary
// did not merge into a resync, to the unmerged set, durably: they differ
// from the primary's and will not be copied.
func (v *Volume) keepUnmerged(own *roaring.Bitmap) error {
	if own.IsEmpty() {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	next := roaring.Or(v.unmerged, own)
	if err := bitmap.WriteRegionSet(filepath.Join(v.opts.Dir, unmergedFile), v.size.Load(), v.opts.RegionSize, next); err != nil {
		return fmt.Errorf("volume %s: recording unmerged regions: %w", v.opts.Name, err)
	}
	v.unmerged, v.unmergedDirty = next, false
	v.unmergedN.Store(next.GetCardinality())
	v.log.Info("Own diff not merged by the primary (mergePrimaryBitmap false); regions left different", "regions", own.GetCardinality(), "unmergedTotal", next.GetCardinality())
	return nil
}

// coveredUnmerged drops from the unmerged set the regions that
// [off, off+n) covers whole: the frame that wrote them made both members
// hold the same bytes there. The file is rewritten lazily (at the next
// checkpoint); a crash before that over-reports, never under-reports.
func (v *Volume) coveredUnmerged(off, n int64) {
	rs := v.opts.RegionSize
	first := (off + rs - 1) / rs
	end := (off + n) / rs
	if off+n >= v.size.Load() {
		end = int64(v.regions())
	}
	if end <= first || v.unmergedN.Load() == 0 {
		return
	}
	v.mu.Lock()
	if v.unmerged.IntersectsWithInterval(uint64(first), uint64(end)) {
		v.unmerged.RemoveRange(uint64(first), uint64(end))
		v.unmergedDirty = true
		v.unmergedN.Store(v.unmerged.GetCardinality())
	}
	v.mu.Unlock()
}

// clearUnmerged forgets every unmerged region (a full copy overwrote them).
func (v *Volume) clearUnmerged() {
	v.mu.Lock()
	if !v.unmerged.IsEmpty() {
		v.unmerged.Clear()
		v.unmergedDirty = true
		v.unmergedN.Store(0)
	}
	v.mu.Unlock()
}

// flushUnmerged rewrites the unmerged file if it lags the set.
func (v *Volume) flushUnmerged() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.unmergedDirty {
		return nil
	}
	if err := bitmap.WriteRegionSet(filepath.Join(v.opts.Dir, unmergedFile), v.size.Load(), v.opts.RegionSize, v.unmerged); err != nil {
		return fmt.Errorf("volume %s: recording unmerged regions: %w", v.opts.Name, err)
	}
	v.unmergedDirty = false
	return nil
}
