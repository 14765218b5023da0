package store

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// allocated is the disk space a file occupies, from stat's block count.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Fatal("no block counts (syscall.Stat_t) on this platform")
	}
	return st.Blocks * 512
}

func TestOpenFileCreatesSparse(t *testing.T) {
	const size = 1 << 30
	path := filepath.Join(t.TempDir(), "replica")
	f, err := OpenFile(path, size, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !f.Created() || f.BlockDevice() || f.Path() != path || f.Size() != size {
		t.Fatalf("Created=%v BlockDevice=%v Path=%q Size=%d", f.Created(), f.BlockDevice(), f.Path(), f.Size())
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != size || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file size %d mode %v, want %d and 0600", fi.Size(), fi.Mode(), size)
	}
	if a := allocated(t, path); a > 64<<10 {
		t.Fatalf("a new 1 GiB store occupies %d bytes on disk; want it sparse", a)
	}
	b := make([]byte, 4096)
	for _, off := range []int64{0, size / 2, size - 4096} {
		if _, err := f.ReadAt(b, off); err != nil || !bytes.Equal(b, make([]byte, 4096)) {
			t.Fatalf("ReadAt(%d): %v or not zeros", off, err)
		}
	}
}

func TestOpenFileExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "replica")
	f, err := OpenFile(path, 1<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(5, 5000)
	if _, err := f.WriteAt(data, 12345); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		size   int64
		create bool
	}{
		{"reopen", 1 << 20, false},
		{"create finds existing", 1 << 20, true},
		{"larger than declared", 1 << 19, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := OpenFile(path, tc.size, tc.create)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if f.Created() {
				t.Error("Created() = true for an existing file")
			}
			if f.Size() != tc.size {
				t.Errorf("Size() = %d, want the declared %d", f.Size(), tc.size)
			}
			got := make([]byte, len(data))
			if _, err := f.ReadAt(got, 12345); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("data not kept across reopen (err %v)", err)
			}
		})
	}
}

func TestOpenFileRefuses(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	if err := os.WriteFile(small, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		path    string
		size    int64
		create  bool
		want    error
		message string
	}{
		{"smaller than declared", small, 8192, false, ErrTooSmall, "holds 4096 bytes but the volume declares 8192"},
		{"smaller than declared, create", small, 8192, true, ErrTooSmall, "holds 4096 bytes"},
		{"missing", filepath.Join(dir, "nope"), 4096, false, fs.ErrNotExist, "nope"},
		{"missing directory", filepath.Join(dir, "no", "such"), 4096, true, fs.ErrNotExist, "create"},
		{"directory", dir, 4096, false, syscall.EINVAL, "neither a regular file nor a block device"},
		{"character device", "/dev/null", 4096, false, syscall.EINVAL, "neither a regular file nor a block device"},
		{"zero size", filepath.Join(dir, "zero"), 0, true, syscall.EINVAL, "must be positive"},
		{"negative size", filepath.Join(dir, "neg"), -1, true, syscall.EINVAL, "must be positive"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f, err := OpenFile(tc.path, tc.size, tc.create)
			if err == nil {
				f.Close()
				t.Fatal("OpenFile succeeded")
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("err = %q, want it to wrap %v and mention %q", err, tc.want, tc.message)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "zero")); !errors.Is(err, fs.ErrNotExist) {
		t.Error("a refused create left a file behind")
	}
}

func TestFilePunchFreesSpace(t *testing.T) {
	const size = 8 << 20
	f := openTestFile(t, size)
	if _, err := f.WriteAt(pattern(1, size), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, f.Path())
	if before < size {
		t.Fatalf("after writing %d bytes only %d are allocated", size, before)
	}
	if err := f.Punch(1<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if f.noPunch.Load() {
		// CI runs on ext4, which punches holes: there this must not skip.
		if os.Getenv("CI") != "" {
			t.Fatal("the file system does not support hole punching")
		}
		t.Skip("the file system does not support hole punching")
	}
	after := allocated(t, f.Path())
	if before-after < 4<<20 {
		t.Fatalf("punching 4 MiB freed %d bytes (%d -> %d)", before-after, before, after)
	}
}

// TestBlockDevice runs the conformance checks against a loop device. It needs
// root and losetup, so it is opt-in: TANDEM_TEST_LOOPDEV=1.
func TestBlockDevice(t *testing.T) {
	if os.Getenv("TANDEM_TEST_LOOPDEV") != "1" {
		t.Skip("set TANDEM_TEST_LOOPDEV=1 to test a loop device (needs root)")
	}
	const size = 4 << 20
	backing := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(backing, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})

	if _, err := OpenFile(dev, size+4096, false); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("OpenFile(%s) larger than the device: %v, want ErrTooSmall", dev, err)
	}
	f, err := OpenFile(dev, size, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !f.BlockDevice() || f.Created() || f.align < 512 {
		t.Fatalf("BlockDevice=%v Created=%v align=%d", f.BlockDevice(), f.Created(), f.align)
	}
	defer func() {
		t.Logf("logical sector %d, punch unsupported %v, zero-range unsupported %v", f.align, f.noPunch.Load(), f.noZeroRange.Load())
	}()
	if _, err := OpenFile(dev, size, false); err == nil {
		t.Error("a second open of the device succeeded despite O_EXCL")
	}
	im := impl{"loop", func(t *testing.T, sz int64) Store {
		if err := f.Punch(0, size); err != nil {
			t.Fatal(err)
		}
		return &sized{f, sz}
	}}
	testWriteRead(t, im)
	testPunchZero(t, im)
	testModel(t, im)
}

// sized narrows a store to its first n bytes.
type sized struct {
	*File
	n int64
}

func (s *sized) Size() int64 { return s.n }

func (s *sized) ReadAt(p []byte, off int64) (int, error) {
	if err := checkRead("read", off, len(p), s.n); err != nil {
		return 0, err
	}
	return s.File.ReadAt(p, off)
}

func (s *sized) WriteAt(p []byte, off int64) (int, error) {
	if err := checkWrite("write", off, int64(len(p)), s.n); err != nil {
		return 0, err
	}
	return s.File.WriteAt(p, off)
}

func (s *sized) Close() error { return nil }
