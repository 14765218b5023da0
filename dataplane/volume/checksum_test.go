package volume_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"syscall"
	"testing"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

func TestRegionChecksums(t *testing.T) {
	m := newMember(t, "a") // fenced (role None): checksums read the store anyway
	rng := rand.New(rand.NewPCG(5, 6))
	img := make([]byte, size)
	for _, w := range []struct{ off, n int }{{7*region + 100, 3000}, {200 * region, region}, {255*region + region - 1, 1}} {
		p := img[w.off : w.off+w.n]
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if _, err := m.st.WriteAt(p, int64(w.off)); err != nil {
			t.Fatal(err)
		}
	}
	want := func(r int) [32]byte { return sha256.Sum256(img[r*region : (r+1)*region]) }
	zero := sha256.Sum256(make([]byte, region))

	all, err := m.v.RegionChecksums(context.Background(), 0, size/region)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != size/region {
		t.Fatalf("got %d sums, want %d", len(all), size/region)
	}
	for r := range all {
		if all[r] != want(r) {
			t.Errorf("region %d: sum %x, want %x", r, all[r], want(r))
		}
		written := r == 7 || r == 200 || r == 255
		if (all[r] != zero) != written {
			t.Errorf("region %d: differs from a zero region = %v, want %v", r, all[r] != zero, written)
		}
	}

	// A window is the same slice of the whole, in any role.
	if err := m.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	part, err := m.v.RegionChecksums(context.Background(), 5, 3)
	if err != nil {
		t.Fatal(err)
	}
	for i := range part {
		if part[i] != all[5+i] {
			t.Errorf("window region %d differs from the full pass", 5+i)
		}
	}

	cases := []struct {
		name         string
		first, count uint32
		wantErr      error
		wantLen      int
	}{
		{"empty at the end", size / region, 0, nil, 0},
		{"last region", size/region - 1, 1, nil, 1},
		{"past the end", size/region - 6, 7, syscall.EINVAL, 0},
		{"first past the end", size/region + 1, 0, syscall.EINVAL, 0},
		{"huge first does not wrap", 1<<32 - 1, 2, syscall.EINVAL, 0},
		{"more than one call allows", 0, volume.MaxChecksumRegions + 1, syscall.EINVAL, 0},
	}
	for _, tc := range cases {
		got, err := m.v.RegionChecksums(context.Background(), tc.first, tc.count)
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("%s: err = %v, want %v", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil || len(got) != tc.wantLen {
			t.Errorf("%s: %d sums, err %v; want %d sums", tc.name, len(got), err, tc.wantLen)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.v.RegionChecksums(ctx, 0, 16); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: err = %v, want context.Canceled", err)
	}
}

// TestRegionChecksumsLargeRegions: regions bigger than the read buffer are
// hashed in pieces, and the sum is still that of the whole region.
func TestRegionChecksumsLargeRegions(t *testing.T) {
	const rs, sz = 4 << 20, 16 << 20
	st := store.NewMem(sz)
	v, err := volume.Open(volume.Options{Name: "ns/big", Node: "a", Dir: t.TempDir(), Size: sz, RegionSize: rs, Store: st, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Error(err)
		}
	})
	img := make([]byte, sz)
	for _, off := range []int{rs + 3<<20 + 5, 3*rs - 1} {
		img[off] = 0xa5
		if _, err := st.WriteAt(img[off:off+1], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	sums, err := v.RegionChecksums(context.Background(), 0, sz/rs)
	if err != nil {
		t.Fatal(err)
	}
	for r := range sums {
		if want := sha256.Sum256(img[r*rs : (r+1)*rs]); sums[r] != want {
			t.Errorf("region %d: sum %x, want %x", r, sums[r], want)
		}
	}
	if sums[0] != sums[3] || sums[1] == sums[0] || sums[2] == sums[0] || sums[1] == sums[2] {
		t.Errorf("zero regions 0 and 3 must match each other and differ from written regions 1 and 2")
	}
}
