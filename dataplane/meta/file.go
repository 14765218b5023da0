package meta

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// FileName is the metadata file's name inside a replica directory.
const FileName = "meta"

const tempPrefix = FileName + ".tmp-"

// dirLocks serializes Writes to one directory within this process, so one
// Write never removes another's temporary file.
var dirLocks sync.Map // cleaned dir -> *sync.Mutex

func lockDir(dir string) func() {
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	v, _ := dirLocks.LoadOrStore(filepath.Clean(dir), new(sync.Mutex))
	mu := v.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

// Write validates m and atomically replaces dir/meta with it: it writes a
// temporary file in dir, fsyncs it, renames it over dir/meta and fsyncs dir.
// It first removes temporary files an earlier crash left in dir. dir must
// exist. When Write fails, dir/meta holds the old or (if only the final
// directory fsync failed) the new contents.
func Write(dir string, m Meta) error {
	b, err := encode(m)
	if err != nil {
		return err
	}
	defer lockDir(dir)()
	if err := removeTemps(dir); err != nil {
		return fmt.Errorf("meta: write %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, tempPrefix+"*")
	if err != nil {
		return fmt.Errorf("meta: write %s: %w", dir, err)
	}
	tmp := f.Name()
	fail := func(step string, err error) error {
		_ = f.Close()
		_ = os.Remove(tmp)
		return fmt.Errorf("meta: write %s: %s: %w", dir, step, err)
	}
	if _, err := f.Write(b); err != nil {
		return fail("write temporary file", err)
	}
	if err := f.Sync(); err != nil {
		return fail("fsync temporary file", err)
	}
	if err := f.Close(); err != nil {
		return fail("close temporary file", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, FileName)); err != nil {
		return fail("rename", err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("meta: write %s: fsync directory: %w", dir, err)
	}
	return nil
}

// removeTemps deletes leftover temporary files in dir.
func removeTemps(dir string) error {
	tmps, err := filepath.Glob(filepath.Join(filepath.Clean(dir), tempPrefix+"*"))
	if err != nil {
		return err
	}
	for _, t := range tmps {
		if err := os.Remove(t); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("remove stale temporary file: %w", err)
		}
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Read reads and decodes dir/meta, ignoring temporary files. A missing file
// gives an error wrapping os.ErrNotExist; damaged contents wrap ErrCorrupt; a
// file of an unknown format version wraps ErrVersion.
func Read(dir string) (Meta, error) {
	path := filepath.Join(dir, FileName)
	f, err := os.Open(path)
	if err != nil {
		return Meta{}, fmt.Errorf("meta: read: %w", err)
	}
	defer f.Close()
	// Read at most one byte more than the largest valid file, so a huge file
	// is refused without reading it all.
	const maxFile = headerLen + MaxPayload + trailerLen
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return Meta{}, fmt.Errorf("meta: read %s: %w", path, err)
	}
	if len(b) > maxFile {
		return Meta{}, fmt.Errorf("meta: read %s: %w", path, corrupt("file larger than %d bytes", maxFile))
	}
	m, err := decode(b)
	if err != nil {
		return Meta{}, fmt.Errorf("meta: read %s: %w", path, err)
	}
	return m, nil
}
