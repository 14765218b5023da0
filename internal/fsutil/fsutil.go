// Package fsutil holds the durability primitives Tandem's on-disk state is
// built from: replacing a file atomically (temporary file, fsync, rename,
// directory fsync), cleaning up what a crash left of such a replacement,
// making a directory entry durable, and fdatasync for appends; and the loop
// that re-reads files while running (PollReload).
package fsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// tempInfix joins a file's name and the random suffix of the temporary files
// WriteFileAtomic creates for it: path "dir/meta" is written through
// "dir/meta.tmp-123456".
const tempInfix = ".tmp-"

// WriteFileAtomic replaces path with data so that after a crash path holds
// either its old contents or data, never a mix: it writes a temporary file
// in the same directory (named after path, see RemoveTemps), fsyncs it,
// renames it over path and fsyncs the directory. When it fails, path is
// unchanged (or, if only the last directory fsync failed, replaced but
// perhaps not durably) and the temporary file is removed; only a crash
// leaves one behind. Errors name the path and the step that failed.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+tempInfix+"*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return replace(f, path, data, perm)
}

// WriteFileAtomicVia is WriteFileAtomic through a temporary file of a fixed
// name, tmpName in path's directory; an existing file of that name is
// truncated. It is for a writer that is alone in its directory (it holds a
// lock) and whose file format names its temporary file, to delete it when
// it starts.
func WriteFileAtomicVia(path, tmpName string, data []byte, perm os.FileMode) error {
	if tmpName == "" || tmpName != filepath.Base(tmpName) || tmpName == filepath.Base(path) {
		return fmt.Errorf("write %s: temporary file name %q: want another file name in the same directory", path, tmpName)
	}
	f, err := os.OpenFile(filepath.Join(filepath.Dir(path), tmpName), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return replace(f, path, data, perm)
}

// replace writes data to the new temporary file f, makes it durable and
// renames it over path.
func replace(f *os.File, path string, data []byte, perm os.FileMode) error {
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
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: close temporary file: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: rename: %w", path, err)
	}
	if err := SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// RemoveTemps deletes the temporary files a crash in WriteFileAtomic(path)
// left in path's directory. It must not run while a WriteFileAtomic of path
// does (it would delete that one's temporary file): callers serialize the
// writes of a file and clean up before writing.
func RemoveTemps(path string) error {
	dir, prefix := filepath.Dir(path), filepath.Base(path)+tempInfix
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("remove stale temporary files of %s: %w", path, err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove stale temporary file: %w", err)
		}
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
