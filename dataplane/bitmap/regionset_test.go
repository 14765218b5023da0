package bitmap

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
)

func TestRegionSetRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "unmerged")
	if bm, err := ReadRegionSet(p, 1<<30, 64<<10); err != nil || !bm.IsEmpty() {
		t.Fatalf("missing file: %v, %v; want an empty set", bm, err)
	}
	want := roaring.BitmapOf(0, 7, 8, 16383)
	if err := WriteRegionSet(p, 1<<30, 64<<10, want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRegionSet(p, 1<<30, 64<<10)
	if err != nil || !got.Equals(want) {
		t.Fatalf("read back %v, %v; want %v", got, err, want)
	}
	if err := WriteRegionSet(p, 1<<30, 64<<10, roaring.BitmapOf(16384)); err == nil {
		t.Fatal("a region outside the volume was written")
	}
	if _, err := ReadRegionSet(p, 1<<30, 128<<10); !errors.Is(err, ErrGeometry) {
		t.Fatalf("another region size: %v", err)
	}
	// A grown volume reads the set as it was; a file of a larger volume (a
	// grow that crashed before its metadata) is clipped to the volume.
	if got, err := ReadRegionSet(p, 2<<30, 64<<10); err != nil || !got.Equals(want) {
		t.Fatalf("read at a larger size: %v, %v; want %v", got, err, want)
	}
	if got, err := ReadRegionSet(p, 8<<20+1, 64<<10); err != nil || !got.Equals(roaring.BitmapOf(0, 7, 8)) {
		t.Fatalf("read at a smaller size: %v, %v; want 0, 7, 8", got, err)
	}
	b, _ := os.ReadFile(p)
	b[len(b)-1] ^= 0xff
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadRegionSet(p, 1<<30, 64<<10); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("damaged file: %v", err)
	}
}
