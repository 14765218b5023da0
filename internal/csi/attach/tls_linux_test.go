package attach

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
)

// startTLSMember is startMember with an NBD server that requires TLS and
// presents a certificate of ca naming id.
func startTLSMember(t *testing.T, be nbd.Backend, ca *tlsidtest.CA, id tlsid.Identity) *member {
	t.Helper()
	src := tlsidtest.Load(t, ca.Dir(t, id))
	return startMemberWith(t, be, &nbd.Server{TLS: src.ServerConfig(true), RequireTLS: true})
}

func TestFollowerTLS(t *testing.T) {
	ca := tlsidtest.NewCA(t, "tandem-ca")
	be := nbd.NewMemBackend(1 << 20)
	nodeA := startTLSMember(t, be, ca, tlsid.NodeIdentity("node-a"))
	manager := startTLSMember(t, be, ca, tlsid.Manager)
	nodeB := &NodeTLS{Dir: ca.Dir(t, tlsid.NodeIdentity("node-b")), Log: testr.New(t)}
	tests := []struct {
		name string
		uri  string
		tls  TLSConfig
		want string // "" for a working connection
	}{
		{name: "node certificate", uri: nodeA.uri, tls: nodeB.Config},
		{name: "plain text against a server requiring TLS", uri: nodeA.uri, want: "NBD_REP_ERR_TLS_REQD"},
		{name: "server naming no node", uri: manager.uri, tls: nodeB.Config, want: "presented spiffe://tandem.dev/manager, not a node's agent"},
		{name: "no material yet", uri: nodeA.uri, tls: (&NodeTLS{Dir: filepath.Join(t.TempDir(), "tls"), Log: testr.New(t)}).Config,
			want: "NBD over TLS (--tls-dir)"},
		{name: "a manager's certificate on the node", uri: nodeA.uri, tls: (&NodeTLS{Dir: ca.Dir(t, tlsid.Manager), Log: testr.New(t)}).Config,
			want: "names spiffe://tandem.dev/manager, not a node"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &switchable{uri: tc.uri}
			f := &Follower{Resolve: r.resolve, IOTimeout: time.Second, Log: testr.New(t), TLS: tc.tls}
			defer f.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := f.Connect(ctx)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Connect: %v, want an error with %q", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			p := bytes.Repeat([]byte{0x5a}, 8192)
			if err := f.WriteAt(ctx, p, 4096, false); err != nil {
				t.Fatalf("WriteAt: %v", err)
			}
			got := make([]byte, len(p))
			if err := f.ReadAt(ctx, got, 4096); err != nil || !bytes.Equal(got, p) {
				t.Fatalf("ReadAt: %v (equal %v)", err, bytes.Equal(got, p))
			}
		})
	}
}

// The kernel's side of the relay speaks plain NBD transmission; the relay
// carries it over TLS, and ends when either side closes.
func TestRelayTLS(t *testing.T) {
	ca := tlsidtest.NewCA(t, "tandem-ca")
	be := nbd.NewMemBackend(1 << 20)
	m := startTLSMember(t, be, ca, tlsid.NodeIdentity("node-a"))
	nodeB := &NodeTLS{Dir: ca.Dir(t, tlsid.NodeIdentity("node-b")), Log: testr.New(t)}
	addr, name, err := ParseURI(m.uri)
	if err != nil {
		t.Fatal(err)
	}
	open := func() (net.Conn, net.Conn) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		opts, err := clientOptions(nodeB.Config)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, tc, err := nbd.Negotiate(ctx, conn, name, opts...)
		if err != nil {
			t.Fatalf("Negotiate: %v", err)
		}
		f, err := relayTLS(tc, testr.New(t))
		if err != nil {
			t.Fatal(err)
		}
		kernel, err := net.FileConn(f) // what the kernel would hold
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		_ = kernel.SetDeadline(time.Now().Add(10 * time.Second))
		return kernel, tc
	}

	kernel, tc := open()
	br := bufio.NewReader(kernel)
	p := bytes.Repeat([]byte{0xa5}, 4096)
	request(t, kernel, nbd.CmdWrite, 1, 8192, p)
	reply(t, br, 1, nil)
	request(t, kernel, nbd.CmdRead, 2, 8192, make([]byte, 4096))
	got := make([]byte, 4096)
	reply(t, br, 2, got)
	if !bytes.Equal(got, p) || !bytes.Equal(be.Bytes()[8192:8192+4096], p) {
		t.Fatal("the relay did not carry the write and the read")
	}
	// The kernel dropping its socket ends the TLS connection.
	kernel.Close()
	_ = tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := tc.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("the TLS connection after the kernel's side closed: %v", err)
	}

	// The TLS connection dying closes the kernel's socket.
	kernel, tc = open()
	tc.Close()
	if _, err := kernel.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("the kernel's socket after the TLS connection closed: %v, want EOF", err)
	}
	kernel.Close()
}

// request sends a simple NBD request; for a write p is its payload, for a
// read only its length counts.
func request(t *testing.T, c net.Conn, typ uint16, handle, off uint64, p []byte) {
	t.Helper()
	b := make([]byte, 28, 28+len(p))
	binary.BigEndian.PutUint32(b[0:4], 0x25609513)
	binary.BigEndian.PutUint16(b[6:8], typ)
	binary.BigEndian.PutUint64(b[8:16], handle)
	binary.BigEndian.PutUint64(b[16:24], off)
	binary.BigEndian.PutUint32(b[24:28], uint32(len(p)))
	if typ == nbd.CmdWrite {
		b = append(b, p...)
	}
	if _, err := c.Write(b); err != nil {
		t.Fatalf("request: %v", err)
	}
}

// reply reads a simple reply for handle (and a read's payload into p).
func reply(t *testing.T, br *bufio.Reader, handle uint64, p []byte) {
	t.Helper()
	var h [16]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		t.Fatalf("reply: %v", err)
	}
	if m, e, hd := binary.BigEndian.Uint32(h[0:4]), binary.BigEndian.Uint32(h[4:8]), binary.BigEndian.Uint64(h[8:16]); m != 0x67446698 || e != 0 || hd != handle {
		t.Fatalf("reply magic %x error %d handle %d", m, e, hd)
	}
	if p != nil {
		if _, err := io.ReadFull(br, p); err != nil {
			t.Fatalf("reply payload: %v", err)
		}
	}
}

// TestKernelTLS: with TLS the kernel path hands the kernel the relay's
// socket, over a connection that negotiated TLS, and does so again when
// the link dies and the device follows the new writer.
func TestKernelTLS(t *testing.T) {
	const size = 1 << 20
	ca := tlsidtest.NewCA(t, "tandem-ca")
	beA, beB := nbd.NewMemBackend(size), nbd.NewMemBackend(size)
	if err := beA.WriteAt(context.Background(), []byte("on a"), 0, true); err != nil {
		t.Fatal(err)
	}
	if err := beB.WriteAt(context.Background(), []byte("on b"), 0, true); err != nil {
		t.Fatal(err)
	}
	a := startTLSMember(t, beA, ca, tlsid.NodeIdentity("node-a"))
	b := startTLSMember(t, beB, ca, tlsid.NodeIdentity("node-b"))
	r := &switchable{uri: a.uri}
	vol := csi.Volume{ID: "ns/vol", Size: size}
	fk := newFakeKernel()
	nodeC := &NodeTLS{Dir: ca.Dir(t, tlsid.NodeIdentity("node-c")), Log: testr.New(t)}
	k := newKernel(KernelOptions{
		Resolver: func(csi.Volume) Resolver { return r.resolve },
		Log:      testr.New(t), IOTimeout: 20 * time.Second, SysBlock: t.TempDir(), TLS: nodeC.Config,
	}, fk)
	defer k.Close()
	if dev, err := k.Attach(context.Background(), vol); err != nil || dev != "/dev/nbd0" {
		t.Fatalf("Attach: %q, %v", dev, err)
	}
	if got := fk.read(t, 0, 0, 4); string(got) != "on a" {
		t.Fatalf("the device reads %q, want the writer a's data", got)
	}
	r.set(b.uri)
	fk.linkDies(0)
	testkit.Eventually(t, 10*time.Second, "the device reconfigured to b", func() bool {
		_, n := fk.counts()
		return n == 1
	})
	if got := fk.read(t, 0, 0, 4); string(got) != "on b" {
		t.Fatalf("after the failover the device reads %q, want b's data", got)
	}
	if err := k.Detach(context.Background(), vol.ID); err != nil {
		t.Fatal(err)
	}
}
