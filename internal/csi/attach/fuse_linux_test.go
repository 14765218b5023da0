package attach

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/csi"
)

// requireBlockDevices skips unless TANDEM_TEST_LOOPDEV=1 (root, FUSE and
// loop devices, as a node's agent has; .ci/run sets it).
func requireBlockDevices(t *testing.T) {
	t.Helper()
	if os.Getenv("TANDEM_TEST_LOOPDEV") != "1" {
		t.Skip("set TANDEM_TEST_LOOPDEV=1 to attach through FUSE and a loop device (needs root)")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("TANDEM_TEST_LOOPDEV=1 but %v", err)
		}
	}
}

// TestUserSpaceAttach: a volume attached through FUSE and a loop device
// takes an ext4 filesystem (formatted and mounted by the node service's
// Mounter); files written and synced reach the writer; when the writer
// changes under a running writer of files (the old one refuses, none is
// named for a while, then another is), nothing above the device sees an
// error; detach leaves no loop device and no mount.
func TestUserSpaceAttach(t *testing.T) {
	requireBlockDevices(t)
	const size = 64 << 20
	shared := nbd.NewMemBackend(size)
	gateA := &writerGate{}
	a := startMember(t, &view{shared, gateA})
	r := &switchable{uri: a.uri}
	dir := t.TempDir()
	u := &UserSpace{Dir: filepath.Join(dir, "fuse"), Resolver: func(csi.Volume) Resolver { return r.resolve }, Log: testr.New(t), IOTimeout: 30 * time.Second}
	vol := csi.Volume{ID: "vol-1", Pair: client.ObjectKey{Namespace: "ns", Name: "vol"}, Size: size}
	ctx := context.Background()

	if _, err := u.Attach(ctx, csi.Volume{ID: "wrong-size", Size: size / 2}); err == nil {
		t.Fatal("a volume whose writer exports another size was attached")
	}
	dev, err := u.Attach(ctx, vol)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	detached := false
	t.Cleanup(func() {
		if !detached {
			_ = exec.Command("umount", "-l", filepath.Join(dir, "mnt")).Run()
			_ = u.Detach(context.Background(), vol.ID)
		}
	})
	if again, err := u.Attach(ctx, vol); err != nil || again != dev {
		t.Fatalf("second Attach: %s, %v; want %s", again, err, dev)
	}
	var m csi.LinuxMounter
	if fs, err := m.Filesystem(dev); err != nil || fs != "" {
		t.Fatalf("a new volume holds %q, %v; want blank", fs, err)
	}
	if err := m.Format(ctx, dev, "ext4"); err != nil {
		t.Fatal(err)
	}
	if fs, err := m.Filesystem(dev); err != nil || fs != "ext4" {
		t.Fatalf("after mkfs.ext4: %q, %v", fs, err)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(dev, mnt, "ext4", false, false, []string{"noatime"}); err != nil {
		t.Fatal(err)
	}
	if ok, err := m.IsMountPoint(mnt); !ok || err != nil {
		t.Fatalf("IsMountPoint %t, %v", ok, err)
	}

	// Records written and fsynced one after another while the writer moves.
	var written atomic.Int64
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			p := filepath.Join(mnt, fmt.Sprintf("rec-%04d", i))
			if err := os.WriteFile(p, bytes.Repeat([]byte{byte(i)}, 8192), 0o600); err != nil {
				done <- err
				return
			}
			f, err := os.Open(p)
			if err == nil {
				err = f.Sync()
				_ = f.Close()
			}
			if err != nil {
				done <- fmt.Errorf("fsync %s: %w", p, err)
				return
			}
			written.Store(int64(i + 1))
		}
	}()
	waitFor := func(n int64) {
		deadline := time.Now().Add(30 * time.Second)
		for written.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("only %d records written", written.Load())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor(20)
	// Writer a stops being the writer; for 500 ms nobody is; then b is
	// (b sees the same data, as a promoted member would).
	b := startMember(t, &view{shared, &writerGate{}})
	gateA.set(syscall.EPERM)
	r.set("")
	before := written.Load()
	time.Sleep(500 * time.Millisecond)
	r.set(b.uri)
	waitFor(before + 20)
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("the filesystem saw an error while the writer moved: %v", err)
	}
	if f := u.Follower(vol.ID); f == nil || f.Endpoint() != b.uri || f.Reconnects() < 1 {
		t.Fatalf("follower not on the new writer: %+v", f)
	}
	n := written.Load()

	if err := m.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	if err := u.Detach(ctx, vol.ID); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	detached = true
	if err := u.Detach(ctx, vol.ID); err != nil {
		t.Fatalf("second Detach: %v", err)
	}
	if out, _ := exec.Command("losetup", "-j", filepath.Join(u.Dir)).CombinedOutput(); len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("loop devices left: %s", out)
	}
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err == nil {
		if info, err := os.ReadFile(fmt.Sprintf("/sys/block/%s/loop/backing_file", filepath.Base(dev))); err == nil {
			t.Fatalf("%s still bound to %s", dev, info)
		}
	}

	// The data is on the writer: a fresh attach through b reads every record.
	dev2, err := u.Attach(ctx, vol)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(dev2, mnt, "ext4", false, true, nil); err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < n; i++ {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("rec-%04d", i)))
		if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{byte(i)}, 8192)) {
			t.Fatalf("record %d after re-attach: %v", i, err)
		}
	}
	if err := m.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	if err := u.Detach(ctx, vol.ID); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d records written and synced, %d of them across the change of writer", n, n-before)
}

// view is one member's window on a backend shared by both members (as
// replication would make their data), with that member's own gate.
type view struct {
	*nbd.MemBackend
	gate *writerGate
}

func (v *view) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := v.gate.hook(ctx, nbd.OpRead, off, int64(len(p))); err != nil {
		return err
	}
	return v.MemBackend.ReadAt(ctx, p, off)
}

func (v *view) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := v.gate.hook(ctx, nbd.OpWrite, off, int64(len(p))); err != nil {
		return err
	}
	return v.MemBackend.WriteAt(ctx, p, off, fua)
}

// TestUserSpaceExpand: a volume attached through FUSE and a loop device,
// with a mounted xfs filesystem, grows online from 16 MiB to 32 MiB:
// Expand refuses (Unavailable) while the export is still smaller, then,
// once it has grown, the loop device shows the new size (BLKGETSIZE64) and
// xfs_growfs (Mounter.Resize) grows the mounted filesystem, whose files
// stay as they were. Expanding again changes nothing; a volume not
// attached is NotFound. (xfs, not ext4: growing a mounted ext4 takes
// CAP_SYS_RESOURCE, which the node plugin has and CI's container lacks;
// the device's part is the same.)
func TestUserSpaceExpand(t *testing.T) {
	requireBlockDevices(t)
	const small, large = 16 << 20, 32 << 20
	be := newGrowable(small)
	a := startMember(t, be)
	r := &switchable{uri: a.uri}
	dir := t.TempDir()
	u := &UserSpace{Dir: filepath.Join(dir, "fuse"), Resolver: func(csi.Volume) Resolver { return r.resolve }, Log: testr.New(t), IOTimeout: 10 * time.Second}
	vol := csi.Volume{ID: "vol-grow", Pair: client.ObjectKey{Namespace: "ns", Name: "vol"}, Size: small}
	ctx := context.Background()
	if _, err := u.Expand(ctx, vol); status.Code(err) != codes.NotFound {
		t.Fatalf("Expand of a volume not attached: %v, want NotFound", err)
	}
	dev, err := u.Attach(ctx, vol)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	mnt := filepath.Join(dir, "mnt")
	t.Cleanup(func() {
		_ = exec.Command("umount", "-l", mnt).Run()
		_ = u.Detach(context.Background(), vol.ID)
	})
	var m csi.LinuxMounter
	// mkfs.xfs refuses less than 300 MB unless told it is a test.
	mkfs := exec.Command("mkfs.xfs", "-f", "-q", "-K", dev)
	mkfs.Env = append(os.Environ(), "TEST_DIR=1", "TEST_DEV=1", "QA_CHECK_FS=1")
	if out, err := mkfs.CombinedOutput(); err != nil {
		t.Fatalf("mkfs.xfs: %v: %s", err, out)
	}
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(dev, mnt, "xfs", false, false, nil); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("tandem"), 100000)
	if err := os.WriteFile(filepath.Join(mnt, "before"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	var before unix.Statfs_t
	if err := unix.Statfs(mnt, &before); err != nil {
		t.Fatal(err)
	}

	grown := vol
	grown.Size = large
	if _, err := u.Expand(ctx, grown); status.Code(err) != codes.Unavailable {
		t.Fatalf("Expand before the export grew: %v, want Unavailable", err)
	}
	be.grow(t, large)
	for round := 0; round < 2; round++ {
		size, err := u.Expand(ctx, grown)
		if err != nil || size != large {
			t.Fatalf("round %d: Expand: %d, %v; want %d", round, size, err, large)
		}
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		got, err := deviceSize(f)
		_ = f.Close()
		if err != nil || got != large {
			t.Fatalf("round %d: %s has %d bytes (%v), want %d", round, dev, got, err, large)
		}
		if err := m.Resize(ctx, dev, mnt, "xfs"); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	var after unix.Statfs_t
	if err := unix.Statfs(mnt, &after); err != nil {
		t.Fatal(err)
	}
	if gotBytes := int64(after.Blocks) * after.Bsize; gotBytes <= int64(before.Blocks)*before.Bsize || gotBytes < large*3/4 {
		t.Fatalf("the filesystem has %d bytes after xfs_growfs (%d before), want about %d", gotBytes, int64(before.Blocks)*before.Bsize, large)
	}
	// Written after the growth, beyond the old end as the filesystem fills.
	big := bytes.Repeat([]byte{7}, 18<<20)
	if err := os.WriteFile(filepath.Join(mnt, "after"), big, 0o600); err != nil {
		t.Fatalf("filling the grown filesystem: %v", err)
	}
	if err := m.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(dev, mnt, "xfs", false, true, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "before")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the file written before the growth: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "after")); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("the file written after the growth: %v", err)
	}
	if err := m.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	if err := u.Detach(ctx, vol.ID); err != nil {
		t.Fatal(err)
	}
}
