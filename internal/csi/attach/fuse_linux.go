package attach

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tandem-storage/tandem/internal/csi"
)

// UserSpace attaches volumes without the kernel's NBD client: a FUSE
// filesystem per volume with one file, "disk", whose reads and writes a
// Follower sends to the pair's writer, and a loop device on that file. The
// page cache of the file is bypassed (direct I/O), so every write the
// filesystem above issues reaches the writer, and its flushes become NBD
// flushes.
//
// The FUSE file is served by this process: when it exits, the loop devices
// it attached fail every request until their volumes are staged again (see
// docs/install.md, "Which attach path a node uses").
type UserSpace struct {
	// Dir holds one FUSE mount point per attached volume.
	Dir string
	// Resolver returns the Resolver of a volume's writer.
	Resolver func(csi.Volume) Resolver
	Log      logr.Logger
	// IOTimeout bounds one request's retries (default DefaultIOTimeout).
	IOTimeout time.Duration
	// TLS, when set, upgrades every connection with NBD_OPT_STARTTLS.
	TLS TLSConfig

	mu       sync.Mutex
	attached map[string]*userAttachment
}

type userAttachment struct {
	follower *Follower
	server   *fuse.Server
	mnt      string
	loop     *loopDevice
	disk     *fuseDisk
}

// Attach returns the loop device of the volume, attaching it first.
func (u *UserSpace) Attach(ctx context.Context, vol csi.Volume) (string, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if a, ok := u.attached[vol.ID]; ok {
		return a.loop.path, nil
	}
	f := &Follower{Resolve: u.Resolver(vol), IOTimeout: u.IOTimeout, Log: u.Log.WithValues("volume", vol.ID), TLS: u.TLS}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	size, err := f.Connect(cctx)
	cancel()
	if err != nil {
		f.Close()
		return "", status.Errorf(codes.Unavailable, "volume %s has no writer to connect to yet: %v", vol.ID, err)
	}
	if size < vol.Size {
		f.Close()
		return "", status.Errorf(codes.Unavailable, "volume %s: the writer exports %d bytes, the VolumePair says %d: its replicas have not grown yet", vol.ID, size, vol.Size)
	}
	if size != vol.Size {
		f.Close()
		return "", status.Errorf(codes.Internal, "volume %s: the writer exports %d bytes, the VolumePair says %d", vol.ID, size, vol.Size)
	}
	sum := sha256.Sum256([]byte(vol.ID))
	mnt := filepath.Join(u.Dir, hex.EncodeToString(sum[:8]))
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		f.Close()
		return "", fmt.Errorf("FUSE mount point: %w", err)
	}
	disk := &fuseDisk{f: f}
	disk.size.Store(size)
	root := &fuseRoot{disk: disk}
	srv, err := fs.Mount(mnt, root, &fs.Options{MountOptions: fuse.MountOptions{
		FsName: "tandem:" + vol.ID, Name: "tandem", DirectMount: true, DirectMountStrict: true,
		AllowOther: true, MaxWrite: 1 << 20, DisableXAttrs: true,
	}})
	if err != nil {
		f.Close()
		return "", fmt.Errorf("mounting the FUSE file of %s at %s: %w", vol.ID, mnt, err)
	}
	backing, err := os.OpenFile(filepath.Join(mnt, "disk"), os.O_RDWR, 0)
	if err != nil {
		_ = srv.Unmount()
		f.Close()
		return "", fmt.Errorf("opening the FUSE file of %s: %w", vol.ID, err)
	}
	loop, err := attachLoop(backing, "tandem:"+vol.ID)
	_ = backing.Close() // the loop device holds its own reference
	if err != nil {
		_ = srv.Unmount()
		f.Close()
		return "", err
	}
	if u.attached == nil {
		u.attached = map[string]*userAttachment{}
	}
	u.attached[vol.ID] = &userAttachment{follower: f, server: srv, mnt: mnt, loop: loop, disk: disk}
	u.Log.Info("Volume attached", "volume", vol.ID, "device", loop.path, "writer", f.Endpoint())
	return loop.path, nil
}

// Detach unbinds the loop device, unmounts the FUSE file and disconnects.
func (u *UserSpace) Detach(_ context.Context, id string) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	a, ok := u.attached[id]
	if !ok {
		return nil
	}
	if err := a.loop.detach(); err != nil {
		return err
	}
	// A flush the loop device issued last must not be lost: the follower
	// is closed only after the file's last request.
	if err := a.server.Unmount(); err != nil {
		return fmt.Errorf("unmounting the FUSE file of %s: %w", id, err)
	}
	a.follower.Close()
	_ = os.Remove(a.mnt)
	delete(u.attached, id)
	u.Log.Info("Volume detached", "volume", id)
	return nil
}

// Attached lists the volume IDs attached now.
func (u *UserSpace) Attached() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	ids := make([]string, 0, len(u.attached))
	for id := range u.attached {
		ids = append(ids, id)
	}
	return ids
}

// Follower returns the follower of an attached volume (nil when not
// attached), for status and tests.
func (u *UserSpace) Follower(id string) *Follower {
	u.mu.Lock()
	defer u.mu.Unlock()
	if a, ok := u.attached[id]; ok {
		return a.follower
	}
	return nil
}

// Expand grows the device of an attached volume to the size its writer's
// export serves now, once that is at least vol.Size: the follower connects
// anew (a new NBD connection negotiates the new size), the FUSE file
// takes that size (its cached attributes invalidated), and the loop device
// is told its capacity changed (LOOP_SET_CAPACITY). It returns the loop
// device's size; a device already grown is left as it is.
func (u *UserSpace) Expand(ctx context.Context, vol csi.Volume) (int64, error) {
	u.mu.Lock()
	a, ok := u.attached[vol.ID]
	u.mu.Unlock()
	if !ok {
		return 0, status.Errorf(codes.NotFound, "volume %s is not attached on this node", vol.ID)
	}
	if a.disk.size.Load() < vol.Size {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		size, err := a.follower.Refresh(cctx)
		cancel()
		if err != nil {
			return 0, status.Errorf(codes.Unavailable, "volume %s: connecting to its writer anew: %v", vol.ID, err)
		}
		if size < vol.Size {
			return 0, status.Errorf(codes.Unavailable, "volume %s: its writer exports %d bytes, not yet %d", vol.ID, size, vol.Size)
		}
		if size > a.disk.size.Load() {
			a.disk.size.Store(size)
		}
	}
	if err := a.disk.refreshSize(filepath.Join(a.mnt, "disk")); err != nil {
		return 0, fmt.Errorf("volume %s: %w", vol.ID, err)
	}
	dev, err := a.loop.setCapacity()
	if err != nil {
		return 0, fmt.Errorf("volume %s: %w", vol.ID, err)
	}
	if dev != a.disk.size.Load() {
		return 0, status.Errorf(codes.Internal, "volume %s: the loop device %s has %d bytes after LOOP_SET_CAPACITY, its file %d", vol.ID, a.loop.path, dev, a.disk.size.Load())
	}
	u.Log.Info("Volume device grown", "volume", vol.ID, "device", a.loop.path, "size", dev)
	return dev, nil
}

type fuseRoot struct {
	fs.Inode
	disk *fuseDisk
}

var _ fs.NodeOnAdder = (*fuseRoot)(nil)

func (r *fuseRoot) OnAdd(ctx context.Context) {
	r.AddChild("disk", r.NewPersistentInode(ctx, r.disk, fs.StableAttr{Mode: syscall.S_IFREG}), false)
}

// fuseDisk is the file "disk": the volume.
type fuseDisk struct {
	fs.Inode
	f *Follower
	// size is the volume's size as the follower's connection serves it;
	// it grows (Expand), never shrinks.
	size atomic.Int64
}

var (
	_ fs.NodeGetattrer = (*fuseDisk)(nil)
	_ fs.NodeSetattrer = (*fuseDisk)(nil)
	_ fs.NodeOpener    = (*fuseDisk)(nil)
	_ fs.NodeReader    = (*fuseDisk)(nil)
	_ fs.NodeWriter    = (*fuseDisk)(nil)
	_ fs.NodeFsyncer   = (*fuseDisk)(nil)
	_ fs.NodeFlusher   = (*fuseDisk)(nil)
)

func (d *fuseDisk) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o600
	size := d.size.Load()
	out.Size = uint64(size)
	out.Blocks = uint64(size) / 512
	out.Blksize = 4096
	return 0
}

// Setattr allows only what changes nothing (a truncate to the same size).
func (d *fuseDisk) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != d.size.Load() {
		return syscall.EPERM
	}
	return d.Getattr(ctx, fh, out)
}

func (d *fuseDisk) Open(context.Context, uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (d *fuseDisk) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := d.size.Load()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := min(int64(len(dest)), size-off)
	if err := d.f.ReadAt(ctx, dest[:n], off); err != nil {
		return nil, errno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (d *fuseDisk) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off < 0 || off+int64(len(data)) > d.size.Load() {
		return 0, syscall.ENOSPC
	}
	if err := d.f.WriteAt(ctx, data, off, false); err != nil {
		return 0, errno(err)
	}
	return uint32(len(data)), 0
}

func (d *fuseDisk) Fsync(ctx context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	return errno(d.f.Flush(ctx))
}

// refreshSize makes the kernel take the file's size again: its cached
// attributes are invalidated (FUSE_NOTIFY_INVAL_INODE), and a stat of the
// file (at path) fetches them, which sets the inode's size that the loop
// device reads.
func (d *fuseDisk) refreshSize(path string) error {
	want := d.size.Load()
	if errno := d.NotifyContent(-1, 0); errno != 0 && errno != syscall.ENOENT {
		return fmt.Errorf("invalidating the attributes of the FUSE file %s: %w", path, errno)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("the FUSE file: %w", err)
	}
	if fi.Size() != want {
		return fmt.Errorf("the FUSE file %s has %d bytes after its attributes were invalidated, want %d", path, fi.Size(), want)
	}
	return nil
}

// Flush (a close of the file) does not flush the volume: the loop device
// and fsync do.
func (d *fuseDisk) Flush(context.Context, fs.FileHandle) syscall.Errno { return 0 }

// errno maps a follower error to what the kernel reports up the stack.
func errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	for _, want := range []syscall.Errno{syscall.ENOSPC, syscall.EINVAL, syscall.EROFS} {
		if errors.Is(err, want) {
			return want
		}
	}
	if errors.As(err, &e) && e == syscall.EINTR {
		return syscall.EINTR
	}
	return syscall.EIO
}
