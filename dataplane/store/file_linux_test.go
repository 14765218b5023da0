//go:build linux

package store_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandem-storage/tandem/dataplane/store"
)

// resident counts the file's pages in the page cache (mincore).
func resident(t *testing.T, path string, size int) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (size+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// TestFileDropCache: after a sync, DropCache leaves none of the file's
// pages cached, and the data reads back the same.
func TestFileDropCache(t *testing.T) {
	const size = 4 << 20
	path := filepath.Join(t.TempDir(), "data")
	s, err := store.OpenFile(path, size, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := bytes.Repeat([]byte("tandem!"), size/7+1)[:size]
	if _, err := s.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if n := resident(t, path, size); n == 0 {
		t.Fatalf("no page of %s cached after a write: this test needs TMPDIR on a file system with a page cache", path)
	}
	if err := store.DropCache(s); err != nil {
		t.Fatal(err)
	}
	if n := resident(t, path, size); n != 0 {
		t.Fatalf("%d pages still cached after DropCache", n)
	}
	got := make([]byte, size)
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data changed by DropCache")
	}
}
