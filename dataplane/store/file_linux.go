//go:build linux

package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

func (s *File) punchHole(off, n int64) error {
	return s.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func (s *File) zeroRange(off, n int64) error {
	return s.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// DropCache implements CacheDropper (posix_fadvise POSIX_FADV_DONTNEED
// over the whole file).
func (s *File) DropCache() error {
	return s.control(func(fd int) error {
		if err := unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED); err != nil {
			return fmt.Errorf("fadvise(DONTNEED) %s: %w", s.path, err)
		}
		return nil
	})
}

func (s *File) fallocate(mode uint32, off, n int64) error {
	return s.control(func(fd int) error {
		for {
			err := unix.Fallocate(fd, mode, off, n)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return fmt.Errorf("fallocate(mode %#x): %w", mode, err)
			}
			return nil
		}
	})
}

// control runs fn with the file descriptor, which stays open meanwhile.
func (s *File) control(fn func(fd int) error) error {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		// Control fails only when the file is closed or closing.
		return fmt.Errorf("%w (%v)", fs.ErrClosed, err)
	}
	return ferr
}

// blockDevGeometry returns a block device's size (BLKGETSIZE64) and logical
// sector size (BLKSSZGET).
func blockDevGeometry(f *os.File) (size, sector int64, err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var ierr error
	err = rc.Control(func(fd uintptr) {
		var sz uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&sz))); e != 0 {
			ierr = fmt.Errorf("ioctl BLKGETSIZE64: %w", e)
			return
		}
		ss, e := unix.IoctlGetInt(int(fd), unix.BLKSSZGET)
		if e != nil {
			ierr = fmt.Errorf("ioctl BLKSSZGET: %w", e)
			return
		}
		if ss <= 0 || ss&(ss-1) != 0 {
			ierr = fmt.Errorf("ioctl BLKSSZGET: implausible logical sector size %d", ss)
			return
		}
		if sz > 1<<62 {
			ierr = fmt.Errorf("ioctl BLKGETSIZE64: implausible size %d", sz)
			return
		}
		size, sector = int64(sz), int64(ss)
	})
	return size, sector, errors.Join(err, ierr)
}
