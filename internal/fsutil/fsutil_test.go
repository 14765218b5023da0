package fsutil

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, content := range []string{"first", "second, longer"} {
		if err := WriteFileAtomic(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != content {
			t.Fatalf("read back %q, %v; want %q", got, err, content)
		}
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", fi.Mode(), err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
	// A directory that is gone: an error, nothing half-written.
	if err := WriteFileAtomic(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); err == nil {
		t.Fatal("writing into a missing directory succeeded")
	}
}

func TestWriteFileAtomicVia(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "checkpoint")
	// A temporary file a crash left behind is truncated, not appended to.
	if err := os.WriteFile(filepath.Join(dir, "checkpoint.tmp"), []byte("half of an old checkpoint"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, content := range []string{"first", "2nd"} {
		if err := WriteFileAtomicVia(p, "checkpoint.tmp", []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != content {
			t.Fatalf("read back %q, %v; want %q", got, err, content)
		}
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", fi.Mode(), err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
	for _, bad := range []string{"", "checkpoint", "sub/checkpoint.tmp", "../checkpoint.tmp"} {
		if err := WriteFileAtomicVia(p, bad, []byte("x"), 0o600); err == nil {
			t.Errorf("temporary file name %q accepted", bad)
		}
	}
	// The temporary file cannot be created: an error, path unchanged.
	if err := os.Mkdir(filepath.Join(dir, "checkpoint.tmp"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomicVia(p, "checkpoint.tmp", []byte("third"), 0o600); err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("writing through a directory: %v, want an error naming %s", err, p)
	}
	if got, _ := os.ReadFile(p); string(got) != "2nd" {
		t.Fatalf("after a failed write the file holds %q", got)
	}
}

// TestWriteFileAtomicFailure: a failed step is named, and neither the file
// nor a temporary file is left changed.
func TestWriteFileAtomicFailure(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := WriteFileAtomic(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The rename fails: path is a non-empty directory now.
	q := filepath.Join(dir, "d")
	if err := os.MkdirAll(filepath.Join(q, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	err := WriteFileAtomic(q, []byte("new"), 0o600)
	if err == nil || !strings.Contains(err.Error(), "write "+q+": rename: ") {
		t.Fatalf("rename over a directory: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Fatalf("dir holds %v after the failure, want f and d", entries)
	}
}

func TestRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "meta")
	keep := []string{"meta", "meta.tmp", "other.tmp-1", "metadata.tmp-2"}
	for _, name := range append([]string{"meta.tmp-1", "meta.tmp-"}, keep...) {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := RemoveTemps(p); err != nil {
		t.Fatal(err)
	}
	var left []string
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		left = append(left, e.Name())
	}
	slices.Sort(keep)
	if !slices.Equal(left, keep) {
		t.Fatalf("left %v, want %v", left, keep)
	}
	// What WriteFileAtomic leaves after a crash has the name RemoveTemps removes.
	f, err := os.CreateTemp(dir, "meta"+tempInfix+"*")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := RemoveTemps(p); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f.Name()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s not removed: %v", f.Name(), err)
	}
	if err := RemoveTemps(filepath.Join(dir, "missing", "meta")); err == nil {
		t.Fatal("RemoveTemps in a missing directory succeeded")
	}
}

func TestSyncDirAndFdatasync(t *testing.T) {
	dir := t.TempDir()
	if err := SyncDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("SyncDir of a missing directory: %v", err)
	}
	f, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("record")); err != nil {
		t.Fatal(err)
	}
	if err := Fdatasync(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	err = Fdatasync(f)
	var pe *os.PathError
	if !errors.Is(err, fs.ErrClosed) || !errors.As(err, &pe) || pe.Path != f.Name() {
		t.Fatalf("Fdatasync of a closed file: %v, want a *PathError wrapping fs.ErrClosed", err)
	}
}
