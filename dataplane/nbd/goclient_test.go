package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/nbd/nbdtest"
)

func dialTest(t *testing.T, addr, name string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := Dial(ctx, addr, name)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestClientRoundTrip(t *testing.T) {
	const size = 8 << 20
	env := startServer(t, size, nil)
	c := dialTest(t, env.addr, testExport)
	if c.Size() != size {
		t.Fatalf("Size %d, want %d", c.Size(), size)
	}
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	want := make([]byte, size)
	for i := 0; i < 50; i++ {
		off := rng.Int64N(size - 64<<10)
		n := 1 + rng.IntN(64<<10)
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if err := c.WriteAt(ctx, p, off, i%7 == 0); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", off, n, err)
		}
		copy(want[off:], p)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := c.WriteZeroes(ctx, 4096, 8192, false); err != nil {
		t.Fatalf("WriteZeroes: %v", err)
	}
	clear(want[4096 : 4096+8192])
	got := make([]byte, size)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs from what was written")
	}
	if !bytes.Equal(env.mem.Bytes(), want) {
		t.Fatal("the server's backend differs from what was written")
	}
}

// Requests larger than the server's maximum payload are split; many
// goroutines share one connection.
func TestClientSplitsAndPipelines(t *testing.T) {
	const size = 16 << 20
	env := startServer(t, size, func(s *Server, _ *StaticExports) { s.MaxPayload = 1 << 20 })
	c := dialTest(t, env.addr, testExport)
	if c.MaxPayload() != 1<<20 {
		t.Fatalf("MaxPayload %d, want the server's 1 MiB", c.MaxPayload())
	}
	ctx := context.Background()
	big := bytes.Repeat([]byte("tandem!!"), 5<<20/8+3)
	if err := c.WriteAt(ctx, big, 1<<20, false); err != nil {
		t.Fatalf("WriteAt of %d bytes: %v", len(big), err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(g + 1)}, 64<<10)
			off := int64(8<<20 + g*(64<<10))
			for i := 0; i < 20; i++ {
				if err := c.WriteAt(ctx, p, off, false); err != nil {
					errs <- err
					return
				}
				q := make([]byte, len(p))
				if err := c.ReadAt(ctx, q, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, q) {
					errs <- fmt.Errorf("goroutine %d read back other data", g)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := make([]byte, len(big))
	if err := c.ReadAt(ctx, got, 1<<20); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, big) {
		t.Fatal("the split write did not land whole")
	}
}

func TestClientErrors(t *testing.T) {
	env := startServer(t, 1<<20, func(_ *Server, ex *StaticExports) {
		ex.Refuse("gone", fmt.Errorf("member node-b is the backup, not the writer (epoch 3): %w", ErrPolicy))
		ex.Add("ro", &Export{Name: "ro", Backend: NewMemBackend(1 << 20), ReadOnly: true})
	})
	ctx := context.Background()

	_, err := Dial(ctx, env.addr, "gone")
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != repErrPolicy || !strings.Contains(err.Error(), "not the writer (epoch 3)") {
		t.Fatalf("Dial of a refused export: %v, want NBD_REP_ERR_POLICY with the server's reason", err)
	}

	ro := dialTest(t, env.addr, "ro")
	if err := ro.WriteAt(ctx, []byte{1}, 0, false); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write to a read-only export: %v, want EROFS", err)
	}
	c := dialTest(t, env.addr, testExport)
	if err := c.ReadAt(ctx, make([]byte, 2), 1<<20-1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past the end: %v, want EINVAL", err)
	}
	env.mem.SetHook(func(_ context.Context, op Op, _, _ int64) error {
		if op == OpWrite {
			return syscall.ENOSPC
		}
		return nil
	})
	err = c.WriteAt(ctx, []byte{1}, 0, false)
	var ce *CommandError
	if !errors.As(err, &ce) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write the backend fails with ENOSPC: %v, want a CommandError matching ENOSPC", err)
	}
	if c.Err() != nil {
		t.Fatalf("a command error ended the connection: %v", c.Err())
	}
}

// A lost connection fails the requests in flight and every later one; a
// read whose context ends does not leave its buffer to the connection.
func TestClientConnectionLoss(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	block := make(chan struct{})
	env.mem.SetHook(func(ctx context.Context, op Op, _, _ int64) error {
		if op == OpRead {
			select {
			case <-block:
			case <-ctx.Done():
			}
		}
		return nil
	})
	defer close(block)
	c := dialTest(t, env.addr, testExport)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := c.ReadAt(ctx, make([]byte, 512), 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt past its deadline: %v, want DeadlineExceeded", err)
	}
	select {
	case <-c.Done():
	case <-time.After(testTimeout):
		t.Fatal("the connection stayed after an abandoned read")
	}
	if err := c.WriteAt(context.Background(), []byte{1}, 0, false); err == nil || c.Err() == nil {
		t.Fatalf("write on an ended client: %v (Err %v), want an error", err, c.Err())
	}

	// The link goes away under a request in flight.
	px := newCutProxy(t, env.addr)
	c2 := dialTest(t, px.addr, testExport)
	res := make(chan error, 1)
	go func() { res <- c2.ReadAt(context.Background(), make([]byte, 512), 0) }()
	time.Sleep(50 * time.Millisecond) // let the read reach the server (the result does not depend on it)
	px.cut()
	select {
	case err := <-res:
		if err == nil {
			t.Fatal("a read in flight when the link went away succeeded")
		}
	case <-time.After(testTimeout):
		t.Fatal("a read in flight hung after the link went away")
	}
}

// cutProxy forwards TCP connections to a server until cut.
type cutProxy struct {
	addr  string
	mu    sync.Mutex
	conns []net.Conn
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	p := &cutProxy{addr: ln.Addr().String()}
	go func() {
		for {
			a, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				_ = a.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, a, b)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(a, b) }()
			go func() { _, _ = io.Copy(b, a) }()
		}
	}()
	return p
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close()
	}
}

// The handshake refuses what is not an NBD server.
func TestClientHandshakeGarbage(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = conn.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
			_ = conn.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if _, err := Dial(ctx, ln.Addr().String(), "x"); !errors.Is(err, ErrProtocol) {
		t.Fatalf("Dial of an HTTP server: %v, want ErrProtocol", err)
	}
}

// The client against nbdkit's memory plugin: another server's reading of
// the protocol.
func TestClientInteropNbdkit(t *testing.T) {
	nbdkit := nbdtest.Require(t, "nbdkit")
	dir := t.TempDir()
	sock := filepath.Join(dir, "port")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	cmd := exec.Command(nbdkit, "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", fmt.Sprint(port), "-P", sock, "memory", "4M")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("nbdkit: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	deadline := time.Now().Add(testTimeout)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nbdkit did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := dialTest(t, fmt.Sprintf("127.0.0.1:%d", port), "")
	if c.Size() != 4<<20 {
		t.Fatalf("size %d, want 4 MiB", c.Size())
	}
	ctx := context.Background()
	p := bytes.Repeat([]byte("nbdkit"), 100000)
	if err := c.WriteAt(ctx, p, 12345, true); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := c.Trim(ctx, 0, 4096); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	q := make([]byte, len(p))
	if err := c.ReadAt(ctx, q, 12345); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(p, q) {
		t.Fatal("nbdkit returned other data")
	}
}

// FuzzClient feeds the client arbitrary server bytes: the handshake and then
// the replies to one read and one write. It must return an error or succeed,
// never panic or hang.
func FuzzClient(f *testing.F) {
	good := func(extra []byte) []byte {
		var b bytes.Buffer
		b.Write([]byte("NBDMAGICIHAVEOPT\x00\x03"))
		// NBD_REP_INFO export: size 4096, flags HAS_FLAGS|SEND_FLUSH
		b.Write([]byte{0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 5})
		b.Write([]byte{0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0})
		b.Write(extra)
		return b.Bytes()
	}
	f.Add(good(nil))
	f.Add(good([]byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 'a', 'b', 'c', 'd'}))
	f.Add(good([]byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2}))
	f.Add([]byte("NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53"))
	f.Fuzz(func(t *testing.T, server []byte) {
		a := &scriptConn{r: bytes.NewReader(server)}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := NewClient(ctx, a, "x")
		if err != nil {
			return
		}
		defer c.Close()
		if c.Size() < 0 {
			t.Fatalf("negative size %d", c.Size())
		}
		n := min(int(c.Size()), 4)
		_ = c.ReadAt(ctx, make([]byte, n), 0)
		_ = c.WriteAt(ctx, make([]byte, n), 0, true)
	})
}

// scriptConn is a net.Conn that reads a fixed script and discards writes.
type scriptConn struct {
	net.Conn
	r *bytes.Reader
}

func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// TestExportAdmit: an export's Admit refuses a client at negotiation, and
// fails the requests of a connection it stops admitting with EPERM.
func TestExportAdmit(t *testing.T) {
	var deny atomic.Bool
	var asked atomic.Value
	env := startServer(t, 1<<20, func(_ *Server, ex *StaticExports) {
		ex.Add("fenced", &Export{Name: "fenced", Backend: NewMemBackend(1 << 20), Admit: func(a netip.Addr) error {
			asked.Store(a)
			if deny.Load() {
				return fmt.Errorf("node at %s does not use this volume now", a)
			}
			return nil
		}})
	})
	ctx := context.Background()
	c := dialTest(t, env.addr, "fenced")
	if got, _ := asked.Load().(netip.Addr); got != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("Admit asked about %v, want the client's 127.0.0.1", got)
	}
	if err := c.WriteAt(ctx, []byte{1}, 0, false); err != nil {
		t.Fatalf("admitted write: %v", err)
	}
	deny.Store(true)
	for name, err := range map[string]error{
		"write": c.WriteAt(ctx, []byte{1}, 0, false),
		"read":  c.ReadAt(ctx, make([]byte, 1), 0),
		"flush": c.Flush(ctx),
	} {
		if !errors.Is(err, syscall.EPERM) {
			t.Errorf("%s after the client stopped being admitted: %v, want EPERM", name, err)
		}
	}
	_, err := Dial(ctx, env.addr, "fenced")
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != repErrPolicy || !strings.Contains(oe.Message, "does not use this volume now") {
		t.Fatalf("Dial of a refusing export: %v, want NBD_REP_ERR_POLICY with the reason", err)
	}
	deny.Store(false)
	if err := c.WriteAt(ctx, []byte{2}, 0, false); err != nil {
		t.Fatalf("write once admitted again: %v", err)
	}
}

// FuzzClientStartTLS feeds the client arbitrary server bytes after the
// greeting while it asks for NBD_OPT_STARTTLS: the reply is decoded, and
// whatever follows an acknowledgement goes to the TLS handshake. It must
// fail or succeed, never panic, hang, or go on in plain text.
func FuzzClientStartTLS(f *testing.F) {
	greet := []byte("NBDMAGICIHAVEOPT\x00\x03")
	reply := func(typ uint32, data string) []byte {
		b := []byte{0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 5}
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	f.Add(append(append([]byte{}, greet...), reply(repAck, "")...))
	f.Add(append(append([]byte{}, greet...), reply(repErrUnsup, "no TLS here")...))
	f.Add(append(append([]byte{}, greet...), reply(repAck, "x")...))
	f.Add(append(append(append([]byte{}, greet...), reply(repAck, "")...), "\x16\x03\x01\x00\x05hello"...))
	f.Fuzz(func(t *testing.T, server []byte) {
		a := &scriptConn{r: bytes.NewReader(server)}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := NewClient(ctx, a, "x", WithTLS(&tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}))
		if err != nil {
			return
		}
		defer c.Close()
		if _, ok := c.conn.(*tls.Conn); !ok {
			t.Fatalf("negotiated without TLS over a %T", c.conn)
		}
	})
}
