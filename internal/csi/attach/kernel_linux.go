package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/csi"
)

// Kernel attaches volumes with the kernel's NBD client: the node plugin
// dials the pair's writer, performs the NBD handshake itself and hands the
// connected socket to the kernel (generic netlink CONNECT), which serves
// /dev/nbdN from then on without this process in the data path. The
// device outlives the node plugin: a restarted plugin finds it by its
// backend name (/sys/block/nbdN/backend).
//
// Following the writer: a failover to another node breaks the socket; the
// kernel announces the dead link, holds the device's requests for
// IOTimeout (its dead-connection timeout), and this attacher dials the
// writer the VolumePair names now and hands the kernel the new socket
// (RECONFIGURE); requests in flight on the dead socket are sent again when
// their Timeout expires. A switchover or failback leaves the old writer's
// connection working: the old writer forwards its requests to the new one
// (dataplane/volume, forward.go).
//
// Growing a volume (Expand) reuses that: the device's socket is shut down,
// and the reconnect hands the kernel a new socket with the new size.
type Kernel struct {
	opts KernelOptions
	nl   kernelNBD

	mu       sync.Mutex
	attached map[string]*kernelAttachment // volume ID
	byIndex  map[uint32]*kernelAttachment
	done     chan struct{}

	// cutLink makes the kernel drop a device's socket (tests replace it).
	cutLink func(a *kernelAttachment) error
}

// KernelOptions configure the kernel attach path.
type KernelOptions struct {
	// Resolver returns the Resolver of a volume's writer.
	Resolver func(csi.Volume) Resolver
	Log      logr.Logger
	// IOTimeout is how long requests wait for a dead connection to be
	// replaced before they fail (default DefaultIOTimeout).
	IOTimeout time.Duration
	// RequestTimeout is how long one request may go unanswered before the
	// kernel gives up on its connection and sends it again on the next
	// one (default 30 s).
	RequestTimeout time.Duration
	// SysBlock is /sys/block (tests point it elsewhere).
	SysBlock string
	// ExpandTimeout bounds Expand's wait for the device to show its new
	// size (default 20 s).
	ExpandTimeout time.Duration
	// Lookup describes a volume by its ID: a device attached by an earlier
	// run of the node plugin is followed again when its link dies.
	Lookup func(ctx context.Context, id string) (csi.Volume, error)
	// TLS, when set, upgrades every connection with NBD_OPT_STARTTLS; the
	// kernel then gets a socket of a relay in this process (relayTLS).
	TLS TLSConfig
}

type kernelAttachment struct {
	vol   csi.Volume
	index uint32
	// writer is the export the device's socket goes to.
	writer string
	// sock is this process's duplicate of the socket the kernel serves
	// the device over (nil for a device adopted after a restart, until
	// its first reconnect): shutting it down makes the kernel drop it.
	sock *os.File
	// growTo is the size the device takes with its next socket (0: none).
	growTo int64
}

// NewKernel returns the kernel attacher, or an error saying why this node
// cannot use it (no NBD driver in the kernel).
func NewKernel(o KernelOptions) (*Kernel, error) {
	nl, err := openNetlinkNBD()
	if err != nil {
		return nil, err
	}
	return newKernel(o, nl), nil
}

func newKernel(o KernelOptions, nl kernelNBD) *Kernel {
	if o.IOTimeout <= 0 {
		o.IOTimeout = DefaultIOTimeout
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	if o.SysBlock == "" {
		o.SysBlock = "/sys/block"
	}
	if o.ExpandTimeout <= 0 {
		o.ExpandTimeout = 20 * time.Second
	}
	k := &Kernel{opts: o, nl: nl, attached: map[string]*kernelAttachment{}, byIndex: map[uint32]*kernelAttachment{}, done: make(chan struct{}),
		cutLink: func(a *kernelAttachment) error { return unix.Shutdown(int(a.sock.Fd()), unix.SHUT_RDWR) }}
	go k.watch()
	return k
}

// Close stops following writers; the devices stay.
func (k *Kernel) Close() error {
	select {
	case <-k.done:
		return nil
	default:
	}
	close(k.done)
	return k.nl.Close()
}

func backendName(id string) string { return "tandem:" + id }

// DevicePath is the device of index.
func DevicePath(index uint32) string { return fmt.Sprintf("/dev/nbd%d", index) }

// Attach returns the volume's device, connecting it first.
func (k *Kernel) Attach(ctx context.Context, vol csi.Volume) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if a, ok := k.attached[vol.ID]; ok {
		return DevicePath(a.index), nil
	}
	if idx, ok := k.find(vol.ID); ok {
		// Attached by this plugin before it restarted: the kernel kept it.
		a := &kernelAttachment{vol: vol, index: idx}
		k.attached[vol.ID], k.byIndex[idx] = a, a
		k.opts.Log.Info("Volume attached before a restart, adopted", "volume", vol.ID, "device", DevicePath(idx))
		return DevicePath(idx), nil
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	sock, info, uri, err := k.dial(cctx, vol)
	cancel()
	if err != nil {
		return "", status.Errorf(codes.Unavailable, "volume %s has no writer to connect to yet: %v", vol.ID, err)
	}
	keep := false
	defer func() {
		if !keep {
			_ = sock.Close()
		}
	}()
	if info.Size < vol.Size {
		return "", status.Errorf(codes.Unavailable, "volume %s: the writer exports %d bytes, the VolumePair says %d: its replicas have not grown yet", vol.ID, info.Size, vol.Size)
	}
	if info.Size != vol.Size {
		return "", status.Errorf(codes.Internal, "volume %s: the writer exports %d bytes, the VolumePair says %d", vol.ID, info.Size, vol.Size)
	}
	idx, err := k.nl.Connect(KernelConfig{
		Size: info.Size, BlockSize: max(info.MinBlock, 512), ServerFlags: info.Flags,
		Timeout: seconds(k.opts.RequestTimeout), DeadConnTimeout: seconds(k.opts.IOTimeout), Backend: backendName(vol.ID),
	}, sock)
	if err != nil {
		return "", fmt.Errorf("connecting volume %s to the kernel's NBD client: %w", vol.ID, err)
	}
	a := &kernelAttachment{vol: vol, index: idx, writer: uri, sock: sock}
	keep = true // the kernel holds its own reference; this one is for Expand
	k.attached[vol.ID], k.byIndex[idx] = a, a
	k.opts.Log.Info("Volume attached", "volume", vol.ID, "device", DevicePath(idx), "writer", uri, "path", "kernel NBD")
	return DevicePath(idx), nil
}

func seconds(d time.Duration) uint64 { return uint64((d + time.Second - 1) / time.Second) }

// find looks for a device whose backend names the volume.
func (k *Kernel) find(id string) (uint32, bool) {
	want := backendName(id)
	matches, _ := filepath.Glob(filepath.Join(k.opts.SysBlock, "nbd*", "backend"))
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil || strings.TrimSpace(string(b)) != want {
			continue
		}
		var idx uint32
		if _, err := fmt.Sscanf(filepath.Base(filepath.Dir(m)), "nbd%d", &idx); err == nil {
			return idx, true
		}
	}
	return 0, false
}

// dial connects to the volume's writer and performs the handshake; the
// socket is returned as a file for the kernel.
func (k *Kernel) dial(ctx context.Context, vol csi.Volume) (*os.File, nbd.ExportInfo, string, error) {
	uri, err := k.opts.Resolver(vol)(ctx)
	if err != nil {
		return nil, nbd.ExportInfo{}, "", fmt.Errorf("finding the writer: %w", err)
	}
	addr, name, err := ParseURI(uri)
	if err != nil {
		return nil, nbd.ExportInfo{}, "", err
	}
	opts, err := clientOptions(k.opts.TLS)
	if err != nil {
		return nil, nbd.ExportInfo{}, "", err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nbd.ExportInfo{}, "", fmt.Errorf("dialing %s: %w", addr, err)
	}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		conn.Close()
		return nil, nbd.ExportInfo{}, "", fmt.Errorf("dialing %s: not a TCP connection", addr)
	}
	_ = tc.SetNoDelay(true)
	info, nc, err := nbd.Negotiate(ctx, conn, name, opts...)
	if err != nil {
		conn.Close()
		return nil, nbd.ExportInfo{}, "", fmt.Errorf("NBD server %s: %w", addr, err)
	}
	if nc != conn {
		// TLS: the kernel gets the relay's socket; the relay owns conn.
		f, err := relayTLS(nc, k.opts.Log.WithValues("volume", vol.ID, "writer", uri))
		if err != nil {
			nc.Close()
			return nil, nbd.ExportInfo{}, "", err
		}
		return f, info, uri, nil
	}
	defer conn.Close() // File() below is a duplicate
	f, err := tc.File()
	if err != nil {
		return nil, nbd.ExportInfo{}, "", fmt.Errorf("the socket to %s: %w", addr, err)
	}
	return f, info, uri, nil
}

// Detach disconnects the volume's device (the filesystem on it was
// unmounted, which flushed it).
func (k *Kernel) Detach(_ context.Context, id string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	a, ok := k.attached[id]
	if !ok {
		idx, found := k.find(id)
		if !found {
			return nil
		}
		a = &kernelAttachment{index: idx}
	}
	if err := k.nl.Disconnect(a.index); err != nil {
		return err
	}
	if a.sock != nil {
		_ = a.sock.Close()
	}
	delete(k.attached, id)
	delete(k.byIndex, a.index)
	k.opts.Log.Info("Volume detached", "volume", id, "device", DevicePath(a.index))
	return nil
}

// Attached lists the volume IDs attached by this process.
func (k *Kernel) Attached() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	ids := make([]string, 0, len(k.attached))
	for id := range k.attached {
		ids = append(ids, id)
	}
	return ids
}

// watch reconnects devices whose link died.
func (k *Kernel) watch() {
	for {
		idx, err := k.nl.LinkDead()
		if err != nil {
			select {
			case <-k.done:
				return
			default:
			}
			k.opts.Log.Error(err, "Reading the kernel's NBD notifications failed; dead connections are not replaced until a restart")
			return
		}
		k.mu.Lock()
		a := k.byIndex[idx]
		k.mu.Unlock()
		if a == nil {
			a = k.adopt(idx)
		}
		if a == nil {
			continue // not a Tandem device
		}
		go k.reconnect(a)
	}
}

// adopt takes over device idx when an earlier run of the node plugin
// attached it (its backend names a volume); nil when it is not Tandem's.
func (k *Kernel) adopt(idx uint32) *kernelAttachment {
	b, err := os.ReadFile(filepath.Join(k.opts.SysBlock, fmt.Sprintf("nbd%d", idx), "backend"))
	id, ours := strings.CutPrefix(strings.TrimSpace(string(b)), backendName(""))
	if err != nil || !ours || k.opts.Lookup == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	vol, err := k.opts.Lookup(ctx, id)
	if err != nil {
		k.opts.Log.Error(err, "A device of an earlier run lost its connection, and its volume cannot be read", "device", DevicePath(idx), "volume", id)
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if a, ok := k.attached[id]; ok {
		return a
	}
	a := &kernelAttachment{vol: vol, index: idx}
	k.attached[id], k.byIndex[idx] = a, a
	k.opts.Log.Info("Volume attached before a restart, adopted", "volume", id, "device", DevicePath(idx))
	return a
}

// reconnect hands the kernel a socket to the volume's writer now, trying
// until the kernel's dead-connection timeout has passed.
func (k *Kernel) reconnect(a *kernelAttachment) {
	log := k.opts.Log.WithValues("volume", a.vol.ID, "device", DevicePath(a.index))
	deadline := time.Now().Add(k.opts.IOTimeout)
	backoff := 50 * time.Millisecond
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-k.done:
			return
		default:
		}
		err := func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			k.mu.Lock()
			vol, growTo := a.vol, a.growTo
			k.mu.Unlock()
			sock, info, uri, err := k.dial(ctx, vol)
			if err != nil {
				return err
			}
			// A larger export is the volume grown since the device was
			// attached: the device keeps its size unless Expand asked for
			// the new one.
			if info.Size < vol.Size {
				_ = sock.Close()
				return fmt.Errorf("the writer %s exports %d bytes, the device has %d", uri, info.Size, vol.Size)
			}
			rc := Reconfig{Backend: backendName(vol.ID), Sock: sock}
			if growTo > 0 && info.Size >= growTo {
				rc.Size = growTo
			}
			if err := k.nl.Reconfigure(a.index, rc); err != nil {
				_ = sock.Close()
				return err
			}
			k.mu.Lock()
			from := a.writer
			a.writer = uri
			if a.sock != nil {
				_ = a.sock.Close()
			}
			a.sock = sock
			if rc.Size > 0 {
				a.vol.Size, a.growTo = rc.Size, 0
			}
			k.mu.Unlock()
			if rc.Size > 0 {
				log.Info("Device grown", "writer", uri, "size", rc.Size)
			}
			if from != uri {
				log.Info("Following the writer", "from", from, "to", uri)
			}
			return nil
		}()
		if err == nil {
			return
		}
		if last == nil || err.Error() != last.Error() {
			log.V(1).Info("Reconnecting the device", "error", err.Error())
		}
		last = err
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Second)
	}
	log.Error(errors.Join(errors.New("no writer answered within the dead-connection timeout"), last), "The device fails its requests until the volume is staged again")
}

// Writer is the export a device's socket goes to ("" when unknown), for
// status and tests.
func (k *Kernel) Writer(id string) string {
	k.mu.Lock()
	defer k.mu.Unlock()
	if a, ok := k.attached[id]; ok {
		return a.writer
	}
	return ""
}

// Expand grows the device of an attached volume to vol.Size once the
// writer's export serves that: the kernel's socket keeps the size its
// handshake negotiated (NBD has no in-band resize) and RECONFIGURE only
// replaces dead sockets, so Expand shuts the device's socket down; the
// kernel reports the dead link, holds the device's requests, and the
// reconnect (as after a failover) hands it a new socket together with the
// new size (RECONFIGURE with NBD_ATTR_SIZE_BYTES). Requests that were in
// flight are sent again at the latest when their request timeout expires.
// Expand returns the device's size once it shows vol.Size (sysfs), or
// Unavailable after ExpandTimeout. A device adopted after a restart of the
// node plugin, whose socket this process does not hold, grows at its next
// reconnect or stage (FailedPrecondition until then).
func (k *Kernel) Expand(ctx context.Context, vol csi.Volume) (int64, error) {
	k.mu.Lock()
	a, ok := k.attached[vol.ID]
	k.mu.Unlock()
	if !ok {
		return 0, status.Errorf(codes.NotFound, "volume %s is not attached on this node", vol.ID)
	}
	size, err := k.deviceSize(a.index)
	if err != nil || size >= vol.Size {
		return size, err
	}
	// The export must serve the size before the device asks for it.
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	sock, info, uri, err := k.dial(cctx, vol)
	cancel()
	if err != nil {
		return 0, status.Errorf(codes.Unavailable, "volume %s: connecting to its writer: %v", vol.ID, err)
	}
	_ = sock.Close()
	if info.Size < vol.Size {
		return 0, status.Errorf(codes.Unavailable, "volume %s: its writer %s exports %d bytes, not yet %d", vol.ID, uri, info.Size, vol.Size)
	}
	k.mu.Lock()
	held := a.sock != nil
	if held && a.growTo < vol.Size {
		a.growTo = vol.Size
	}
	k.mu.Unlock()
	if !held {
		return 0, status.Errorf(codes.FailedPrecondition, "volume %s: %s was attached by an earlier run of the node plugin, which held its socket; it takes the new size at its next reconnect, or when staged again (restart its Pod)",
			vol.ID, DevicePath(a.index))
	}
	if err := k.cutLink(a); err != nil {
		return 0, fmt.Errorf("volume %s: shutting down the socket of %s for a new one: %w", vol.ID, DevicePath(a.index), err)
	}
	deadline := time.Now().Add(k.opts.ExpandTimeout)
	for {
		size, err := k.deviceSize(a.index)
		if err == nil && size >= vol.Size {
			k.opts.Log.Info("Volume device grown", "volume", vol.ID, "device", DevicePath(a.index), "size", size)
			return size, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return 0, status.Errorf(codes.Unavailable, "volume %s: %s has %d bytes, %d requested, %s after its socket was replaced (%v)", vol.ID, DevicePath(a.index), size, vol.Size, k.opts.ExpandTimeout, err)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
		}
	}
}

// deviceSize reads a device's size from sysfs (512-byte sectors).
func (k *Kernel) deviceSize(index uint32) (int64, error) {
	b, err := os.ReadFile(filepath.Join(k.opts.SysBlock, fmt.Sprintf("nbd%d", index), "size"))
	if err != nil {
		return 0, fmt.Errorf("the size of %s: %w", DevicePath(index), err)
	}
	var sectors int64
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &sectors); err != nil {
		return 0, fmt.Errorf("the size of %s: %q: %w", DevicePath(index), b, err)
	}
	return sectors * 512, nil
}
