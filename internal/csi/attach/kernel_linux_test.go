package attach

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// fakeKernel stands in for the kernel's NBD driver: it keeps the sockets
// it is given and reads through them with the NBD transmission protocol,
// as the kernel would, so a test sees which member a device talks to.
type fakeKernel struct {
	mu       sync.Mutex
	next     uint32
	devs     map[uint32]net.Conn
	configs  map[uint32]KernelConfig
	connects int
	reconfs  int
	discs    []uint32
	// reconfigs are the RECONFIGUREs, in order; with sys set, a new size
	// is written to <sys>/nbdN/size as the kernel would show it.
	reconfigs []Reconfig
	sys       string
	dead      chan uint32
	closed    chan struct{}
	once      sync.Once
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{devs: map[uint32]net.Conn{}, configs: map[uint32]KernelConfig{}, dead: make(chan uint32, 8), closed: make(chan struct{})}
}

func (f *fakeKernel) Connect(c KernelConfig, sock *os.File) (uint32, error) {
	conn, err := net.FileConn(sock) // a duplicate, as the kernel takes its own reference
	if err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	idx := f.next
	f.next++
	f.devs[idx], f.configs[idx] = conn, c
	f.connects++
	return idx, nil
}

func (f *fakeKernel) Reconfigure(index uint32, r Reconfig) error {
	conn, err := net.FileConn(r.Sock)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.devs[index]; !ok {
		_ = conn.Close()
		return errors.New("no such device")
	}
	if c := f.configs[index]; c.Backend != "" && r.Backend != c.Backend {
		_ = conn.Close()
		return errors.New("must specify backend") // as Linux 5.14 and later
	}
	f.devs[index] = conn
	f.reconfs++
	f.reconfigs = append(f.reconfigs, r)
	if r.Size > 0 && f.sys != "" {
		if err := os.WriteFile(filepath.Join(f.sys, fmt.Sprintf("nbd%d", index), "size"), fmt.Appendf(nil, "%d\n", r.Size/512), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeKernel) Disconnect(index uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c, ok := f.devs[index]; ok {
		_ = c.Close()
		delete(f.devs, index)
	}
	f.discs = append(f.discs, index)
	return nil
}

func (f *fakeKernel) LinkDead() (uint32, error) {
	select {
	case idx := <-f.dead:
		return idx, nil
	case <-f.closed:
		return 0, errors.New("closed")
	}
}

func (f *fakeKernel) Close() error { f.once.Do(func() { close(f.closed) }); return nil }

// linkDies breaks device idx's socket and announces it, as the kernel
// does when the writer's node goes.
func (f *fakeKernel) linkDies(idx uint32) {
	f.mu.Lock()
	_ = f.devs[idx].Close()
	f.mu.Unlock()
	f.dead <- idx
}

// read sends one NBD read on device idx's socket and returns the data.
func (f *fakeKernel) read(t *testing.T, idx uint32, off int64, n int) []byte {
	t.Helper()
	f.mu.Lock()
	conn := f.devs[idx]
	f.mu.Unlock()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	req := make([]byte, 28)
	binary.BigEndian.PutUint32(req[0:], 0x25609513) // request magic
	binary.BigEndian.PutUint16(req[6:], 0)          // NBD_CMD_READ
	binary.BigEndian.PutUint64(req[8:], 7)          // handle
	binary.BigEndian.PutUint64(req[16:], uint64(off))
	binary.BigEndian.PutUint32(req[24:], uint32(n))
	if _, err := conn.Write(req); err != nil {
		t.Fatalf("read request on nbd%d: %v", idx, err)
	}
	rep := make([]byte, 16+n)
	if _, err := io.ReadFull(conn, rep); err != nil {
		t.Fatalf("read reply on nbd%d: %v", idx, err)
	}
	if m, e := binary.BigEndian.Uint32(rep[0:]), binary.BigEndian.Uint32(rep[4:]); m != 0x67446698 || e != 0 {
		t.Fatalf("reply on nbd%d: magic %#x error %d", idx, m, e)
	}
	return rep[16:]
}

func (f *fakeKernel) counts() (connects, reconfs int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connects, f.reconfs
}

// TestKernelFollowsTheWriter: the kernel path hands the kernel a socket
// that finished the NBD handshake with the writer, with the volume's size
// and the timeouts; when the link dies it hands it a socket to the member
// that is the writer now; a restarted plugin adopts the devices the kernel
// kept. (The kernel here has no NBD driver: the netlink encoding is tested
// against a fake of the family below, the kernel's behaviour is not.)
func TestKernelFollowsTheWriter(t *testing.T) {
	const size = 1 << 20
	beA, beB := nbd.NewMemBackend(size), nbd.NewMemBackend(size)
	if err := beA.WriteAt(context.Background(), []byte("on a"), 0, true); err != nil {
		t.Fatal(err)
	}
	if err := beB.WriteAt(context.Background(), []byte("on b"), 0, true); err != nil {
		t.Fatal(err)
	}
	a, b := startMember(t, beA), startMember(t, beB)
	r := &switchable{uri: a.uri}
	vol := csi.Volume{ID: "ns/vol", Size: size}
	sys := t.TempDir()
	fk := newFakeKernel()
	opts := KernelOptions{
		Resolver: func(csi.Volume) Resolver { return r.resolve },
		Log:      testr.New(t), IOTimeout: 20 * time.Second, SysBlock: sys,
		Lookup: func(_ context.Context, id string) (csi.Volume, error) {
			if id != vol.ID {
				return csi.Volume{}, errors.New("no such volume")
			}
			return vol, nil
		},
	}
	k := newKernel(opts, fk)
	defer k.Close()
	ctx := context.Background()

	dev, err := k.Attach(ctx, vol)
	if err != nil || dev != "/dev/nbd0" {
		t.Fatalf("Attach: %q, %v", dev, err)
	}
	c := fk.configs[0]
	if c.Size != size || c.BlockSize < 512 || c.Timeout != 30 || c.DeadConnTimeout != 20 || c.Backend != "tandem:ns/vol" || c.ServerFlags&nbd.FlagHasFlags == 0 {
		t.Fatalf("CONNECT configuration %+v", c)
	}
	if got := fk.read(t, 0, 0, 4); string(got) != "on a" {
		t.Fatalf("the device reads %q, want the writer a's data", got)
	}
	if dev2, err := k.Attach(ctx, vol); err != nil || dev2 != dev {
		t.Fatalf("second Attach: %q, %v", dev2, err)
	}
	if n, _ := fk.counts(); n != 1 {
		t.Fatalf("%d CONNECTs for one volume attached twice", n)
	}

	// The writer's node goes: b is the writer, the kernel reports the link
	// dead, the device gets a socket to b.
	r.set(b.uri)
	fk.linkDies(0)
	testkit.Eventually(t, 10*time.Second, "the device reconfigured to b", func() bool {
		_, n := fk.counts()
		return n == 1
	})
	if got := fk.read(t, 0, 0, 4); string(got) != "on b" || k.Writer(vol.ID) != b.uri {
		t.Fatalf("after the failover the device reads %q through %s, want b's data", got, k.Writer(vol.ID))
	}

	// A restarted plugin: the kernel kept nbd0, named by its backend.
	if err := os.MkdirAll(filepath.Join(sys, "nbd0"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sys, "nbd0", "backend"), []byte("tandem:ns/vol\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k.Close()
	fk2 := newFakeKernel()
	fk2.devs[0] = fk.devs[0]
	fk2.next = 1
	k2 := newKernel(opts, fk2)
	defer k2.Close()
	// Its link dies before anything staged the volume again: it is adopted
	// through Lookup and reconnected.
	r.set(a.uri)
	fk2.linkDies(0)
	testkit.Eventually(t, 10*time.Second, "the adopted device reconfigured to a", func() bool {
		_, n := fk2.counts()
		return n == 1
	})
	if got := fk2.read(t, 0, 0, 4); string(got) != "on a" {
		t.Fatalf("the adopted device reads %q, want a's data", got)
	}
	if dev, err := k2.Attach(ctx, vol); err != nil || dev != "/dev/nbd0" {
		t.Fatalf("Attach after the restart: %q, %v", dev, err)
	}
	if n, _ := fk2.counts(); n != 0 {
		t.Fatalf("the restarted plugin connected a second device (%d CONNECTs)", n)
	}
	if err := k2.Detach(ctx, vol.ID); err != nil || len(fk2.discs) != 1 || fk2.discs[0] != 0 {
		t.Fatalf("Detach: %v, disconnected %v", err, fk2.discs)
	}
	if err := k2.Detach(ctx, "ns/other"); err != nil {
		t.Fatalf("Detach of a volume never attached: %v", err)
	}

	// A writer whose export has another size is refused.
	other := csi.Volume{ID: "ns/vol2", Size: size * 2}
	if _, err := k2.Attach(ctx, other); err == nil || !strings.Contains(err.Error(), "exports 1048576 bytes") {
		t.Fatalf("Attach of a volume whose writer exports another size: %v", err)
	}
}

// TestNetlinkNBDMessages checks what the netlink driver sends the kernel's
// "nbd" family, and how it reads the answers, against genltest's fake.
func TestNetlinkNBDMessages(t *testing.T) {
	family := genetlink.Family{ID: 0x21, Version: 1, Name: "nbd", Groups: []genetlink.MulticastGroup{{ID: 5, Name: "nbd_mc_group"}}}
	sock, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	type attrs map[uint16][]byte
	decode := func(t *testing.T, b []byte) attrs {
		ad, err := netlink.NewAttributeDecoder(b)
		if err != nil {
			t.Fatal(err)
		}
		m := attrs{}
		for ad.Next() {
			m[ad.Type()] = ad.Bytes()
		}
		return m
	}
	var got []genetlink.Message
	cmd := genltest.Dial(genltest.ServeFamily(family, func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
		got = append(got, greq)
		if greq.Header.Command == nbdCmdConnect {
			ae := netlink.NewAttributeEncoder()
			ae.Uint32(nbdAttrIndex, 3)
			b, _ := ae.Encode()
			return []genetlink.Message{{Header: greq.Header, Data: b}}, nil
		}
		return []genetlink.Message{{Header: greq.Header}}, nil
	}))
	events := genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) { return nil, nil })
	var joined []uint32
	join := func(g uint32) error { joined = append(joined, g); return nil }
	n, err := newNetlinkNBD(cmd, events, join)
	if err != nil {
		t.Fatal(err)
	}
	if len(joined) != 1 || joined[0] != 5 {
		t.Fatalf("joined multicast groups %v, want nbd_mc_group (5)", joined)
	}
	defer n.Close()
	idx, err := n.Connect(KernelConfig{Size: 1 << 30, BlockSize: 4096, ServerFlags: 0x2d, Timeout: 30, DeadConnTimeout: 120, Backend: "tandem:ns/v"}, sock)
	if err != nil || idx != 3 {
		t.Fatalf("Connect: %d, %v", idx, err)
	}
	if err := n.Reconfigure(3, Reconfig{Backend: "tandem:ns/v", Sock: sock, Size: 2 << 30}); err != nil {
		t.Fatal(err)
	}
	if err := n.Disconnect(3); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("%d messages, want 3", len(got))
	}
	u64 := func(b []byte) uint64 { return binary.NativeEndian.Uint64(b) }
	u32 := func(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }
	fdOf := func(t *testing.T, b []byte) uint32 {
		socks := decode(t, b)
		item := decode(t, socks[nbdSockItem])
		return u32(item[nbdSockFD])
	}
	c := decode(t, got[0].Data)
	if got[0].Header.Command != nbdCmdConnect || got[0].Header.Version != 1 ||
		u64(c[nbdAttrSizeBytes]) != 1<<30 || u64(c[nbdAttrBlockSizeBytes]) != 4096 || u64(c[nbdAttrServerFlags]) != 0x2d ||
		u64(c[nbdAttrTimeout]) != 30 || u64(c[nbdAttrDeadConnTimeout]) != 120 || u64(c[nbdAttrClientFlags]) != nbdCFlagDestroyOnDisconnect ||
		!bytes.Equal(bytes.TrimRight(c[nbdAttrBackendIdentifier], "\x00"), []byte("tandem:ns/v")) || fdOf(t, c[nbdAttrSockets]) != uint32(sock.Fd()) {
		t.Fatalf("CONNECT %+v attributes %v", got[0].Header, c)
	}
	r := decode(t, got[1].Data)
	if got[1].Header.Command != nbdCmdReconfigure || u32(r[nbdAttrIndex]) != 3 || fdOf(t, r[nbdAttrSockets]) != uint32(sock.Fd()) ||
		u64(r[nbdAttrSizeBytes]) != 2<<30 || !bytes.Equal(bytes.TrimRight(r[nbdAttrBackendIdentifier], "\x00"), []byte("tandem:ns/v")) {
		t.Fatalf("RECONFIGURE %+v attributes %v", got[1].Header, r)
	}
	d := decode(t, got[2].Data)
	if got[2].Header.Command != nbdCmdDisconnect || u32(d[nbdAttrIndex]) != 3 {
		t.Fatalf("DISCONNECT %+v attributes %v", got[2].Header, d)
	}

	// A kernel without the driver: the family is unknown.
	none := genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(2) // ENOENT, as for an unknown family
	})
	if _, err := newNetlinkNBD(none, events, join); err == nil || !strings.Contains(err.Error(), "module nbd") {
		t.Fatalf("no NBD family: %v", err)
	}
	// A driver without the multicast group cannot report dead links.
	bare := family
	bare.Groups = nil
	noGroup := genltest.Dial(genltest.ServeFamily(bare, func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) { return nil, nil }))
	if _, err := newNetlinkNBD(noGroup, events, join); err == nil || !strings.Contains(err.Error(), "multicast group") {
		t.Fatalf("no multicast group: %v", err)
	}
}

// TestKernelExpand: the kernel path grows an attached device online: it
// refuses (Unavailable) while the writer's export is smaller; once the
// export has grown, the device's socket is cut, and the reconnect hands
// the kernel a new socket with the new size (RECONFIGURE naming the
// device's backend, NBD_ATTR_SIZE_BYTES); Expand returns once the device
// shows it and does nothing more the second time. A failover to a writer
// whose export grew is followed without changing the size. A volume not
// attached is NotFound; one staged before its replicas grew waits.
func TestKernelExpand(t *testing.T) {
	const size = 1 << 20
	a := startMember(t, newGrowable(size))
	r := &switchable{uri: a.uri}
	sys := t.TempDir()
	fk := newFakeKernel()
	fk.sys = sys
	k := newKernel(KernelOptions{Resolver: func(csi.Volume) Resolver { return r.resolve }, Log: testr.New(t), SysBlock: sys, IOTimeout: 10 * time.Second, ExpandTimeout: 5 * time.Second}, fk)
	defer k.Close()
	k.cutLink = func(a *kernelAttachment) error { fk.linkDies(a.index); return nil }
	ctx := context.Background()
	vol := csi.Volume{ID: "ns/vol", Size: size}
	if _, err := k.Expand(ctx, vol); status.Code(err) != codes.NotFound {
		t.Fatalf("Expand of a volume not attached: %v, want NotFound", err)
	}
	if _, err := k.Attach(ctx, vol); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(sys, "nbd0"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sys, "nbd0", "size"), []byte("2048\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := k.Expand(ctx, vol); err != nil || got != size {
		t.Fatalf("Expand to the device's size: %d, %v", got, err)
	}

	// A failover to a writer whose export grew: followed, same size.
	b := newGrowable(size)
	b.grow(t, 2*size)
	mb := startMember(t, b)
	r.set(mb.uri)
	fk.linkDies(0)
	testkit.Eventually(t, 10*time.Second, "the device reconfigured to the grown writer", func() bool {
		_, n := fk.counts()
		return n == 1
	})
	if rc := fk.reconfigs[0]; rc.Size != 0 || rc.Backend != "tandem:ns/vol" {
		t.Fatalf("RECONFIGURE after the failover %+v, want the backend and no size", rc)
	}

	// Back to a, which has not grown yet: Expand waits for it.
	r.set(a.uri)
	grown := vol
	grown.Size = 2 * size
	if _, err := k.Expand(ctx, grown); status.Code(err) != codes.Unavailable {
		t.Fatalf("Expand before the export grew: %v, want Unavailable", err)
	}
	if _, err := k.Attach(ctx, csi.Volume{ID: "ns/vol2", Size: 2 * size}); status.Code(err) != codes.Unavailable {
		t.Fatalf("Attach while the export is smaller than the VolumePair: %v, want Unavailable", err)
	}
	a.be.(*growable).grow(t, 2*size)
	for round := 0; round < 2; round++ {
		got, err := k.Expand(ctx, grown)
		if err != nil || got != 2*size {
			t.Fatalf("round %d: Expand: %d, %v; want %d", round, got, err, 2*size)
		}
	}
	_, n := fk.counts()
	if n != 2 || fk.reconfigs[1].Size != 2*size || fk.reconfigs[1].Backend != "tandem:ns/vol" {
		t.Fatalf("%d RECONFIGUREs, the last %+v; want a second one with the new size", n, fk.reconfigs[len(fk.reconfigs)-1])
	}
	if got := fk.read(t, 0, size+4096, 4); !bytes.Equal(got, make([]byte, 4)) {
		t.Fatalf("reading beyond the old end through the new socket: %q", got)
	}
}
