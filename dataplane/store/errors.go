package store

import (
	"fmt"
	"syscall"
)

// checkRead validates a read of n bytes at off against size. Reads must lie
// entirely inside the store: a read that starts or ends past the end fails
// with an error wrapping syscall.EINVAL (as an NBD server reports it) and
// transfers nothing.
func checkRead(op string, off int64, n int, size int64) error {
	if off < 0 {
		return fmt.Errorf("store: %s at negative offset %d: %w", op, off, syscall.EINVAL)
	}
	if int64(n) > size || off > size-int64(n) {
		return fmt.Errorf("store: %s [%d, +%d) beyond store size %d: %w", op, off, n, size, syscall.EINVAL)
	}
	return nil
}

// checkWrite validates a modification (write, punch, zero) of n bytes at off.
// A negative offset or length wraps syscall.EINVAL; a range that ends past the
// end of the store wraps syscall.ENOSPC and nothing is modified.
func checkWrite(op string, off, n, size int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("store: %s [%d, +%d): negative offset or length: %w", op, off, n, syscall.EINVAL)
	}
	if n > size || off > size-n {
		return fmt.Errorf("store: %s [%d, +%d) beyond store size %d: %w", op, off, n, size, syscall.ENOSPC)
	}
	return nil
}
