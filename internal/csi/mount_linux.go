package csi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// LinuxMounter mounts with mount(2) and formats with mkfs.ext4 / mkfs.xfs
// (e2fsprogs, xfsprogs), looked up in PATH.
type LinuxMounter struct{}

var _ Mounter = LinuxMounter{}

// mountFlags splits mount options into mount(2) flags and filesystem data.
func mountFlags(options []string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range options {
		switch o {
		case "ro":
			flags |= unix.MS_RDONLY
		case "rw", "defaults", "":
		case "noatime":
			flags |= unix.MS_NOATIME
		case "nodiratime":
			flags |= unix.MS_NODIRATIME
		case "relatime":
			flags |= unix.MS_RELATIME
		case "strictatime":
			flags |= unix.MS_STRICTATIME
		case "nosuid":
			flags |= unix.MS_NOSUID
		case "nodev":
			flags |= unix.MS_NODEV
		case "noexec":
			flags |= unix.MS_NOEXEC
		case "sync":
			flags |= unix.MS_SYNCHRONOUS
		case "dirsync":
			flags |= unix.MS_DIRSYNC
		default:
			data = append(data, o)
		}
	}
	return flags, strings.Join(data, ",")
}

// Mount mounts source at target.
func (LinuxMounter) Mount(source, target, fstype string, bind, readOnly bool, options []string) error {
	flags, data := mountFlags(options)
	if bind {
		if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount %s at %s: %w", source, target, err)
		}
		// A bind mount takes its flags only from a remount.
		if readOnly || flags != 0 {
			f := flags | unix.MS_BIND | unix.MS_REMOUNT
			if readOnly {
				f |= unix.MS_RDONLY
			}
			if err := unix.Mount("", target, "", f, ""); err != nil {
				_ = unix.Unmount(target, 0)
				return fmt.Errorf("remounting %s with its options: %w", target, err)
			}
		}
		return nil
	}
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(source, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s (%s) at %s with %q: %w", source, fstype, target, data, err)
	}
	return nil
}

// Unmount unmounts target.
func (LinuxMounter) Unmount(target string) error {
	if err := unix.Unmount(target, 0); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}

// IsMountPoint looks path up in /proc/self/mountinfo.
func (LinuxMounter) IsMountPoint(path string) (bool, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return false, err
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	defer f.Close()
	return inMountinfo(f, real)
}

// inMountinfo says whether path is a mount point in a mountinfo table
// (proc(5): the fifth field, with \040-style escapes).
func inMountinfo(r io.Reader, path string) (bool, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		if unescapeMountinfo(fields[4]) == path {
			return true, nil
		}
	}
	return false, sc.Err()
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Filesystem reads the device's first 64 KiB and says what it holds.
func (LinuxMounter) Filesystem(device string) (string, error) {
	f, err := os.Open(device)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", fmt.Errorf("reading %s: %w", device, err)
	}
	return detectFilesystem(buf[:n])
}

// detectFilesystem recognises ext2/3/4 (magic 0xEF53 at byte 1080) and XFS
// ("XFSB" at 0); a start of all zeroes is blank; anything else is data we
// must not format over.
func detectFilesystem(b []byte) (string, error) {
	if len(b) >= 1082 && binary.LittleEndian.Uint16(b[1080:1082]) == 0xEF53 {
		return "ext4", nil
	}
	if len(b) >= 4 && string(b[:4]) == "XFSB" {
		return "xfs", nil
	}
	if !bytes.ContainsFunc(b, func(r rune) bool { return r != 0 }) {
		return "", nil
	}
	return "", fmt.Errorf("it holds data that is neither an ext4 nor an xfs filesystem (first bytes %x)", b[:min(len(b), 16)])
}

// Format runs mkfs. No discard: a new Tandem volume reads as zeroes
// already, and discarding it all would be sent to the writer for nothing.
func (LinuxMounter) Format(ctx context.Context, device, fstype string) error {
	var cmd *exec.Cmd
	switch fstype {
	case "ext4":
		cmd = exec.CommandContext(ctx, FilesystemTools["ext4"].Format, "-F", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", device)
	case "xfs":
		cmd = exec.CommandContext(ctx, FilesystemTools["xfs"].Format, "-f", "-q", "-K", device)
	default:
		return fmt.Errorf("filesystem %q is not supported", fstype)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Resize grows a mounted filesystem online: resize2fs on the device for
// ext4, xfs_growfs on the mount point for xfs. Both do nothing when the
// filesystem fills the device already.
func (LinuxMounter) Resize(ctx context.Context, device, path, fstype string) error {
	var cmd *exec.Cmd
	switch fstype {
	case "ext4":
		cmd = exec.CommandContext(ctx, FilesystemTools["ext4"].Grow, device)
	case "xfs":
		cmd = exec.CommandContext(ctx, FilesystemTools["xfs"].Grow, path)
	default:
		return fmt.Errorf("filesystem %q is not supported", fstype)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
