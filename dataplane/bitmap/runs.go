package bitmap

import "github.com/RoaringBitmap/roaring/v2"

// ForEachRun calls fn with every maximal run [first, last] of b in
// increasing order, and stops at the first error, which it returns. It costs
// a few roaring operations per run, not one per value: the 2^32-1 regions of
// a full copy of the largest volume are one run, visited in microseconds,
// where iterating them one by one takes seconds.
func ForEachRun(b *roaring.Bitmap, fn func(first, last uint32) error) error {
	it := b.Iterator()
	for it.HasNext() {
		first := uint64(it.Next())
		end := first + runLength(b, first) // one past the run
		if err := fn(uint32(first), uint32(end-1)); err != nil {
			return err
		}
		if end > 1<<32-1 {
			return nil
		}
		it.AdvanceIfNeeded(uint32(end))
	}
	return nil
}

// runLength is the length of the run of b that starts at first (a member):
// the largest n with [first, first+n) all in b, found by doubling, then
// halving, the step (2·log2(n) range cardinalities).
func runLength(b *roaring.Bitmap, first uint64) uint64 {
	full := func(n uint64) bool {
		return first+n <= 1<<32 && b.CardinalityInRange(first, first+n) == n
	}
	n, step := uint64(1), uint64(1)
	for full(n + step) {
		n += step
		step <<= 1
	}
	// [first, first+n) is full, [first, first+n+step) is not.
	for step >>= 1; step > 0; step >>= 1 {
		if full(n + step) {
			n += step
		}
	}
	return n
}
