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
	for e := first; ; e++ {
		if !s.has(e) {
			return false
		}
		if e == last {
			return true
		}
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

// forEach calls fn for each member in increasing order.
func (s *extSet) forEach(fn func(e uint32)) {
	for i := range s.w {
		v := s.w[i].Load()
		for v != 0 {
			b := bits.TrailingZeros64(v)
			fn(uint32(i*64 + b))
			v &= v - 1
		}
	}
}

// addRegionsTo sets in dst every region of every member extent.
func (s *extSet) addRegionsTo(g *geometry, dst *roaring.Bitmap) {
	s.forEach(func(e uint32) {
		lo, hi := g.extentRegions(e)
		dst.AddRange(lo, hi)
	})
}
