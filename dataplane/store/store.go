// Package store holds a replica's bytes: a sparse file under the agent's data
// directory or a block device. Store is the seam between the volume engine and
// the disk; Mem is an in-memory Store for tests and Faulty wraps any Store to
// inject errors (EIO, ENOSPC) and slow fsyncs. A store may grow while in use
// (Grower, for online volume expansion): a file is extended sparse and
// fsynced; a file longer than the declared size (a grow whose metadata was
// never written) is used up to that size. No store ever shrinks.
package store

import (
	"errors"
	"fmt"
	"io"
)

// Store is the byte storage of one replica. Implementations are safe for
// concurrent use; writes to overlapping ranges are ordered by the caller.
type Store interface {
	io.ReaderAt
	io.WriterAt
	// Size is the usable size in bytes.
	Size() int64
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Punch deallocates [off, off+n); later reads return zeros (NBD TRIM).
	Punch(off, n int64) error
	// Zero makes [off, off+n) read as zeros (NBD WRITE_ZEROES).
	Zero(off, n int64) error
	// Close releases the store.
	Close() error
}

// CacheDropper is implemented by a Store whose data passes through the
// kernel's page cache. DropCache asks the kernel to forget the store's
// cached pages (it starts writeback of dirty ones and drops the clean
// ones); it changes no data and promises no durability.
type CacheDropper interface {
	DropCache() error
}

// DropCache drops s's cached pages if it has any (CacheDropper).
func DropCache(s Store) error {
	if d, ok := s.(CacheDropper); ok {
		return d.DropCache()
	}
	return nil
}

// ZeroReporter is implemented by a Store that can tell it holds only zeros
// (a new memory store). A replica whose store says so needs no copy to be
// identical to another all-zero replica.
type ZeroReporter interface {
	// AllZero reports whether every byte of the store reads as zero.
	AllZero() bool
}

// AllZero reports whether s is known to hold only zeros.
func AllZero(s Store) bool {
	z, ok := s.(ZeroReporter)
	return ok && z.AllZero()
}

// Grower is implemented by a Store that can be made larger while in use
// (online volume expansion).
type Grower interface {
	// Grow makes the usable size size bytes, durably, before it returns;
	// the new bytes read as zeros. A size below the current one is refused;
	// the current one is a no-op. On error the usable size is unchanged.
	Grow(size int64) error
}

// ErrNoGrow is wrapped by Grow when the store cannot be made larger.
var ErrNoGrow = errors.New("store cannot grow")

// Grow makes s size bytes long (Grower). A store without Grow that is
// already that long is left as it is; any other is refused with ErrNoGrow.
func Grow(s Store, size int64) error {
	if g, ok := s.(Grower); ok {
		return g.Grow(size)
	}
	if s.Size() >= size {
		return nil
	}
	return fmt.Errorf("store: %T holds %d bytes and cannot grow to %d: %w", s, s.Size(), size, ErrNoGrow)
}
