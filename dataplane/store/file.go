package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// ErrTooSmall is wrapped by OpenFile when an existing file or block device is
// smaller than the size the volume declares.
var ErrTooSmall = errors.New("store is smaller than the declared size")

// zeroBuf is the source of the zero-writing fallback; it is never written.
var zeroBuf [256 << 10]byte

// File is a Store backed by a regular (normally sparse) file or a block
// device. It is safe for concurrent use: reads and writes are positional
// (pread/pwrite).
type File struct {
	f       *os.File
	path    string
	size    atomic.Int64 // declared (usable) size; only grows (Grow)
	created bool
	blkdev  bool
	align   int64 // fallocate alignment: 1 for files, logical sector size for devices

	noPunch     atomic.Bool // fallocate(PUNCH_HOLE) is unsupported here
	noZeroRange atomic.Bool // fallocate(ZERO_RANGE) is unsupported here
}

var _ Store = (*File)(nil)

// OpenFile opens the replica store at path, which is used up to size bytes.
//
// With create set and no file at path, a new regular file is created with
// mode 0600 and truncated to size, so it is sparse and reads as zeros; the file
// and its directory entry are fsynced before OpenFile returns, and Created
// reports true. Otherwise (create unset, or a file already exists) the existing
// regular file or block device is opened; block devices are opened O_EXCL so a
// mounted device is refused. An existing store smaller than size is refused
// with an error wrapping ErrTooSmall; a larger one is used up to size. Other
// file types (directories, character devices, sockets) are refused.
func OpenFile(path string, size int64, create bool) (*File, error) {
	if size <= 0 {
		return nil, fmt.Errorf("store: open %s: declared size %d must be positive: %w", path, size, syscall.EINVAL)
	}
	if create {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		switch {
		case err == nil:
			return initCreated(f, path, size)
		case !errors.Is(err, fs.ErrExist):
			return nil, fmt.Errorf("store: create %s: %w", path, err)
		}
		// It exists already: open it like any existing store.
	}
	return openExisting(path, size)
}

func initCreated(f *os.File, path string, size int64) (*File, error) {
	fail := func(what string, err error) (*File, error) {
		_ = f.Close()
		_ = os.Remove(path)
		if what != "" {
			err = fmt.Errorf("%s: %w", what, err)
		}
		return nil, fmt.Errorf("store: create %s: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		return fail(fmt.Sprintf("truncate to %d bytes", size), err)
	}
	if err := f.Sync(); err != nil {
		return fail("fsync", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(path)); err != nil {
		return fail("", err) // it names the step and the directory
	}
	s := &File{f: f, path: path, created: true, align: 1}
	s.size.Store(size)
	return s, nil
}

func openExisting(path string, size int64) (*File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	mode := fi.Mode()
	isBlk := mode&fs.ModeDevice != 0 && mode&fs.ModeCharDevice == 0
	if !mode.IsRegular() && !isBlk {
		return nil, fmt.Errorf("store: open %s: %s is neither a regular file nor a block device: %w", path, mode.Type(), syscall.EINVAL)
	}
	flags := os.O_RDWR
	if isBlk {
		flags |= os.O_EXCL // exclusive open: fails with EBUSY while mounted or claimed
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	s := &File{f: f, path: path, blkdev: isBlk, align: 1}
	s.size.Store(size)
	var actual int64
	if isBlk {
		actual, s.align, err = blockDevGeometry(f)
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("store: open %s: block device size: %w", path, err)
		}
	} else {
		// Stat the opened file, not the path, in case it was replaced.
		fi, err = f.Stat()
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("store: open %s: %w", path, err)
		}
		if !fi.Mode().IsRegular() {
			_ = f.Close()
			return nil, fmt.Errorf("store: open %s: changed to %s while opening: %w", path, fi.Mode().Type(), syscall.EINVAL)
		}
		actual = fi.Size()
	}
	if actual < size {
		_ = f.Close()
		return nil, fmt.Errorf("store: open %s: it holds %d bytes but the volume declares %d: %w", path, actual, size, ErrTooSmall)
	}
	return s, nil
}

// Path is the path the store was opened with.
func (s *File) Path() string { return s.path }

// Created reports whether OpenFile created the file (it then reads as zeros).
func (s *File) Created() bool { return s.created }

// BlockDevice reports whether the store is a block device.
func (s *File) BlockDevice() bool { return s.blkdev }

// Size is the declared size.
func (s *File) Size() int64 { return s.size.Load() }

// ReadAt reads len(p) bytes at off. The whole range must lie inside the store
// (else an error wrapping syscall.EINVAL and n == 0).
func (s *File) ReadAt(p []byte, off int64) (int, error) {
	if err := checkRead("read", off, len(p), s.size.Load()); err != nil {
		return 0, err
	}
	n, err := s.f.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("store: read %s [%d, +%d): %w", s.path, off, len(p), err)
	}
	return n, nil
}

// WriteAt writes p at off. A range past the end fails with an error wrapping
// syscall.ENOSPC and writes nothing.
func (s *File) WriteAt(p []byte, off int64) (int, error) {
	if err := checkWrite("write", off, int64(len(p)), s.size.Load()); err != nil {
		return 0, err
	}
	n, err := s.f.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("store: write %s [%d, +%d): %w", s.path, off, len(p), err)
	}
	return n, nil
}

// Sync flushes completed writes to stable storage with fdatasync.
func (s *File) Sync() error {
	if err := fsutil.Fdatasync(s.f); err != nil {
		return fmt.Errorf("store: %w", err) // "fdatasync PATH: ..."
	}
	return nil
}

// Punch deallocates [off, off+n) with
// fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE). Where the file system
// or device does not support it, the range is overwritten with zeros instead
// (slow for large ranges). Either way the range reads as zeros afterwards.
func (s *File) Punch(off, n int64) error {
	if err := checkWrite("punch", off, n, s.size.Load()); err != nil {
		return err
	}
	if err := s.punch(off, n); err != nil {
		return fmt.Errorf("store: punch %s [%d, +%d): %w", s.path, off, n, err)
	}
	return nil
}

// Zero makes [off, off+n) read as zeros, with fallocate(FALLOC_FL_ZERO_RANGE)
// where supported, else by punching a hole, else by writing zeros.
func (s *File) Zero(off, n int64) error {
	if err := checkWrite("zero", off, n, s.size.Load()); err != nil {
		return err
	}
	err := s.alignedFalloc(off, n, &s.noZeroRange, s.zeroRange)
	if errors.Is(err, errors.ErrUnsupported) {
		err = s.punch(off, n)
	}
	if err != nil {
		return fmt.Errorf("store: zero %s [%d, +%d): %w", s.path, off, n, err)
	}
	return nil
}

// Close closes the file. Later calls fail.
func (s *File) Close() error {
	if err := s.f.Close(); err != nil {
		return fmt.Errorf("store: close %s: %w", s.path, err)
	}
	return nil
}

func (s *File) punch(off, n int64) error {
	err := s.alignedFalloc(off, n, &s.noPunch, s.punchHole)
	if errors.Is(err, errors.ErrUnsupported) {
		return s.writeZeros(off, n)
	}
	return err
}

// alignedFalloc applies an fallocate-style operation to the aligned middle of
// [off, off+n) and writes zeros over the unaligned head and tail (block devices
// refuse unaligned ranges). It returns an error matching
// errors.ErrUnsupported, and remembers that in *unsupported, when the
// operation is not available here.
func (s *File) alignedFalloc(off, n int64, unsupported *atomic.Bool, op func(off, n int64) error) error {
	if n == 0 {
		return nil
	}
	if unsupported.Load() {
		return errors.ErrUnsupported
	}
	end := off + n
	a := (off + s.align - 1) / s.align * s.align
	b := end / s.align * s.align
	if a >= b {
		return s.writeZeros(off, n) // nothing aligned to hand to the kernel
	}
	if err := op(a, b-a); err != nil {
		if errors.Is(err, errors.ErrUnsupported) {
			unsupported.Store(true)
		}
		return err
	}
	if err := s.writeZeros(off, a-off); err != nil {
		return err
	}
	return s.writeZeros(b, end-b)
}

func (s *File) writeZeros(off, n int64) error {
	for n > 0 {
		chunk := min(n, int64(len(zeroBuf)))
		w, err := s.f.WriteAt(zeroBuf[:chunk], off)
		if err != nil {
			return fmt.Errorf("writing zeros at %d: %w", off, err)
		}
		off += int64(w)
		n -= int64(w)
	}
	return nil
}

// Grow makes the declared size size bytes (Grower). A regular file shorter
// than that is extended with ftruncate, so the new space is sparse and
// reads as zeros, and fsynced before the new size is used; a file already
// that long (a grow that crashed before its metadata was written) is used
// as it is. A block device must already hold size bytes (ErrTooSmall
// otherwise). A size the file system cannot hold (EFBIG) or a failed
// fsync leaves the declared size as it was; the file may then be longer
// than it, which OpenFile accepts. Grow is safe while I/O runs: requests
// are checked against the old size until it returns.
func (s *File) Grow(size int64) error {
	cur := s.size.Load()
	if size < cur {
		return fmt.Errorf("store: grow %s to %d bytes: it declares %d, a store never shrinks: %w", s.path, size, cur, syscall.EINVAL)
	}
	if size == cur {
		return nil
	}
	var actual int64
	if s.blkdev {
		n, _, err := blockDevGeometry(s.f)
		if err != nil {
			return fmt.Errorf("store: grow %s: block device size: %w", s.path, err)
		}
		actual = n
		if actual < size {
			return fmt.Errorf("store: grow %s: the device holds %d bytes but the volume declares %d: %w", s.path, actual, size, ErrTooSmall)
		}
	} else {
		fi, err := s.f.Stat()
		if err != nil {
			return fmt.Errorf("store: grow %s: %w", s.path, err)
		}
		if fi.Size() < size {
			if err := s.f.Truncate(size); err != nil {
				return fmt.Errorf("store: grow %s: truncate to %d bytes: %w", s.path, size, err)
			}
		}
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("store: grow %s: fsync: %w", s.path, err)
		}
	}
	s.size.Store(size)
	return nil
}
