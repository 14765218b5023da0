package store

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

// impl opens a fresh, all-zero Store of the given size for a conformance run.
type impl struct {
	name string
	open func(t *testing.T, size int64) Store
}

func openTestFile(t *testing.T, size int64) *File {
	t.Helper()
	f, err := OpenFile(filepath.Join(t.TempDir(), "replica"), size, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

func implementations() []impl {
	return []impl{
		{"File", func(t *testing.T, size int64) Store { return openTestFile(t, size) }},
		{"File/no-fallocate", func(t *testing.T, size int64) Store {
			// Exercises the zero-writing fallbacks of Punch and Zero.
			f := openTestFile(t, size)
			f.noPunch.Store(true)
			f.noZeroRange.Store(true)
			return f
		}},
		{"File/sector-aligned", func(t *testing.T, size int64) Store {
			// Exercises the head/tail handling used for block devices.
			f := openTestFile(t, size)
			f.align = 4096
			return f
		}},
		{"Mem", func(t *testing.T, size int64) Store { return NewMem(size) }},
		{"Faulty(Mem)", func(t *testing.T, size int64) Store { return NewFaulty(NewMem(size)) }},
	}
}

// pattern fills n bytes that differ per offset and seed, never all zero.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed | 1
	}
	return b
}

func readAll(t *testing.T, s Store) []byte {
	t.Helper()
	b := make([]byte, s.Size())
	if n, err := s.ReadAt(b, 0); err != nil || n != len(b) {
		t.Fatalf("ReadAt whole store: n=%d err=%v", n, err)
	}
	return b
}

func TestConformance(t *testing.T) {
	for _, im := range implementations() {
		t.Run(im.name, func(t *testing.T) {
			t.Parallel()
			t.Run("Size", func(t *testing.T) { testSize(t, im) })
			t.Run("ReadsZerosWhenNew", func(t *testing.T) { testNewZeros(t, im) })
			t.Run("WriteRead", func(t *testing.T) { testWriteRead(t, im) })
			t.Run("OutOfRange", func(t *testing.T) { testOutOfRange(t, im) })
			t.Run("PunchZero", func(t *testing.T) { testPunchZero(t, im) })
			t.Run("RandomOpsMatchModel", func(t *testing.T) { testModel(t, im) })
			t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, im) })
			t.Run("Close", func(t *testing.T) { testClose(t, im) })
		})
	}
}

func testSize(t *testing.T, im impl) {
	for _, size := range []int64{1, 4096, 3*memPage + 17} {
		if got := im.open(t, size).Size(); got != size {
			t.Errorf("Size() = %d, want %d", got, size)
		}
	}
}

func testNewZeros(t *testing.T, im impl) {
	s := im.open(t, 1<<20)
	if b := readAll(t, s); !bytes.Equal(b, make([]byte, len(b))) {
		t.Fatal("a new store does not read as zeros")
	}
}

func testWriteRead(t *testing.T, im impl) {
	const size = 4*memPage + 1000
	cases := []struct {
		name string
		off  int64
		n    int
	}{
		{"first byte", 0, 1},
		{"one sector", 512, 512},
		{"unaligned", 4097, 3333},
		{"crosses page boundary", memPage - 10, 20},
		{"spans several pages", memPage / 2, 2*memPage + 5},
		{"last byte", size - 1, 1},
		{"up to the end", size - 5000, 5000},
		{"empty", 100, 0},
		{"empty at end", size, 0},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := im.open(t, size)
			want := pattern(byte(i), tc.n)
			if n, err := s.WriteAt(want, tc.off); err != nil || n != tc.n {
				t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", tc.n, tc.off, n, err)
			}
			got := make([]byte, tc.n)
			if n, err := s.ReadAt(got, tc.off); err != nil || n != tc.n {
				t.Fatalf("ReadAt(%d bytes, %d) = %d, %v", tc.n, tc.off, n, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("read back different bytes")
			}
			// Nothing outside the range changed.
			all := readAll(t, s)
			clear(all[tc.off : tc.off+int64(tc.n)])
			if !bytes.Equal(all, make([]byte, size)) {
				t.Fatal("bytes outside the written range changed")
			}
		})
	}
}

func testOutOfRange(t *testing.T, im impl) {
	const size = 8192
	cases := []struct {
		name string
		op   func(s Store) error
		want syscall.Errno
	}{
		{"read negative offset", func(s Store) error { _, err := s.ReadAt(make([]byte, 1), -1); return err }, syscall.EINVAL},
		{"read past end", func(s Store) error { _, err := s.ReadAt(make([]byte, 1), size); return err }, syscall.EINVAL},
		{"read straddling end", func(s Store) error { _, err := s.ReadAt(make([]byte, 2), size-1); return err }, syscall.EINVAL},
		{"read far past end", func(s Store) error { _, err := s.ReadAt(make([]byte, 1), math.MaxInt64); return err }, syscall.EINVAL},
		{"write negative offset", func(s Store) error { _, err := s.WriteAt([]byte{1}, -4096); return err }, syscall.EINVAL},
		{"write past end", func(s Store) error { _, err := s.WriteAt([]byte{1}, size); return err }, syscall.ENOSPC},
		{"write straddling end", func(s Store) error { _, err := s.WriteAt(pattern(1, 100), size-50); return err }, syscall.ENOSPC},
		{"write at max offset", func(s Store) error { _, err := s.WriteAt([]byte{1}, math.MaxInt64); return err }, syscall.ENOSPC},
		{"punch negative length", func(s Store) error { return s.Punch(0, -1) }, syscall.EINVAL},
		{"punch negative offset", func(s Store) error { return s.Punch(-1, 1) }, syscall.EINVAL},
		{"punch straddling end", func(s Store) error { return s.Punch(size-1, 2) }, syscall.ENOSPC},
		{"punch overflowing", func(s Store) error { return s.Punch(1, math.MaxInt64) }, syscall.ENOSPC},
		{"zero negative length", func(s Store) error { return s.Zero(10, -10) }, syscall.EINVAL},
		{"zero past end", func(s Store) error { return s.Zero(size, 1) }, syscall.ENOSPC},
		{"zero overflowing", func(s Store) error { return s.Zero(math.MaxInt64, math.MaxInt64) }, syscall.ENOSPC},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := im.open(t, size)
			if _, err := s.WriteAt(pattern(9, size), 0); err != nil {
				t.Fatal(err)
			}
			err := tc.op(s)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want one wrapping %v", err, tc.want)
			}
			if got := readAll(t, s); !bytes.Equal(got, pattern(9, size)) {
				t.Fatal("a refused operation changed the store")
			}
		})
	}
}

func testPunchZero(t *testing.T, im impl) {
	const size = 4*memPage + 4096
	type opFn func(Store, int64, int64) error
	ops := map[string]opFn{
		"Punch": func(s Store, off, n int64) error { return s.Punch(off, n) },
		"Zero":  func(s Store, off, n int64) error { return s.Zero(off, n) },
	}
	ranges := []struct {
		name   string
		off, n int64
	}{
		{"aligned block", 4096, 4096},
		{"unaligned small", 4097, 100},
		{"unaligned spanning pages", memPage - 3000, memPage + 6001},
		{"whole pages", memPage, 2 * memPage},
		{"to the end", size - 10000, 10000},
		{"whole store", 0, size},
		{"empty", 500, 0},
	}
	for opName, op := range ops {
		for _, r := range ranges {
			t.Run(opName+"/"+r.name, func(t *testing.T) {
				s := im.open(t, size)
				want := pattern(3, size)
				if _, err := s.WriteAt(want, 0); err != nil {
					t.Fatal(err)
				}
				if err := op(s, r.off, r.n); err != nil {
					t.Fatalf("%s(%d, %d): %v", opName, r.off, r.n, err)
				}
				clear(want[r.off : r.off+r.n])
				if got := readAll(t, s); !bytes.Equal(got, want) {
					i := firstDiff(got, want)
					t.Fatalf("after %s(%d, %d): first difference at byte %d: got %#x want %#x", opName, r.off, r.n, i, got[i], want[i])
				}
				// Writing into a punched range works again.
				if r.n > 0 {
					if _, err := s.WriteAt([]byte{0xAB}, r.off); err != nil {
						t.Fatal(err)
					}
					b := []byte{0}
					if _, err := s.ReadAt(b, r.off); err != nil || b[0] != 0xAB {
						t.Fatalf("rewrite after %s: read %#x, %v", opName, b[0], err)
					}
				}
			})
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// testModel applies a deterministic random sequence of writes, punches, zeros
// and syncs, and compares the store with a byte-slice model after each step.
func testModel(t *testing.T, im impl) {
	const size = 3*memPage + 12345
	s := im.open(t, size)
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for step := range 100 {
		off := rng.Int64N(size)
		n := rng.Int64N(min(size-off, 2*memPage) + 1)
		var desc string
		switch k := rng.IntN(10); {
		case k < 6:
			p := pattern(byte(step), int(n))
			if _, err := s.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
			desc = "write"
		case k < 8:
			if err := s.Punch(off, n); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
			desc = "punch"
		case k < 9:
			if err := s.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
			desc = "zero"
		default:
			if err := s.Sync(); err != nil {
				t.Fatal(err)
			}
			desc = "sync"
		}
		if got := readAll(t, s); !bytes.Equal(got, model) {
			i := firstDiff(got, model)
			t.Fatalf("step %d (%s [%d, +%d)): byte %d = %#x, model %#x", step, desc, off, n, i, got[i], model[i])
		}
	}
}

// testConcurrent runs writers, readers, punches and syncs on disjoint ranges
// at once; run with -race.
func testConcurrent(t *testing.T, im impl) {
	const (
		workers = 8
		block   = 8192
		rounds  = 50
	)
	s := im.open(t, workers*block)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(w * block)
			got := make([]byte, block)
			for r := range rounds {
				want := pattern(byte(w*rounds+r), block)
				if _, err := s.WriteAt(want, off); err != nil {
					errs <- err
					return
				}
				if _, err := s.ReadAt(got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, want) {
					errs <- fmt.Errorf("worker %d round %d: read back other data", w, r)
					return
				}
				var err error
				switch r % 3 {
				case 0:
					err = s.Punch(off, block)
				case 1:
					err = s.Zero(off+1, block-2)
				default:
					err = s.Sync()
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func testClose(t *testing.T, im impl) {
	s := im.open(t, 4096)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := s.ReadAt(make([]byte, 1), 0); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("ReadAt after Close: %v, want fs.ErrClosed", err)
	}
	if _, err := s.WriteAt([]byte{1}, 0); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("WriteAt after Close: %v, want fs.ErrClosed", err)
	}
	if err := s.Sync(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Sync after Close: %v, want fs.ErrClosed", err)
	}
	if err := s.Punch(0, 4096); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Punch after Close: %v, want fs.ErrClosed", err)
	}
	if err := s.Close(); err == nil {
		t.Error("second Close succeeded")
	}
}
