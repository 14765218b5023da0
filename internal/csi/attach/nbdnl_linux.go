package attach

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// The kernel's NBD driver is configured over generic netlink (family "nbd",
// linux/nbd-netlink.h): CONNECT hands it connected sockets and returns the
// device's index (/dev/nbdN), RECONFIGURE replaces a dead socket and changes
// the size, DISCONNECT ends the device, and the family's multicast group
// announces LINK_DEAD when a socket fails. Written on mdlayher/genetlink
// rather than the nbd-client tool: the node plugin has to pass the socket it
// negotiated itself (the handshake is Tandem's, the transmission the
// kernel's), and to hear about dead links to reconnect them to the pair's
// current writer.
const (
	nbdFamily     = "nbd"
	nbdMcastGroup = "nbd_mc_group"

	nbdCmdConnect     = 1
	nbdCmdDisconnect  = 2
	nbdCmdReconfigure = 3
	nbdCmdLinkDead    = 4

	nbdAttrIndex             = 1
	nbdAttrSizeBytes         = 2
	nbdAttrBlockSizeBytes    = 3
	nbdAttrTimeout           = 4
	nbdAttrServerFlags       = 5
	nbdAttrClientFlags       = 6
	nbdAttrSockets           = 7
	nbdAttrDeadConnTimeout   = 8
	nbdAttrBackendIdentifier = 10 // Linux 5.14 and later; older kernels ignore it

	nbdSockItem = 1
	nbdSockFD   = 1

	// nbdCFlagDestroyOnDisconnect frees the device when it disconnects.
	nbdCFlagDestroyOnDisconnect = 1 << 0
)

// KernelConfig is a device's configuration at CONNECT.
type KernelConfig struct {
	Size        int64
	BlockSize   uint32 // the export's minimum block size, at least 512
	ServerFlags uint16 // the export's transmission flags
	// Timeout is how long one request may take before the kernel treats
	// its connection as dead; DeadConnTimeout how long requests wait for a
	// dead connection to be replaced before they fail (seconds).
	Timeout, DeadConnTimeout uint64
	// Backend names the device's volume in /sys/block/nbdN/backend, so a
	// restarted node plugin finds the devices it attached.
	Backend string
}

// Reconfig is what a RECONFIGURE changes.
type Reconfig struct {
	// Backend is the device's backend name; the kernel refuses to
	// reconfigure a device that has one unless it is named (Linux 5.14
	// and later).
	Backend string
	// Sock replaces a dead socket (nil: none). The kernel ignores it when
	// no socket of the device is dead.
	Sock *os.File
	// Size is the device's new size in bytes (0: unchanged); the kernel
	// applies it before taking the socket.
	Size int64
}

// kernelNBD is the part of the kernel's NBD driver the attacher uses; the
// netlink one below, and a fake in tests.
type kernelNBD interface {
	// Connect creates a device served over sock and returns its index.
	Connect(c KernelConfig, sock *os.File) (uint32, error)
	// Reconfigure changes device index: a new socket in place of a dead
	// one, and a new size.
	Reconfigure(index uint32, r Reconfig) error
	// Disconnect ends device index.
	Disconnect(index uint32) error
	// LinkDead returns the index of the next device whose socket died;
	// it blocks until there is one, and fails once Close was called.
	LinkDead() (uint32, error)
	Close() error
}

// netlinkNBD talks to the kernel: one connection for commands, one joined
// to the multicast group for LINK_DEAD.
type netlinkNBD struct {
	mu     sync.Mutex // one command at a time on cmd
	cmd    *genetlink.Conn
	events *genetlink.Conn
	family genetlink.Family
}

// openNetlinkNBD connects to the kernel's NBD driver. It fails when the
// kernel has none (module nbd not loaded): generic netlink does not know the
// family.
func openNetlinkNBD() (*netlinkNBD, error) {
	cmd, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("generic netlink: %w", err)
	}
	events, err := genetlink.Dial(nil)
	if err != nil {
		_ = cmd.Close()
		return nil, fmt.Errorf("generic netlink: %w", err)
	}
	n, err := newNetlinkNBD(cmd, events, events.JoinGroup)
	if err != nil {
		_ = cmd.Close()
		_ = events.Close()
		return nil, err
	}
	return n, nil
}

// newNetlinkNBD looks the family up on cmd and joins its multicast group
// with join (events.JoinGroup).
func newNetlinkNBD(cmd, events *genetlink.Conn, join func(uint32) error) (*netlinkNBD, error) {
	f, err := cmd.GetFamily(nbdFamily)
	if err != nil {
		return nil, fmt.Errorf("the kernel's NBD driver (generic netlink family %q; is module nbd loaded?): %w", nbdFamily, err)
	}
	joined := false
	for _, g := range f.Groups {
		if g.Name == nbdMcastGroup {
			if err := join(g.ID); err != nil {
				return nil, fmt.Errorf("joining NBD multicast group %s: %w", nbdMcastGroup, err)
			}
			joined = true
		}
	}
	if !joined {
		return nil, fmt.Errorf("the kernel's NBD driver has no multicast group %q: it cannot report dead connections", nbdMcastGroup)
	}
	return &netlinkNBD{cmd: cmd, events: events, family: f}, nil
}

func sockets(ae *netlink.AttributeEncoder, sock *os.File) {
	ae.Nested(nbdAttrSockets, func(nae *netlink.AttributeEncoder) error {
		nae.Nested(nbdSockItem, func(iae *netlink.AttributeEncoder) error {
			iae.Uint32(nbdSockFD, uint32(sock.Fd()))
			return nil
		})
		return nil
	})
}

// encodeConnect is CONNECT's attributes.
func encodeConnect(c KernelConfig, sock *os.File) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint64(nbdAttrSizeBytes, uint64(c.Size))
	ae.Uint64(nbdAttrBlockSizeBytes, uint64(c.BlockSize))
	ae.Uint64(nbdAttrServerFlags, uint64(c.ServerFlags))
	ae.Uint64(nbdAttrClientFlags, nbdCFlagDestroyOnDisconnect)
	ae.Uint64(nbdAttrTimeout, c.Timeout)
	ae.Uint64(nbdAttrDeadConnTimeout, c.DeadConnTimeout)
	if c.Backend != "" {
		ae.String(nbdAttrBackendIdentifier, c.Backend)
	}
	sockets(ae, sock)
	return ae.Encode()
}

func (n *netlinkNBD) execute(cmd uint8, data []byte) ([]genetlink.Message, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: n.family.Version},
		Data:   data,
	}, n.family.ID, netlink.Request|netlink.Acknowledge)
}

func (n *netlinkNBD) Connect(c KernelConfig, sock *os.File) (uint32, error) {
	data, err := encodeConnect(c, sock)
	if err != nil {
		return 0, err
	}
	msgs, err := n.execute(nbdCmdConnect, data)
	if err != nil {
		return 0, fmt.Errorf("NBD CONNECT: %w", err)
	}
	for _, m := range msgs {
		if idx, ok := indexOf(m.Data); ok {
			return idx, nil
		}
	}
	return 0, errors.New("NBD CONNECT: the kernel's reply names no device")
}

func (n *netlinkNBD) Reconfigure(index uint32, r Reconfig) error {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nbdAttrIndex, index)
	if r.Backend != "" {
		ae.String(nbdAttrBackendIdentifier, r.Backend)
	}
	if r.Size > 0 {
		ae.Uint64(nbdAttrSizeBytes, uint64(r.Size))
	}
	if r.Sock != nil {
		sockets(ae, r.Sock)
	}
	data, err := ae.Encode()
	if err != nil {
		return err
	}
	if _, err := n.execute(nbdCmdReconfigure, data); err != nil {
		return fmt.Errorf("NBD RECONFIGURE of nbd%d: %w", index, err)
	}
	return nil
}

func (n *netlinkNBD) Disconnect(index uint32) error {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nbdAttrIndex, index)
	data, err := ae.Encode()
	if err != nil {
		return err
	}
	if _, err := n.execute(nbdCmdDisconnect, data); err != nil {
		return fmt.Errorf("NBD DISCONNECT of nbd%d: %w", index, err)
	}
	return nil
}

func (n *netlinkNBD) LinkDead() (uint32, error) {
	for {
		msgs, _, err := n.events.Receive()
		if err != nil {
			return 0, err
		}
		for _, m := range msgs {
			if m.Header.Command != nbdCmdLinkDead {
				continue
			}
			if idx, ok := indexOf(m.Data); ok {
				return idx, nil
			}
		}
	}
}

func (n *netlinkNBD) Close() error {
	return errors.Join(n.cmd.Close(), n.events.Close())
}

// indexOf finds NBD_ATTR_INDEX in a message's attributes.
func indexOf(data []byte) (uint32, bool) {
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		return 0, false
	}
	for ad.Next() {
		if ad.Type() == nbdAttrIndex {
			v := ad.Uint32()
			return v, ad.Err() == nil
		}
	}
	return 0, false
}
