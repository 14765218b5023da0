package bitmap

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
)

// naiveRuns are b's maximal runs, one value at a time.
func naiveRuns(b *roaring.Bitmap) [][2]uint32 {
	var out [][2]uint32
	b.Iterate(func(v uint32) bool {
		if n := len(out); n > 0 && out[n-1][1]+1 == v {
			out[n-1][1] = v
		} else {
			out = append(out, [2]uint32{v, v})
		}
		return true
	})
	return out
}

func runsOf(t *testing.T, b *roaring.Bitmap) [][2]uint32 {
	t.Helper()
	var out [][2]uint32
	if err := ForEachRun(b, func(first, last uint32) error {
		out = append(out, [2]uint32{first, last})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestForEachRun compares ForEachRun with value-by-value runs on random
// bitmaps (singletons, runs across container boundaries, bitmap and run
// containers), and checks the ends of the 32-bit range.
func TestForEachRun(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 1))
	for trial := range 200 {
		b := roaring.New()
		for range rng.IntN(50) {
			lo := rng.Uint64N(1 << 22)
			b.AddRange(lo, lo+1+rng.Uint64N(1<<rng.UintN(18)))
		}
		for range rng.IntN(2000) {
			b.Add(rng.Uint32N(1 << 22))
		}
		if trial%2 == 0 {
			b.RunOptimize()
		}
		if got, want := runsOf(t, b), naiveRuns(b); !slices.Equal(got, want) {
			t.Fatalf("trial %d: ForEachRun = %d runs, want %d (first difference at %v)", trial, len(got), len(want), firstDiff(got, want))
		}
	}
	for _, tc := range []struct {
		name string
		b    *roaring.Bitmap
		want [][2]uint32
	}{
		{"empty", roaring.New(), nil},
		{"every region of the largest volume", rangeOf(0, MaxRegions), [][2]uint32{{0, MaxRegions - 1}}},
		{"every 32-bit value", rangeOf(0, 1<<32), [][2]uint32{{0, 1<<32 - 1}}},
		{"the last region alone", rangeOf(MaxRegions-1, MaxRegions), [][2]uint32{{MaxRegions - 1, MaxRegions - 1}}},
		{"two runs", func() *roaring.Bitmap { b := rangeOf(0, 1<<20); b.AddRange(1<<20+1, 1<<31); return b }(),
			[][2]uint32{{0, 1<<20 - 1}, {1<<20 + 1, 1<<31 - 1}}},
	} {
		if got := runsOf(t, tc.b); !slices.Equal(got, tc.want) {
			t.Errorf("%s: ForEachRun = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func rangeOf(lo, hi uint64) *roaring.Bitmap {
	b := roaring.New()
	b.AddRange(lo, hi)
	return b
}

func firstDiff(a, b [][2]uint32) any {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return [2][2]uint32{a[i], b[i]}
		}
	}
	return "length"
}

// TestExtSetWords checks extSet's word-at-a-time operations (addRange,
// nextClear, nextSet, hasRange, forEachRun) against a plain set.
func TestExtSetWords(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 2))
	const extents = 1000
	for trial := range 300 {
		s := newExtSet(extents)
		in := make([]bool, extents)
		for range rng.IntN(20) {
			a := rng.Uint32N(extents)
			z := min(extents-1, a+rng.Uint32N(1<<rng.UintN(8)))
			if rng.IntN(3) == 0 {
				s.add(a)
				in[a] = true
				continue
			}
			s.addRange(a, z)
			for e := a; e <= z; e++ {
				in[e] = true
			}
		}
		for e := range uint32(extents) {
			if s.has(e) != in[e] {
				t.Fatalf("trial %d: has(%d) = %v, want %v", trial, e, s.has(e), in[e])
			}
		}
		for range 50 {
			a := rng.Uint64N(extents)
			z := a + rng.Uint64N(extents-a)
			wantClear, wantSet := z+1, z+1
			all := true
			for e := a; e <= z; e++ {
				if !in[e] && wantClear > z {
					wantClear = e
				}
				if in[e] && wantSet > z {
					wantSet = e
				}
				all = all && in[e]
			}
			if got := s.nextClear(a, z); got != wantClear {
				t.Fatalf("trial %d: nextClear(%d, %d) = %d, want %d", trial, a, z, got, wantClear)
			}
			if got := s.nextSet(a, z); got != wantSet {
				t.Fatalf("trial %d: nextSet(%d, %d) = %d, want %d", trial, a, z, got, wantSet)
			}
			if got := s.hasRange(uint32(a), uint32(z)); got != all {
				t.Fatalf("trial %d: hasRange(%d, %d) = %v, want %v", trial, a, z, got, all)
			}
		}
		want := roaring.New()
		for e, ok := range in {
			if ok {
				want.Add(uint32(e))
			}
		}
		var got [][2]uint32
		s.forEachRun(func(first, last uint32) { got = append(got, [2]uint32{first, last}) })
		if w := naiveRuns(want); !slices.Equal(got, w) {
			t.Fatalf("trial %d: forEachRun = %v, want %v", trial, got, w)
		}
		if s.count() != int(want.GetCardinality()) {
			t.Fatalf("trial %d: count = %d, want %d", trial, s.count(), want.GetCardinality())
		}
	}
}

// TestExtentSizeFor: 4 MiB extents (or a region, if larger) up to 2^26 of
// them, so no volume of the default 64Ki regions changes; larger volumes
// get larger extents, never more than MaxDefaultExtents.
func TestExtentSizeFor(t *testing.T) {
	for _, tc := range []struct{ size, region, want int64 }{
		{1 << 30, 64 << 10, DefaultExtentSize},
		{MaxRegions * (64 << 10), 64 << 10, DefaultExtentSize},
		{MaxRegions * 4096, 4096, DefaultExtentSize},
		{64 << 20, 64 << 20, 64 << 20},
		{1 << 48, 128 << 10, DefaultExtentSize}, // 256Ti: 2^26 extents of 4Mi
		{1<<48 + 128<<10, 128 << 10, 8 << 20},   // one region more
		{MaxRegions * (64 << 20), 64 << 20, 4 << 30},
	} {
		got := ExtentSizeFor(tc.size, tc.region)
		if got != tc.want {
			t.Errorf("ExtentSizeFor(%d, %d) = %d, want %d", tc.size, tc.region, got, tc.want)
		}
		if err := ValidateGeometry(tc.size, tc.region, got); err != nil {
			t.Errorf("ExtentSizeFor(%d, %d) = %d: %v", tc.size, tc.region, got, err)
		}
		if n := ceilDiv(tc.size, got); n > MaxDefaultExtents {
			t.Errorf("ExtentSizeFor(%d, %d): %d extents", tc.size, tc.region, n)
		}
	}
}
