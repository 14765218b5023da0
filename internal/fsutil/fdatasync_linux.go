//go:build linux

package fsutil

import (
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// Fdatasync flushes f's data and the metadata needed to read it back (its
// size), not its timestamps: what a log append or a data write needs, at less
// cost than f.Sync. It retries on EINTR. Errors are *os.PathError (op
// "fdatasync"), like f.Sync's; on a closed file they wrap fs.ErrClosed.
func Fdatasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
	}
	var serr error
	// Control keeps the descriptor open meanwhile, so a concurrent Close
	// cannot make the call reach a descriptor number reused by another file.
	if err := rc.Control(func(fd uintptr) {
		for {
			if serr = unix.Fdatasync(int(fd)); serr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		// Control fails only when the file is closed or closing.
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: fmt.Errorf("%w (%v)", fs.ErrClosed, err)}
	}
	if serr != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}
