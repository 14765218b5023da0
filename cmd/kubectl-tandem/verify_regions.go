package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// autoBatch is the number of regions that make about bytesPerCall.
func autoBatch(regionSize int64) uint32 {
	return uint32(min(max(bytesPerCall/regionSize, 1), agentapi.MaxChecksumRegions))
}

// compareWindow hashes regions [first, first+n) on both members at once and
// returns the regions whose sums differ.
func compareWindow(ctx context.Context, reps []*replica, ns, name string, first, n uint32) ([]uint32, error) {
	var wg sync.WaitGroup
	sums := make([][]string, len(reps))
	errs := make([]error, len(reps))
	for i, r := range reps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := r.c.Checksums(ctx, ns, name, first, n)
			if err != nil {
				errs[i] = fmt.Errorf("checksums of regions [%d, +%d) on node %s: %w", first, n, r.node, err)
				return
			}
			sums[i] = s.Sums
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	// A region differs when any replica's differs from the first's.
	var out []uint32
	for _, other := range sums[1:] {
		out = append(out, diffRegions(first, sums[0], other)...)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// diffRegions returns first+i for every i where a[i] and b[i] differ (a
// region missing on one side differs).
func diffRegions(first uint32, a, b []string) []uint32 {
	var out []uint32
	for i := range max(len(a), len(b)) {
		if i >= len(a) || i >= len(b) || a[i] != b[i] {
			out = append(out, first+uint32(i))
		}
	}
	return out
}

// recheckWindows covers the sorted regions with windows {first, count} of at
// most batch regions, each starting at a region to re-check and ending at
// the last one it holds; a gap inside a window is hashed too, so re-checking
// never costs more calls than the first pass.
func recheckWindows(regions []uint32, batch uint32) [][2]uint32 {
	var out [][2]uint32
	for i := 0; i < len(regions); {
		first := regions[i]
		j := i
		for j+1 < len(regions) && uint64(regions[j+1]) < uint64(first)+uint64(batch) {
			j++
		}
		out = append(out, [2]uint32{first, regions[j] - first + 1})
		i = j + 1
	}
	return out
}

// intersectSorted returns the elements of a that are in b (both sorted).
func intersectSorted(a, b []uint32) []uint32 {
	var out []uint32
	for _, x := range a {
		if _, ok := slices.BinarySearch(b, x); ok {
			out = append(out, x)
		}
	}
	return out
}

// dirtyRuns reads both members' dirty bitmaps as inclusive runs.
func dirtyRuns(ctx context.Context, reps []*replica, ns, name string) ([][2]uint32, error) {
	var out [][2]uint32
	for _, r := range reps {
		b, err := r.c.Bitmap(ctx, ns, name)
		if err != nil {
			return nil, fmt.Errorf("dirty bitmap of %s/%s on node %s: %w", ns, name, r.node, err)
		}
		out = append(out, b.Runs...)
	}
	return out, nil
}

// splitDirty separates regions covered by any of the inclusive runs (dirty)
// from the others (bad). The runs may overlap and come in any order.
func splitDirty(regions []uint32, runs ...[2]uint32) (bad, dirty []uint32) {
	merged := normalizeRuns(runs)
	for _, r := range regions {
		// The last run starting at or before r is the only one that can hold it.
		i, _ := slices.BinarySearchFunc(merged, r, func(run [2]uint32, x uint32) int {
			if run[0] <= x {
				return -1
			}
			return 1
		})
		if i > 0 && r <= merged[i-1][1] {
			dirty = append(dirty, r)
		} else {
			bad = append(bad, r)
		}
	}
	return bad, dirty
}

// normalizeRuns sorts inclusive runs and merges those that overlap or touch.
func normalizeRuns(runs [][2]uint32) [][2]uint32 {
	rs := slices.Clone(runs)
	slices.SortFunc(rs, func(a, b [2]uint32) int { return cmp.Compare(a[0], b[0]) })
	var out [][2]uint32
	for _, r := range rs {
		if r[1] < r[0] {
			continue
		}
		if n := len(out); n > 0 && uint64(r[0]) <= uint64(out[n-1][1])+1 {
			out[n-1][1] = max(out[n-1][1], r[1])
			continue
		}
		out = append(out, r)
	}
	return out
}
