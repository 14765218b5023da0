//go:build !linux

package store

import (
	"errors"
	"io"
	"os"
)

// Hole punching and zero ranges are Linux-only; elsewhere File writes zeros.

func (s *File) punchHole(off, n int64) error { return errors.ErrUnsupported }

func (s *File) zeroRange(off, n int64) error { return errors.ErrUnsupported }

// DropCache implements CacheDropper: a no-op off Linux.
func (s *File) DropCache() error { return nil }

func blockDevGeometry(f *os.File) (size, sector int64, err error) {
	size, err = f.Seek(0, io.SeekEnd)
	return size, 512, err
}
