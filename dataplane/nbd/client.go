package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// Client is an NBD client over one connection: fixed newstyle handshake with
// NBD_OPT_GO, simple replies, many requests in flight (replies may come in
// any order). It is what the CSI node service attaches a volume with on a
// node whose kernel has no NBD client (see internal/csi).
//
// Why our own: the Go NBD clients on the module proxy either drive the
// kernel's /dev/nbd (which this is the fallback for) or are not kept up; the
// wire format is the one the server in this package speaks, with the same
// constants, and the reconnect policy (following the writer) belongs to the
// caller, not to a library.
//
// A Client does not reconnect. Once its connection fails every request in
// flight and every later one returns the error (Err reports it); the caller
// dials again. A request's context only bounds the wait: a read whose
// context ends closes the connection, since its reply would otherwise land in
// a buffer the caller has taken back.
type Client struct {
	conn    net.Conn
	size    int64
	flags   uint16
	maxLen  uint32 // largest payload per request (from NBD_INFO_BLOCK_SIZE)
	minSize uint32

	wmu sync.Mutex // serialises requests on the wire
	bw  *bufio.Writer

	mu      sync.Mutex
	pending map[uint64]*clientCall
	next    uint64
	err     error // set once the connection failed or was closed
	done    chan struct{}
}

type clientCall struct {
	buf   []byte // destination of a read's payload
	errno uint32
	err   error
	done  chan struct{}
}

// ErrClientClosed is returned by requests on a Client after Close.
var ErrClientClosed = errors.New("nbd client closed")

// CommandError is the error a server replied to one command with.
type CommandError struct {
	Cmd   uint16
	Errno uint32 // the protocol's errno value
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("%s: server replied %s", CommandName(e.Cmd), e.Errno2().Error())
}

// Errno2 maps the wire errno to the host's syscall.Errno.
func (e *CommandError) Errno2() syscall.Errno {
	switch e.Errno {
	case errnoEPERM:
		return syscall.EPERM
	case errnoEIO:
		return syscall.EIO
	case errnoENOMEM:
		return syscall.ENOMEM
	case errnoEINVAL:
		return syscall.EINVAL
	case errnoENOSPC:
		return syscall.ENOSPC
	case errnoEOVERFLOW:
		return syscall.EOVERFLOW
	case errnoENOTSUP:
		return syscall.ENOTSUP
	case errnoESHUTDOWN:
		return syscall.ESHUTDOWN
	default:
		return syscall.EIO
	}
}

// Unwrap lets errors.Is(err, syscall.EPERM) and the like work.
func (e *CommandError) Unwrap() error { return e.Errno2() }

// OptionError is a refusal during the handshake (NBD_REP_ERR_*), with the
// server's message.
type OptionError struct {
	Option  uint32
	Reply   uint32
	Message string
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("%s refused (%s): %s", optionName(e.Option), replyName(e.Reply), e.Message)
}

func replyName(r uint32) string {
	switch r {
	case repErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case repErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case repErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case repErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case repErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case repErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case repErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	default:
		return fmt.Sprintf("reply 0x%08x", r)
	}
}

// DefaultClientMaxPayload is the request size used when the server does not
// say (the protocol's recommended limit).
const DefaultClientMaxPayload = 32 << 20

// ClientOption configures the handshake of Dial, NewClient and Negotiate.
type ClientOption func(*clientOptions)

type clientOptions struct {
	tls *tls.Config
}

// WithTLS upgrades the connection with NBD_OPT_STARTTLS before anything
// else is negotiated, and runs everything after it (export selection,
// transmission) inside a TLS client connection with cfg. A server that does
// not offer TLS fails the handshake with its refusal (an *OptionError): a
// client asked to use TLS never falls back to plain text. Nil cfg: no TLS.
func WithTLS(cfg *tls.Config) ClientOption {
	return func(o *clientOptions) { o.tls = cfg }
}

// Dial connects to addr and negotiates export name. The context bounds the
// dial and the handshake.
func Dial(ctx context.Context, addr, name string, opts ...ClientOption) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dialing NBD server %s: %w", addr, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	c, err := NewClient(ctx, conn, name, opts...)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("NBD server %s: %w", addr, err)
	}
	return c, nil
}

// NewClient negotiates export name over conn and starts reading replies.
func NewClient(ctx context.Context, conn net.Conn, name string, opts ...ClientOption) (*Client, error) {
	c, br, err := negotiate(ctx, conn, name, opts)
	if err != nil {
		return nil, err
	}
	go c.readLoop(br)
	return c, nil
}

// ExportInfo is what the handshake told about an export.
type ExportInfo struct {
	Size  int64
	Flags uint16 // transmission flags (FlagSendFlush, FlagSendFUA...)
	// MinBlock is the smallest request size the server accepts (1 when it
	// did not say), MaxPayload the largest read or write.
	MinBlock, MaxPayload uint32
}

// Negotiate performs only the handshake for export name over conn and
// leaves the connection in the transmission phase for another client to
// use, such as the kernel's NBD driver: nothing is read beyond the
// handshake. It returns the connection to carry on with: conn itself, or
// with WithTLS the TLS connection over it (which the kernel cannot use
// directly: see internal/csi/attach's TLS relay).
func Negotiate(ctx context.Context, conn net.Conn, name string, opts ...ClientOption) (ExportInfo, net.Conn, error) {
	c, br, err := negotiate(ctx, conn, name, opts)
	if err != nil {
		return ExportInfo{}, nil, err
	}
	if br.Buffered() > 0 {
		// The server sent something after its last option reply, which
		// the protocol does not allow before the first request.
		return ExportInfo{}, nil, fmt.Errorf("%w: %d bytes after the handshake", ErrProtocol, br.Buffered())
	}
	return ExportInfo{Size: c.size, Flags: c.flags, MinBlock: c.minSize, MaxPayload: c.maxLen}, c.conn, nil
}

func negotiate(ctx context.Context, conn net.Conn, name string, opts []ClientOption) (*Client, *bufio.Reader, error) {
	var o clientOptions
	for _, opt := range opts {
		opt(&o)
	}
	if len(name) > maxStringLen {
		return nil, nil, fmt.Errorf("export name of %d bytes exceeds the protocol's %d", len(name), maxStringLen)
	}
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(30 * time.Second)
	}
	// Deadlines on conn also bound a TLS connection over it.
	if err := conn.SetDeadline(dl); err != nil {
		return nil, nil, fmt.Errorf("setting handshake deadline: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(aLongTimeAgo) })
	defer stop()
	br := bufio.NewReaderSize(conn, 64<<10)
	c := &Client{conn: conn, bw: bufio.NewWriterSize(conn, 64<<10), pending: map[uint64]*clientCall{}, done: make(chan struct{}), maxLen: DefaultClientMaxPayload, minSize: 1}
	br, err := c.handshake(br, name, o.tls)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("NBD handshake: %w (%w)", context.Cause(ctx), err)
		}
		return nil, nil, fmt.Errorf("NBD handshake: %w", err)
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, nil, fmt.Errorf("clearing handshake deadline: %w", err)
	}
	return c, br, nil
}

// handshake negotiates export name (after NBD_OPT_STARTTLS with tlsCfg)
// and returns the reader to carry on with.
func (c *Client) handshake(br *bufio.Reader, name string, tlsCfg *tls.Config) (*bufio.Reader, error) {
	var greet [18]byte
	if _, err := io.ReadFull(br, greet[:]); err != nil {
		return nil, fmt.Errorf("reading greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(greet[0:8]); m != nbdMagic {
		return nil, fmt.Errorf("%w: bad greeting magic 0x%016x", ErrProtocol, m)
	}
	if m := binary.BigEndian.Uint64(greet[8:16]); m != optMagic {
		return nil, fmt.Errorf("%w: server is not newstyle (magic 0x%016x)", ErrProtocol, m)
	}
	hf := binary.BigEndian.Uint16(greet[16:18])
	if hf&flagFixedNewstyle == 0 {
		return nil, fmt.Errorf("%w: server does not speak fixed newstyle", ErrProtocol)
	}
	cf := clientFixedNewstyle
	if hf&flagNoZeroes != 0 {
		cf |= clientNoZeroes
	}
	var flags [4]byte
	binary.BigEndian.PutUint32(flags[:], cf)
	prefix := flags[:]
	if tlsCfg != nil {
		var err error
		if br, err = c.startTLS(br, prefix, tlsCfg); err != nil {
			return nil, err
		}
		prefix = nil
	}
	// NBD_OPT_GO: name, then one info request (block sizes).
	data := make([]byte, 4+len(name)+2+2)
	binary.BigEndian.PutUint32(data[0:4], uint32(len(name)))
	copy(data[4:], name)
	binary.BigEndian.PutUint16(data[4+len(name):], 1)
	binary.BigEndian.PutUint16(data[6+len(name):], infoBlockSize)
	msg := append(prefix, optionHeader(optGo, len(data))...)
	msg = append(msg, data...)
	if _, err := c.conn.Write(msg); err != nil {
		return nil, fmt.Errorf("sending NBD_OPT_GO: %w", err)
	}
	gotExport := false
	for {
		typ, payload, err := readOptionReply(br, optGo)
		if err != nil {
			return nil, err
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return nil, fmt.Errorf("%w: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT", ErrProtocol)
			}
			return br, nil
		case typ == repInfo:
			if len(payload) < 2 {
				return nil, fmt.Errorf("%w: short NBD_REP_INFO", ErrProtocol)
			}
			switch binary.BigEndian.Uint16(payload[0:2]) {
			case infoExport:
				if len(payload) != 12 {
					return nil, fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrProtocol, len(payload))
				}
				size := binary.BigEndian.Uint64(payload[2:10])
				if size > 1<<62 {
					return nil, fmt.Errorf("%w: export size %d out of range", ErrProtocol, size)
				}
				c.size = int64(size)
				c.flags = binary.BigEndian.Uint16(payload[10:12])
				gotExport = true
			case infoBlockSize:
				if len(payload) != 14 {
					return nil, fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrProtocol, len(payload))
				}
				minB := binary.BigEndian.Uint32(payload[2:6])
				maxB := binary.BigEndian.Uint32(payload[10:14])
				if minB == 0 || minB&(minB-1) != 0 || minB > 64<<10 || maxB < minB {
					return nil, fmt.Errorf("%w: block sizes min %d max %d", ErrProtocol, minB, maxB)
				}
				c.minSize = minB
				if maxB < c.maxLen {
					c.maxLen = maxB
				}
			}
		case typ&(1<<31) != 0:
			return nil, &OptionError{Option: optGo, Reply: typ, Message: string(payload)}
		default:
			// Other informational replies are ignored, as the protocol allows.
		}
	}
}

// readOptionReply reads one option reply, which must answer opt, and
// returns its type and data.
func readOptionReply(br *bufio.Reader, opt uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, nil, fmt.Errorf("reading the reply to %s: %w", optionName(opt), err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != optReplyMagic {
		return 0, nil, fmt.Errorf("%w: bad option reply magic 0x%016x", ErrProtocol, m)
	}
	if o := binary.BigEndian.Uint32(h[8:12]); o != opt {
		return 0, nil, fmt.Errorf("%w: reply to %s while waiting for %s", ErrProtocol, optionName(o), optionName(opt))
	}
	typ := binary.BigEndian.Uint32(h[12:16])
	n := binary.BigEndian.Uint32(h[16:20])
	if n > maxOptionLen {
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(br, payload); err != nil {
		return 0, nil, fmt.Errorf("reading the reply to %s: %w", optionName(opt), err)
	}
	return typ, payload, nil
}

// optionHeader encodes the header of an option with n bytes of data.
func optionHeader(opt uint32, n int) []byte {
	h := make([]byte, 16)
	binary.BigEndian.PutUint64(h[0:8], optMagic)
	binary.BigEndian.PutUint32(h[8:12], opt)
	binary.BigEndian.PutUint32(h[12:16], uint32(n))
	return h
}

// startTLS sends prefix (the client flags) and NBD_OPT_STARTTLS, waits for
// its acknowledgement and runs the TLS client handshake; c.conn and c.bw
// then write through TLS, and the returned reader reads through it.
func (c *Client) startTLS(br *bufio.Reader, prefix []byte, cfg *tls.Config) (*bufio.Reader, error) {
	if _, err := c.conn.Write(append(prefix, optionHeader(optStartTLS, 0)...)); err != nil {
		return nil, fmt.Errorf("sending NBD_OPT_STARTTLS: %w", err)
	}
	typ, payload, err := readOptionReply(br, optStartTLS)
	if err != nil {
		return nil, err
	}
	switch {
	case typ == repAck:
		if len(payload) != 0 {
			return nil, fmt.Errorf("%w: NBD_OPT_STARTTLS acknowledged with %d bytes", ErrProtocol, len(payload))
		}
		if br.Buffered() > 0 {
			return nil, fmt.Errorf("%w: %d bytes after the acknowledgement of NBD_OPT_STARTTLS", ErrProtocol, br.Buffered())
		}
		tc := tls.Client(c.conn, cfg)
		if err := tc.Handshake(); err != nil {
			return nil, fmt.Errorf("TLS handshake after NBD_OPT_STARTTLS: %w", err)
		}
		c.conn = tc
		c.bw = bufio.NewWriterSize(tc, 64<<10)
		return bufio.NewReaderSize(tc, 64<<10), nil
	case typ&(1<<31) != 0:
		return nil, &OptionError{Option: optStartTLS, Reply: typ, Message: string(payload)}
	default:
		return nil, fmt.Errorf("%w: reply 0x%08x to NBD_OPT_STARTTLS", ErrProtocol, typ)
	}
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// Flags are the export's transmission flags (FlagReadOnly, FlagSendFlush...).
func (c *Client) Flags() uint16 { return c.flags }

// MaxPayload is the largest read or write sent as one request; longer ones
// are split.
func (c *Client) MaxPayload() int { return int(c.maxLen) }

// Err returns why the connection ended, or nil while it is usable.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close sends NBD_CMD_DISC and closes the connection. Requests in flight
// fail with ErrClientClosed.
func (c *Client) Close() error {
	c.wmu.Lock()
	if c.Err() == nil {
		var h [requestHeaderSize]byte
		putRequest(h[:], 0, CmdDisc, 0, 0, 0)
		_ = c.conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.bw.Write(h[:])
		_ = c.bw.Flush()
	}
	c.wmu.Unlock()
	c.fail(ErrClientClosed)
	return nil
}

func putRequest(b []byte, flags, typ uint16, handle, off uint64, n uint32) {
	binary.BigEndian.PutUint32(b[0:4], requestMagic)
	binary.BigEndian.PutUint16(b[4:6], flags)
	binary.BigEndian.PutUint16(b[6:8], typ)
	binary.BigEndian.PutUint64(b[8:16], handle)
	binary.BigEndian.PutUint64(b[16:24], off)
	binary.BigEndian.PutUint32(b[24:28], n)
}

// fail ends the connection with err (the first error wins) and fails every
// request in flight.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	calls := c.pending
	c.pending = nil
	c.mu.Unlock()
	_ = c.conn.Close()
	for _, call := range calls {
		call.err = err
		close(call.done)
	}
	close(c.done)
}

func (c *Client) readLoop(br *bufio.Reader) {
	var h [replyHeaderSize]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			c.fail(fmt.Errorf("NBD connection lost: %w", err))
			return
		}
		if m := binary.BigEndian.Uint32(h[0:4]); m != simpleReplyMagic {
			c.fail(fmt.Errorf("%w: bad reply magic 0x%08x (structured replies were not asked for)", ErrProtocol, m))
			return
		}
		errno := binary.BigEndian.Uint32(h[4:8])
		handle := binary.BigEndian.Uint64(h[8:16])
		c.mu.Lock()
		call := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if call == nil {
			c.fail(fmt.Errorf("%w: reply for unknown handle %d", ErrProtocol, handle))
			return
		}
		if errno == 0 && call.buf != nil {
			if _, err := io.ReadFull(br, call.buf); err != nil {
				call.err = fmt.Errorf("NBD connection lost reading a reply's data: %w", err)
				close(call.done)
				c.fail(call.err)
				return
			}
		}
		call.errno = errno
		close(call.done)
	}
}

// do sends one request and waits for its reply.
func (c *Client) do(ctx context.Context, typ, flags uint16, off uint64, n uint32, payload, dst []byte) error {
	call := &clientCall{buf: dst, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.next++
	handle := c.next
	c.pending[handle] = call
	c.mu.Unlock()

	var h [requestHeaderSize]byte
	putRequest(h[:], flags, typ, handle, off, n)
	c.wmu.Lock()
	_, err := c.bw.Write(h[:])
	if err == nil && payload != nil {
		_, err = c.bw.Write(payload)
	}
	if err == nil {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("NBD connection lost sending %s: %w", CommandName(typ), err))
		<-call.done
		return call.err
	}
	select {
	case <-call.done:
	case <-ctx.Done():
		// The reply may still come and fill dst: the connection goes.
		c.fail(fmt.Errorf("%s abandoned: %w", CommandName(typ), context.Cause(ctx)))
		<-call.done
		return fmt.Errorf("%s: %w", CommandName(typ), context.Cause(ctx))
	}
	if call.err != nil {
		return call.err
	}
	if call.errno != 0 {
		return &CommandError{Cmd: typ, Errno: call.errno}
	}
	return nil
}

func (c *Client) checkRange(off int64, n int) error {
	if off < 0 || int64(n) > c.size || off > c.size-int64(n) {
		return fmt.Errorf("range [%d, %d) outside the export's %d bytes: %w", off, off+int64(n), c.size, syscall.EINVAL)
	}
	return nil
}

// ReadAt reads len(p) bytes at off, in requests of at most MaxPayload bytes
// sent together.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.checkRange(off, len(p)); err != nil {
		return err
	}
	return c.split(len(p), func(i, j int) error {
		return c.do(ctx, CmdRead, 0, uint64(off)+uint64(i), uint32(j-i), nil, p[i:j])
	})
}

// WriteAt writes p at off; with fua the server makes it durable before it
// replies.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := c.checkRange(off, len(p)); err != nil {
		return err
	}
	if c.flags&FlagReadOnly != 0 {
		return fmt.Errorf("export is read-only: %w", syscall.EROFS)
	}
	var flags uint16
	if fua && c.flags&FlagSendFUA != 0 {
		flags = CmdFlagFUA
	}
	return c.split(len(p), func(i, j int) error {
		return c.do(ctx, CmdWrite, flags, uint64(off)+uint64(i), uint32(j-i), p[i:j], nil)
	})
}

// Flush makes every write the server acknowledged durable.
func (c *Client) Flush(ctx context.Context) error {
	if c.flags&FlagSendFlush == 0 {
		return nil
	}
	return c.do(ctx, CmdFlush, 0, 0, 0, nil, nil)
}

// Trim tells the server the range's contents are no longer needed; reads of
// it may return anything afterwards (zeroes, with Tandem's server).
func (c *Client) Trim(ctx context.Context, off, n int64) error {
	if c.flags&FlagSendTrim == 0 {
		return fmt.Errorf("server does not support trim: %w", syscall.ENOTSUP)
	}
	if err := c.checkRange(off, int(n)); err != nil {
		return err
	}
	return c.split(int(n), func(i, j int) error {
		return c.do(ctx, CmdTrim, 0, uint64(off)+uint64(i), uint32(j-i), nil, nil)
	})
}

// WriteZeroes writes n zero bytes at off without sending them.
func (c *Client) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if c.flags&FlagSendWriteZeroes == 0 {
		return c.WriteAt(ctx, make([]byte, n), off, fua)
	}
	if err := c.checkRange(off, int(n)); err != nil {
		return err
	}
	var flags uint16
	if fua && c.flags&FlagSendFUA != 0 {
		flags = CmdFlagFUA
	}
	return c.split(int(n), func(i, j int) error {
		return c.do(ctx, CmdWriteZeroes, flags, uint64(off)+uint64(i), uint32(j-i), nil, nil)
	})
}

// split runs f over [0, n) in pieces of at most maxLen bytes, concurrently
// when there is more than one, and returns the first error.
func (c *Client) split(n int, f func(i, j int) error) error {
	max := int(c.maxLen)
	if n <= max {
		return f(0, n)
	}
	var wg sync.WaitGroup
	errs := make(chan error, (n+max-1)/max)
	for i := 0; i < n; i += max {
		j := min(i+max, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(i, j); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}
