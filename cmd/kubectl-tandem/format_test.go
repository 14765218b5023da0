package main

import (
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func TestHumanBytes(t *testing.T) {
	for _, tt := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{1536, "1.5 KiB"},
		{1025, "1.0 KiB"},
		{64 << 10, "64 KiB"},
		{1<<20 - 1, "1.0 MiB"}, // rounds up into the next unit, never "1024.0 KiB"
		{12 << 20, "12 MiB"},
		{12<<20 + 1, "12.0 MiB"},
		{3 << 29, "1.5 GiB"},
		{1 << 40, "1 TiB"},
		{1023 << 40, "1023 TiB"},
		{1 << 60, "1 EiB"},
		{math.MaxInt64, "8.0 EiB"},
		{-2048, "-2 KiB"},
		{math.MinInt64, "-8 EiB"},
	} {
		if got := humanBytes(tt.n); got != tt.want {
			t.Errorf("humanBytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
	if got := humanRate(2 << 20); got != "2 MiB/s" {
		t.Errorf("humanRate = %q", got)
	}
}

func TestHumanDuration(t *testing.T) {
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{-time.Hour, "0s"},
		{0, "0s"},
		{999 * time.Millisecond, "0s"},
		{45 * time.Second, "45s"},
		{60 * time.Second, "1m"},
		{3*time.Minute + 12*time.Second, "3m12s"},
		{2*time.Hour + 5*time.Minute + 59*time.Second, "2h5m"},
		{5 * time.Hour, "5h"},
		{3*24*time.Hour + 4*time.Hour + 30*time.Minute, "3d4h"},
		{400 * 24 * time.Hour, "400d"},
	} {
		if got := humanDuration(tt.d); got != tt.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func TestCopyETA(t *testing.T) {
	for _, tt := range []struct {
		name   string
		cp     storagev1alpha1.CopyProgress
		want   time.Duration
		wantOK bool
	}{
		{"controller's estimate wins", storagev1alpha1.CopyProgress{TotalBytes: 100 << 20, DoneBytes: 50 << 20, BytesPerSecond: 1 << 20, ETASeconds: 7}, 7 * time.Second, true},
		{"computed from the rate, rounded up", storagev1alpha1.CopyProgress{TotalBytes: 10 << 20, DoneBytes: 5 << 20, BytesPerSecond: 2 << 20}, 3 * time.Second, true},
		{"finished", storagev1alpha1.CopyProgress{TotalBytes: 10, DoneBytes: 10, ETASeconds: 4}, 0, true},
		{"no rate yet", storagev1alpha1.CopyProgress{TotalBytes: 10 << 20}, 0, false},
		{"no total yet", storagev1alpha1.CopyProgress{BytesPerSecond: 100}, 0, false},
	} {
		got, ok := copyETA(&tt.cp)
		if got != tt.want || ok != tt.wantOK {
			t.Errorf("%s: copyETA = %v, %v; want %v, %v", tt.name, got, ok, tt.want, tt.wantOK)
		}
	}
}

func TestCopyLine(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	start := metav1.NewTime(now.Add(-90 * time.Second))
	for _, tt := range []struct {
		name string
		cp   storagev1alpha1.CopyProgress
		want string
	}{
		{"running", storagev1alpha1.CopyProgress{Target: "node-a", TotalBytes: 12 << 20, DoneBytes: 3 << 20, BytesPerSecond: 1 << 20, StartTime: &start},
			"to node-a: 3 MiB of 12 MiB (25.0%), 1 MiB/s, ETA 9s, started 1m30s ago"},
		{"starting", storagev1alpha1.CopyProgress{Target: "node-b"},
			"to node-b: 0 B copied, total not known yet, rate not known yet"},
		{"full copy", storagev1alpha1.CopyProgress{Target: "node-b", TotalBytes: 1 << 30, DoneBytes: 1 << 29, BytesPerSecond: 1 << 28, FullCopy: true},
			"to node-b: 512 MiB of 1 GiB (50.0%), 256 MiB/s, ETA 2s, FULL COPY (the bitmaps were lost)"},
	} {
		if got := copyLine(&tt.cp, now); got != tt.want {
			t.Errorf("%s:\n got %q\nwant %q", tt.name, got, tt.want)
		}
	}
}

func TestMergeRuns(t *testing.T) {
	const rs = 64 << 10
	for _, tt := range []struct {
		name    string
		regions []uint32
		want    []regionRun
	}{
		{"none", nil, nil},
		{"one", []uint32{5}, []regionRun{{5, 5, 5 * rs, rs}}},
		{"consecutive", []uint32{5, 6, 7}, []regionRun{{5, 7, 5 * rs, 3 * rs}}},
		{"unsorted with duplicates", []uint32{9, 1, 2, 9, 0, 10}, []regionRun{{0, 2, 0, 3 * rs}, {9, 10, 9 * rs, 2 * rs}}},
		{"gap of one", []uint32{1, 3}, []regionRun{{1, 1, rs, rs}, {3, 3, 3 * rs, rs}}},
		{"last region of a huge volume", []uint32{math.MaxUint32}, []regionRun{{math.MaxUint32, math.MaxUint32, math.MaxUint32 * rs, rs}}},
	} {
		if got := mergeRuns(tt.regions, rs); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: mergeRuns = %+v, want %+v", tt.name, got, tt.want)
		}
	}
	r := regionRun{FirstRegion: 5, LastRegion: 7, Offset: 5 * rs, Length: 3 * rs}
	if got, want := r.String(), "regions 5-7, bytes 327680-524287 (192 KiB)"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	r = regionRun{FirstRegion: 5, LastRegion: 5, Offset: 5 * rs, Length: rs}
	if got, want := r.String(), "region 5, bytes 327680-393215 (64 KiB)"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
}

func TestTimestamp(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	tm := metav1.NewTime(now.Add(-5 * time.Minute).In(time.FixedZone("X", 3600)))
	if got, want := timestamp(&tm, now), "2026-05-01T11:55:00Z (5m ago)"; got != want {
		t.Errorf("timestamp = %q, want %q", got, want)
	}
	if got := timestamp(nil, now); got != "never" {
		t.Errorf("timestamp(nil) = %q", got)
	}
	if got := oneLine("a\n  b\tc "); got != "a b c" {
		t.Errorf("oneLine = %q", got)
	}
	if !strings.HasPrefix(ago(&tm, now), "5m") {
		t.Errorf("ago = %q", ago(&tm, now))
	}
}
