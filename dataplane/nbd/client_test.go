package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// This file holds the test harness: a minimal NBD client that speaks the
// protocol from the client side (with pipelining), a log capture, and server
// setup helpers.

const testTimeout = 10 * time.Second

// logBuffer collects log lines from a funcr logger.
type logBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (l *logBuffer) logger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		l.lines = append(l.lines, prefix+" "+args)
		l.mu.Unlock()
	}, funcr.Options{Verbosity: 1})
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// waitFor waits until the log contains substr.
func (l *logBuffer) waitFor(t testing.TB, substr string) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for time.Now().Before(deadline) {
		if strings.Contains(l.String(), substr) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("log never contained %q; log:\n%s", substr, l.String())
}

// testEnv is a running server on loopback TCP.
type testEnv struct {
	srv     *Server
	exports *StaticExports
	mem     *MemBackend
	logs    *logBuffer
	addr    string
	cancel  context.CancelFunc
	done    chan error
}

const testExport = "ns/vol"

// startServer serves a MemBackend of size bytes as testExport. tweak may
// adjust the server before it starts.
func startServer(t testing.TB, size int64, tweak func(*Server, *StaticExports)) *testEnv {
	t.Helper()
	env := &testEnv{
		exports: &StaticExports{},
		mem:     NewMemBackend(size),
		logs:    &logBuffer{},
		done:    make(chan error, 1),
	}
	env.exports.Add(testExport, &Export{Name: testExport, Description: "test volume", Backend: env.mem})
	env.srv = &Server{Exports: env.exports, Log: env.logs.logger()}
	if tweak != nil {
		tweak(env.srv, env.exports)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	env.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	env.cancel = cancel
	go func() { env.done <- env.srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		if err := env.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return env
}

// stop shuts the server down and waits for Serve (idempotent).
func (e *testEnv) stop() error {
	e.cancel()
	select {
	case err, ok := <-e.done:
		if ok {
			close(e.done)
		}
		return err
	case <-time.After(testTimeout):
		return errors.New("Serve did not return after shutdown")
	}
}

// testClient is a protocol-level NBD client.
type testClient struct {
	t      testing.TB
	c      net.Conn
	br     *bufio.Reader
	size   uint64
	flags  uint16
	handle uint64

	mu       sync.Mutex
	readLens map[uint64]uint32
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

type simpleReply struct {
	errno  uint32
	handle uint64
	data   []byte
}

// dial opens a raw connection with an overall deadline.
func dial(t testing.TB, addr string) *testClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	_ = nc.SetDeadline(time.Now().Add(testTimeout))
	t.Cleanup(func() { nc.Close() })
	return &testClient{t: t, c: nc, br: bufio.NewReader(nc), readLens: map[uint64]uint32{}}
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) readFull(n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c.br, b)
	return b, err
}

// greeting reads the server greeting and returns the handshake flags.
func (c *testClient) greeting() uint16 {
	c.t.Helper()
	b, err := c.readFull(18)
	if err != nil {
		c.t.Fatalf("reading greeting: %v", err)
	}
	if binary.BigEndian.Uint64(b[0:8]) != nbdMagic || binary.BigEndian.Uint64(b[8:16]) != optMagic {
		c.t.Fatalf("bad greeting % x", b)
	}
	return binary.BigEndian.Uint16(b[16:18])
}

func (c *testClient) clientFlags(f uint32) {
	c.t.Helper()
	c.write(binary.BigEndian.AppendUint32(nil, f))
}

func encodeOption(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func encodeInfoRequest(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func (c *testClient) option(opt uint32, data []byte) {
	c.t.Helper()
	c.write(encodeOption(opt, data))
}

func (c *testClient) optReply() (optReply, error) {
	h, err := c.readFull(20)
	if err != nil {
		return optReply{}, err
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != optReplyMagic {
		return optReply{}, fmt.Errorf("bad option reply magic 0x%x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:12]), typ: binary.BigEndian.Uint32(h[12:16])}
	r.data, err = c.readFull(int(binary.BigEndian.Uint32(h[16:20])))
	return r, err
}

func (c *testClient) mustOptReply() optReply {
	c.t.Helper()
	r, err := c.optReply()
	if err != nil {
		c.t.Fatalf("reading option reply: %v", err)
	}
	return r
}

// infoReplies sends NBD_OPT_INFO or NBD_OPT_GO and collects the replies up
// to the final one.
func (c *testClient) infoReplies(opt uint32, name string, infos ...uint16) (map[uint16][]byte, optReply) {
	c.t.Helper()
	c.option(opt, encodeInfoRequest(name, infos...))
	got := map[uint16][]byte{}
	for {
		r := c.mustOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ != repInfo {
			return got, r
		}
		if len(r.data) < 2 {
			c.t.Fatalf("short NBD_REP_INFO %x", r.data)
		}
		got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
}

// goExport completes a handshake with NBD_OPT_GO.
func (c *testClient) goExport(name string) {
	c.t.Helper()
	infos, final := c.infoReplies(optGo, name)
	if final.typ != repAck {
		c.t.Fatalf("NBD_OPT_GO %q: reply 0x%x %q", name, final.typ, final.data)
	}
	ex, ok := infos[infoExport]
	if !ok || len(ex) != 10 {
		c.t.Fatalf("NBD_OPT_GO: no valid NBD_INFO_EXPORT: %v", infos)
	}
	c.size = binary.BigEndian.Uint64(ex[0:8])
	c.flags = binary.BigEndian.Uint16(ex[8:10])
}

// connect dials and negotiates export name with NBD_OPT_GO.
func connect(t testing.TB, addr, name string) *testClient {
	t.Helper()
	c := dial(t, addr)
	c.greeting()
	c.clientFlags(clientFixedNewstyle | clientNoZeroes)
	c.goExport(name)
	return c
}

func encodeRequest(typ, flags uint16, handle, off uint64, length uint32) []byte {
	b := make([]byte, requestHeaderSize)
	binary.BigEndian.PutUint32(b[0:4], requestMagic)
	binary.BigEndian.PutUint16(b[4:6], flags)
	binary.BigEndian.PutUint16(b[6:8], typ)
	binary.BigEndian.PutUint64(b[8:16], handle)
	binary.BigEndian.PutUint64(b[16:24], off)
	binary.BigEndian.PutUint32(b[24:28], length)
	return b
}

// send sends a request (payload is sent as is, so a WRITE may carry a
// payload of any size) and returns its handle.
func (c *testClient) send(typ, flags uint16, off uint64, length uint32, payload []byte) uint64 {
	c.t.Helper()
	c.mu.Lock()
	c.handle++
	h := c.handle
	if typ == CmdRead {
		c.readLens[h] = length
	}
	c.mu.Unlock()
	c.write(append(encodeRequest(typ, flags, h, off, length), payload...))
	return h
}

// recv reads one simple reply (with data for a successful READ).
func (c *testClient) recv() (simpleReply, error) {
	b, err := c.readFull(replyHeaderSize)
	if err != nil {
		return simpleReply{}, err
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != simpleReplyMagic {
		return simpleReply{}, fmt.Errorf("bad reply magic 0x%08x", m)
	}
	r := simpleReply{errno: binary.BigEndian.Uint32(b[4:8]), handle: binary.BigEndian.Uint64(b[8:16])}
	c.mu.Lock()
	n, isRead := c.readLens[r.handle]
	delete(c.readLens, r.handle)
	c.mu.Unlock()
	if isRead && r.errno == 0 {
		r.data, err = c.readFull(int(n))
	}
	return r, err
}

func (c *testClient) mustRecv() simpleReply {
	c.t.Helper()
	r, err := c.recv()
	if err != nil {
		c.t.Fatalf("reading reply: %v", err)
	}
	return r
}

// do sends one request and waits for its reply.
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) simpleReply {
	c.t.Helper()
	h := c.send(typ, flags, off, length, payload)
	r := c.mustRecv()
	if r.handle != h {
		c.t.Fatalf("reply for handle %d, want %d", r.handle, h)
	}
	return r
}

func (c *testClient) writeAt(off uint64, p []byte, flags uint16) uint32 {
	c.t.Helper()
	return c.do(CmdWrite, flags, off, uint32(len(p)), p).errno
}

func (c *testClient) readAt(off uint64, n uint32) ([]byte, uint32) {
	c.t.Helper()
	r := c.do(CmdRead, 0, off, n, nil)
	return r.data, r.errno
}

// expectClosed asserts the server closes the connection (possibly after
// sending some bytes, which are returned).
func (c *testClient) expectClosed() []byte {
	c.t.Helper()
	_ = c.c.SetReadDeadline(time.Now().Add(testTimeout))
	rest, err := io.ReadAll(c.br)
	if err != nil && !errors.Is(err, net.ErrClosed) && !isConnReset(err) {
		c.t.Fatalf("expected the server to close the connection, got %v", err)
	}
	return rest
}

func isConnReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func assertBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: %d bytes differ from want (%d bytes), first difference at %d", what, len(got), len(want), i)
	}
}
