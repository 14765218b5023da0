//go:build !linux

package bitmap

import "os"

func fdatasync(f *os.File) error { return f.Sync() }
