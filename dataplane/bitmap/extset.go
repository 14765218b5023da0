package bitmap

import (
	"math/bits"
	"sync/atomic"

	"github.com/RoaringBitmap/roaring/v2"
)

// extSet is a dense set of extent numbers with lock-free membership tests:
// the Journal's "durably marked in the current log generation" set. Bits are
// only ever added; a new generation gets a new extSet.
type extSet struct {
	w []atomic.Uint64
}

func newExtSet(extents uint32) *extSet {
	return &extSet{w: make([]atomic.Uint64, (uint64(extents)+63)/64)}
}

func (s *extSet) has(e uint32) bool {
	i := int(e >> 6)
	return i < len(s.w) && s.w[i].Load()&(1<<(e&63)) != 0
}

// hasRange reports whether every extent in [first, last] is in the set.
func (s *extSet) hasRange(first, last uint32) bool {
	return s.nextClear(uint64(first), uint64(last)) > uint64(last)
}

// nextClear returns the first extent in [e, last] that is not in the set,
// or last+1. It reads a word per 64 extents.
func (s *extSet) nextClear(e, last uint64) uint64 {
	for e <= last {
		i := e >> 6
		if i >= uint64(len(s.w)) {
			return e
		}
		if w := ^s.w[i].Load() >> (e & 63); w != 0 {
			return min(e+uint64(bits.TrailingZeros64(w)), last+1)
		}
		e = (i + 1) << 6
	}
	return last + 1
}

// nextSet returns the first extent in [e, last] that is in the set, or
// last+1.
func (s *extSet) nextSet(e, last uint64) uint64 {
	for e <= last {
		i := e >> 6
		if i >= uint64(len(s.w)) {
			return last + 1
		}
		if w := s.w[i].Load() >> (e & 63); w != 0 {
			return min(e+uint64(bits.TrailingZeros64(w)), last+1)
		}
		e = (i + 1) << 6
	}
	return last + 1
}

// addRange adds every extent of [first, last], a word per 64 extents.
func (s *extSet) addRange(first, last uint32) {
	for e := uint64(first); e <= uint64(last); {
		i := e >> 6
		hi := min(uint64(last), i<<6+63) & 63
		mask := (^uint64(0) >> (63 - hi)) &^ (uint64(1)<<(e&63) - 1)
		if s.w[i].Load()&mask != mask {
			s.w[i].Or(mask)
		}
		e = (i + 1) << 6
	}
}

// forEachRun calls fn for each maximal run [first, last] of members in
// increasing order, a word per 64 extents.
func (s *extSet) forEachRun(fn func(first, last uint32)) {
	end := uint64(len(s.w)) << 6
	for e := uint64(0); e < end; {
		f := s.nextSet(e, end-1)
		if f >= end {
			return
		}
		l := s.nextClear(f, end-1) // one past the run
		fn(uint32(f), uint32(l-1))
		e = l
	}
}

func (s *extSet) add(e uint32) {
	s.w[e>>6].Or(1 << (e & 63))
}

// count is the number of members.
func (s *extSet) count() int {
	n := 0
	for i := range s.w {
		n += bits.OnesCount64(s.w[i].Load())
	}
	return n
}

// addRegionsTo sets in dst every region of every member extent.
func (s *extSet) addRegionsTo(g *geometry, dst *roaring.Bitmap) {
	s.forEachRun(func(first, last uint32) {
		g.addExtentRegions(first, last, dst)
	})
}
