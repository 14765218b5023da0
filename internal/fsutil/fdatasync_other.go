//go:build !linux

package fsutil

import "os"

// Fdatasync is f.Sync where there is no fdatasync(2).
func Fdatasync(f *os.File) error { return f.Sync() }
