package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestFileGrow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data")
	s, err := OpenFile(path, 1<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p := bytes.Repeat([]byte{7}, 4096)
	if _, err := s.WriteAt(p, 1<<20-4096); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt(p, 1<<20); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past the end before the grow: %v", err)
	}
	if err := s.Grow(1<<20 - 1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Grow to a smaller size: %v, want EINVAL", err)
	}
	const grown = 3<<20 + 512
	if err := s.Grow(grown); err != nil {
		t.Fatal(err)
	}
	if s.Size() != grown {
		t.Fatalf("size %d after the grow", s.Size())
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Size() != grown {
		t.Fatalf("file after the grow: %v, %v", fi, err)
	}
	got := make([]byte, 4096)
	if _, err := s.ReadAt(got, 1<<20-4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("data before the old end: %v", err)
	}
	if _, err := s.ReadAt(got, 2<<20); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("the grown space does not read as zeros: %v", err)
	}
	if _, err := s.WriteAt(p[:512], grown-512); err != nil {
		t.Fatalf("write at the new end: %v", err)
	}
	if err := s.Grow(grown); err != nil {
		t.Fatalf("Grow to the same size: %v", err)
	}
	s.Close()
	// A file longer than the declared size (a grow whose metadata was
	// not written) opens at the old size and grows again without change.
	s2, err := OpenFile(path, 1<<20, false)
	if err != nil {
		t.Fatalf("opening a longer file at the old size: %v", err)
	}
	defer s2.Close()
	if err := s2.Grow(grown); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.ReadAt(got[:512], grown-512); err != nil || !bytes.Equal(got[:512], p[:512]) {
		t.Fatalf("data at the end after growing again: %v", err)
	}
}

func TestMemAndFaultyGrow(t *testing.T) {
	m := NewMem(1 << 20)
	f := NewFaulty(m)
	f.SetHook(func(op Op, off, n int64) error {
		if op == OpGrow {
			return syscall.EFBIG
		}
		return nil
	})
	if err := Grow(f, 2<<20); !errors.Is(err, syscall.EFBIG) || m.Size() != 1<<20 {
		t.Fatalf("injected grow failure: %v, size %d", err, m.Size())
	}
	f.SetHook(nil)
	if err := Grow(f, 2<<20); err != nil || f.Size() != 2<<20 {
		t.Fatalf("grow: %v, size %d", err, f.Size())
	}
	if _, err := f.WriteAt([]byte{1}, 2<<20-1); err != nil {
		t.Fatal(err)
	}
	m.DropUnsynced() // the size is durable at once
	if m.Size() != 2<<20 {
		t.Fatal("DropUnsynced undid the grow")
	}
	if err := m.Grow(1 << 20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Mem.Grow to a smaller size: %v", err)
	}
	// A store that cannot grow is refused unless already large enough.
	var s Store = struct{ Store }{NewMem(1 << 20)}
	if err := Grow(s, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := Grow(s, 2<<20); !errors.Is(err, ErrNoGrow) {
		t.Fatalf("growing a store without Grow: %v", err)
	}
}
