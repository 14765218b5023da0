package main

import (
	"bytes"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestDiffRegions(t *testing.T) {
	for _, tt := range []struct {
		name  string
		first uint32
		a, b  []string
		want  []uint32
	}{
		{"equal", 10, []string{"x", "y"}, []string{"x", "y"}, nil},
		{"one differs", 10, []string{"x", "y", "z"}, []string{"x", "Y", "z"}, []uint32{11}},
		{"all differ", 0, []string{"a", "b"}, []string{"c", "d"}, []uint32{0, 1}},
		{"short answer counts as differing", 4, []string{"a", "b", "c"}, []string{"a"}, []uint32{5, 6}},
	} {
		if got := diffRegions(tt.first, tt.a, tt.b); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: diffRegions = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestRecheckWindows(t *testing.T) {
	for _, tt := range []struct {
		name    string
		regions []uint32
		batch   uint32
		want    [][2]uint32
	}{
		{"none", nil, 8, nil},
		{"one", []uint32{42}, 8, [][2]uint32{{42, 1}}},
		{"close ones share a window", []uint32{1, 3, 8}, 8, [][2]uint32{{1, 8}}},
		{"window limit", []uint32{1, 3, 9}, 8, [][2]uint32{{1, 3}, {9, 1}}},
		{"batch of one", []uint32{5, 6}, 1, [][2]uint32{{5, 1}, {6, 1}}},
		{"long run split", []uint32{0, 1, 2, 3, 4}, 2, [][2]uint32{{0, 2}, {2, 2}, {4, 1}}},
		{"top of the range", []uint32{1<<32 - 2, 1<<32 - 1}, 4096, [][2]uint32{{1<<32 - 2, 2}}},
	} {
		got := recheckWindows(tt.regions, tt.batch)
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: recheckWindows = %v, want %v", tt.name, got, tt.want)
		}
		// Every region is covered, no window is larger than the batch.
		for _, r := range tt.regions {
			covered := false
			for _, w := range got {
				covered = covered || (w[0] <= r && uint64(r) < uint64(w[0])+uint64(w[1]))
			}
			if !covered {
				t.Errorf("%s: region %d not covered by %v", tt.name, r, got)
			}
		}
		for _, w := range got {
			if w[1] > tt.batch {
				t.Errorf("%s: window %v larger than batch %d", tt.name, w, tt.batch)
			}
		}
	}
}

func TestSplitDirty(t *testing.T) {
	for _, tt := range []struct {
		name           string
		regions        []uint32
		runs           [][2]uint32
		bad, dirtyWant []uint32
	}{
		{"no bitmaps", []uint32{1, 2}, nil, []uint32{1, 2}, nil},
		{"one run", []uint32{1, 5, 6, 9}, [][2]uint32{{5, 6}}, []uint32{1, 9}, []uint32{5, 6}},
		{"runs of both members, overlapping, unsorted", []uint32{0, 3, 7, 10, 20},
			[][2]uint32{{9, 12}, {2, 3}, {3, 4}, {18, 19}}, []uint32{0, 7, 20}, []uint32{3, 10}},
		{"edges", []uint32{4, 5, 8, 9}, [][2]uint32{{5, 8}}, []uint32{4, 9}, []uint32{5, 8}},
		{"top region", []uint32{1<<32 - 1}, [][2]uint32{{1<<32 - 3, 1<<32 - 1}}, nil, []uint32{1<<32 - 1}},
	} {
		bad, dirty := splitDirty(tt.regions, tt.runs...)
		if !reflect.DeepEqual(bad, tt.bad) || !reflect.DeepEqual(dirty, tt.dirtyWant) {
			t.Errorf("%s: splitDirty = bad %v dirty %v, want bad %v dirty %v", tt.name, bad, dirty, tt.bad, tt.dirtyWant)
		}
	}
	for _, tt := range []struct {
		s    float64
		want string
	}{{0.04, "0.0s"}, {3.46, "3.5s"}, {59.9, "59.9s"}, {192, "3m12s"}} {
		if got := elapsed(tt.s); got != tt.want {
			t.Errorf("elapsed(%v) = %q, want %q", tt.s, got, tt.want)
		}
	}
	if got := normalizeRuns([][2]uint32{{7, 9}, {1, 2}, {3, 4}, {8, 8}, {5, 4}}); !reflect.DeepEqual(got, [][2]uint32{{1, 4}, {7, 9}}) {
		t.Errorf("normalizeRuns = %v", got)
	}
	if got := intersectSorted([]uint32{1, 2, 5, 9}, []uint32{2, 3, 9}); !reflect.DeepEqual(got, []uint32{2, 9}) {
		t.Errorf("intersectSorted = %v", got)
	}
}

func TestAutoBatch(t *testing.T) {
	for _, tt := range []struct {
		rs   int64
		want uint32
	}{
		{4 << 10, 4096},
		{64 << 10, 4096},
		{1 << 20, 256},
		{64 << 20, 4},
		{1 << 30, 1},
	} {
		if got := autoBatch(tt.rs); got != tt.want {
			t.Errorf("autoBatch(%d) = %d, want %d", tt.rs, got, tt.want)
		}
	}
}

func TestRenderVerify(t *testing.T) {
	base := verifyReport{Volume: "prod/db", Nodes: []string{"node-a", "node-b"}, SizeBytes: 1 << 30, RegionSize: 64 << 10, Regions: 16384, Algorithm: "sha256", Seconds: 3.4}
	same := base
	same.SettledRegions = 2
	same.DirtyRegions = 1
	same.Notes = []string{"the pair is in SWAP: x"}
	differ := base
	differ.DifferingRegions, differ.DifferingBytes = 3, 3*64<<10
	differ.Runs = mergeRuns([]uint32{5, 6, 100}, 64<<10)
	many := base
	for i := range 150 {
		many.Runs = append(many.Runs, regionRun{FirstRegion: uint32(2 * i), LastRegion: uint32(2 * i), Offset: int64(2*i) * 64 << 10, Length: 64 << 10})
	}
	many.DifferingRegions = 150
	many.DifferingBytes = 150 * 64 << 10

	for _, tt := range []struct {
		name string
		rep  verifyReport
		want []string
	}{
		{"identical", same, []string{
			"Verified prod/db on node-a and node-b: 1 GiB in 16384 regions of 64 KiB (sha256), 3.4s.",
			"No differing regions: the replicas match.",
			"2 regions differed while being written and matched when checked again.",
			"1 region in a dirty bitmap (not yet replicated, as expected) also differed; not counted.",
			"Note: the pair is in SWAP: x.",
		}},
		{"differing", differ, []string{
			"DIFFERING REGIONS: 3 (192 KiB) in 2 runs:",
			"  regions 5-6, bytes 327680-458751 (128 KiB)",
			"  region 100, bytes 6553600-6619135 (64 KiB)",
		}},
		{"many runs are cut", many, []string{
			"DIFFERING REGIONS: 150 (9.4 MiB) in 150 runs:",
			"  region 198, bytes 12976128-13041663 (64 KiB)",
			"  ... and 50 more runs (-o json lists them all)",
		}},
	} {
		var buf bytes.Buffer
		if err := renderVerify(&buf, &tt.rep); err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(buf.String(), "\n")
		for _, w := range tt.want {
			found := false
			for _, l := range lines {
				found = found || l == w
			}
			if !found {
				t.Errorf("%s: missing line %q in:\n%s", tt.name, w, buf.String())
			}
		}
		if tt.name == "many runs are cut" && strings.Contains(buf.String(), fmt.Sprintf("region %d,", 200)) {
			t.Errorf("run 101 printed although the text report is capped at %d runs", maxTextRuns)
		}
	}
}
