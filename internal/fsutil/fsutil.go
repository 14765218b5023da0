// Package fsutil holds the durability primitives Tandem's on-disk state is
// built from: replacing a file atomically and making a directory entry
// durable.
package fsutil

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteFileAtomic replaces path with data so that after a crash path holds
// either its old contents or data, never a mix: it writes a temporary file
// in the same directory, fsyncs it, renames it over path and fsyncs the
// directory. When it fails, path is unchanged (or, if only the last
// directory fsync failed, replaced but perhaps not durably).
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	fail := func(step string, err error) error {
		_ = f.Close()
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %s: %w", path, step, err)
	}
	if _, err := f.Write(data); err != nil {
		return fail("write temporary file", err)
	}
	if err := f.Chmod(perm); err != nil {
		return fail("chmod temporary file", err)
	}
	if err := f.Sync(); err != nil {
		return fail("fsync temporary file", err)
	}
	if err := f.Close(); err != nil {
		return fail("close temporary file", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: rename: %w", path, err)
	}
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// SyncDir fsyncs a directory, making the entries created, renamed or
// removed in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
