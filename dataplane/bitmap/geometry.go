package bitmap

import (
	"fmt"
	"math"
	"math/bits"

	"github.com/RoaringBitmap/roaring/v2"
)

// DefaultExtentSize is the write-intent extent used when OpenJournal is given
// an extentSize of 0 (or one smaller than the region size).
const DefaultExtentSize int64 = 4 << 20

// MaxDefaultExtents bounds the extents of the default extent size: the
// journal keeps two dense sets of extents (marked, written) of a bit each,
// and a checkpoint builds a new pair, so 2^26 extents cost 8 MiB per set. It
// is the extents of the largest volume of the default 64Ki regions (256Ti -
// 64Ki in 4Mi extents); a larger volume gets larger extents rather than,
// at 2^32 extents (256Pi - 64Mi in 64Mi regions), 512 MiB per set.
const MaxDefaultExtents = 1 << 26

// ExtentSizeFor is the default write-intent extent of a volume of size bytes
// in regionSize regions: DefaultExtentSize, or regionSize if larger, doubled
// until the volume has at most MaxDefaultExtents extents.
func ExtentSizeFor(size, regionSize int64) int64 {
	e := max(DefaultExtentSize, regionSize)
	for e < 1<<62 && ceilDiv(size, e) > MaxDefaultExtents {
		e <<= 1
	}
	return e
}

// MinRegionSize is the smallest region size accepted (one sector).
const MinRegionSize int64 = 512

// MaxRegions is the largest number of regions one bitmap can track: region
// numbers are roaring's uint32 values and Regions() must fit a uint32.
const MaxRegions = math.MaxUint32

// geometry is the validated shape of one replica's dirty tracking.
type geometry struct {
	size        int64 // volume size in bytes
	regionSize  int64 // bytes per bitmap bit, power of two
	extentSize  int64 // bytes per write-intent extent, power-of-two multiple of regionSize
	regionShift uint  // log2(regionSize)
	extentShift uint  // log2(extentSize)
	regions     uint32
	extents     uint32
}

// ValidateGeometry reports whether size, regionSize and extentSize describe a
// volume this package can track. Pass extentSize 0 to check only size and
// regionSize. NewTracker panics on geometry that fails this check, so callers
// holding user-supplied values should call it first.
func ValidateGeometry(size, regionSize, extentSize int64) error {
	_, err := newGeometry(size, regionSize, extentSize)
	return err
}

func newGeometry(size, regionSize, extentSize int64) (geometry, error) {
	var g geometry
	if size <= 0 {
		return g, fmt.Errorf("volume size %d: must be positive", size)
	}
	if regionSize < MinRegionSize || !isPow2(regionSize) {
		return g, fmt.Errorf("region size %d: must be a power of two >= %d", regionSize, MinRegionSize)
	}
	regions := ceilDiv(size, regionSize)
	if regions > MaxRegions {
		return g, fmt.Errorf("volume size %d with region size %d: %d regions exceed the limit of %d", size, regionSize, regions, int64(MaxRegions))
	}
	if extentSize == 0 {
		extentSize = regionSize
	}
	if extentSize < regionSize || !isPow2(extentSize) {
		return g, fmt.Errorf("extent size %d: must be a power of two >= region size %d", extentSize, regionSize)
	}
	g = geometry{
		size:        size,
		regionSize:  regionSize,
		extentSize:  extentSize,
		regionShift: uint(bits.TrailingZeros64(uint64(regionSize))),
		extentShift: uint(bits.TrailingZeros64(uint64(extentSize))),
		regions:     uint32(regions),
		extents:     uint32(ceilDiv(size, extentSize)),
	}
	return g, nil
}

// byteRange clamps [off, off+n) to the volume and returns the first and last
// byte offsets (inclusive). ok is false if nothing of the range lies inside.
func (g *geometry) byteRange(off, n int64) (first, last int64, ok bool) {
	if n <= 0 || off < 0 || off >= g.size {
		return 0, 0, false
	}
	if n > g.size-off { // also avoids overflow of off+n
		n = g.size - off
	}
	return off, off + n - 1, true
}

// regionRange returns the regions touched by [off, off+n).
func (g *geometry) regionRange(off, n int64) (first, last uint32, ok bool) {
	a, b, ok := g.byteRange(off, n)
	if !ok {
		return 0, 0, false
	}
	return uint32(a >> g.regionShift), uint32(b >> g.regionShift), true
}

// extentRange returns the extents touched by [off, off+n).
func (g *geometry) extentRange(off, n int64) (first, last uint32, ok bool) {
	a, b, ok := g.byteRange(off, n)
	if !ok {
		return 0, 0, false
	}
	return uint32(a >> g.extentShift), uint32(b >> g.extentShift), true
}

// extentRegions returns the half-open region interval [lo, hi) covered by
// extent e, clipped to the volume.
func (g *geometry) extentRegions(e uint32) (lo, hi uint64) {
	shift := g.extentShift - g.regionShift
	lo = uint64(e) << shift
	hi = lo + 1<<shift
	if hi > uint64(g.regions) {
		hi = uint64(g.regions)
	}
	return lo, hi
}

// addExtentRegions sets in dst every region of extents first..last.
func (g *geometry) addExtentRegions(first, last uint32, dst *roaring.Bitmap) {
	lo, _ := g.extentRegions(first)
	_, hi := g.extentRegions(last)
	if lo < hi { // extents past the end (a log of a larger volume) add nothing
		dst.AddRange(lo, hi)
	}
}

// lastRegionShort is how many bytes the last region lacks of a full region.
func (g *geometry) lastRegionShort() int64 {
	return int64(g.regions)*g.regionSize - g.size
}

func isPow2(v int64) bool { return v > 0 && v&(v-1) == 0 }

func ceilDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 {
		q++
	}
	return q
}
