package bitmap

import "github.com/RoaringBitmap/roaring/v2"

// MarkRange is MarkRegions for the regions of the byte range [off, off+n):
// a write made while the peer is away. It does not allocate. An empty or
// out-of-volume range is a no-op.
func (t *Tracker) MarkRange(off, n int64) {
	first, last, ok := t.geo().regionRange(off, n)
	if !ok {
		return
	}
	t.mu.Lock()
	t.markStickyRange(first, last)
	t.mu.Unlock()
}

// Sticky returns a copy of the regions no ack can clean: they must be copied
// to the peer by a resync.
func (t *Tracker) Sticky() *roaring.Bitmap {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sticky.Clone()
}

// StickyCount is the number of regions waiting for a resync copy.
func (t *Tracker) StickyCount() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sticky.GetCardinality()
}
