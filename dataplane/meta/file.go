package meta

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// FileName is the metadata file's name inside a replica directory. Write's
// temporary files are named FileName.tmp-* (fsutil.WriteFileAtomic).
const FileName = "meta"

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

// Write validates m and atomically replaces dir/meta with it
// (fsutil.WriteFileAtomic: a temporary file in dir, fsynced, renamed over
// dir/meta, dir fsynced). It first removes the temporary files an earlier
// crash left in dir; Writes to one directory are serialized within the
// process so that this never removes a running Write's file. dir must exist.
// When Write fails, dir/meta holds the old or (if only the final directory
// fsync failed) the new contents, and the error names the failed step.
func Write(dir string, m Meta) error {
	b, err := encode(m)
	if err != nil {
		return err
	}
	defer lockDir(dir)()
	path := filepath.Join(dir, FileName)
	if err := fsutil.RemoveTemps(path); err != nil {
		return fmt.Errorf("meta: write %s: %w", dir, err)
	}
	if err := fsutil.WriteFileAtomic(path, b, 0o600); err != nil {
		return fmt.Errorf("meta: %w", err)
	}
	return nil
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
