package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
)

// ErrDisconnected is the cause of a request context cancelled because the
// client went away (see context.Cause).
var ErrDisconnected = errors.New("nbd client disconnected")

// conn is one connection in the transmission phase.
type conn struct {
	s          *Server
	nc         net.Conn
	br         *bufio.Reader
	log        logr.Logger
	be         Backend
	puncher    ZeroPuncher // nil if be cannot punch
	taker      BufferTaker // nil if be copies write payloads
	size       uint64
	admit      func() error // nil: every request admitted
	minBlock   uint32
	maxPayload uint32
	readOnly   bool

	// ctx is every request's context; cancel ends it with a cause.
	ctx    context.Context
	cancel context.CancelCauseFunc
	// admitCtx ends when the reader must stop waiting for the server's
	// budget: shutdown, or ctx ended.
	admitCtx context.Context

	// Replies are queued; whichever worker finds no write in progress
	// writes the whole queue with one writev, so replies completing
	// together share a syscall.
	qmu          sync.Mutex
	pending      []*request // replies waiting to be written
	spare        []*request
	writing      bool
	iov          [][]byte // owned by the writing worker
	bufs         net.Buffers
	writeTimeout time.Duration

	failOnce sync.Once
	failErr  error // set once by fail, read after the workers are done
	broken   atomic.Bool
	shutdown atomic.Bool

	slotMu      sync.Mutex
	slotFree    *sync.Cond
	inFlight    int
	inBytes     int64
	maxInFlight int
	maxBytes    int64

	work    chan *request
	workers int // owned by the reader goroutine
	wg      sync.WaitGroup

	barrier *flushBarrier
}

// request is one request travelling from the reader to a worker. Requests
// are pooled.
type request struct {
	hdr       requestHeader
	errno     uint32 // set by the reader when the request is refused
	cost      int64  // bytes charged against MaxInFlightBytes
	charge    int64  // bytes charged to Server.Budget
	buf       *[]byte
	ep        *epoch                // flush barrier registration of a write
	flushWait <-chan struct{}       // for FLUSH: writes received before it are done
	rh        [replyHeaderSize]byte // reply header, filled by reply
	withData  bool                  // the reply carries *buf (successful READ)
}

var requestPool = sync.Pool{New: func() any { return new(request) }}

// transmit serves the transmission phase of a connection to exp, whose size
// the client was told was size: requests are checked against it, even if
// the export grew since (NBD has no in-band resize; a new connection sees
// the new size).
func (s *Server) transmit(ctx context.Context, nc net.Conn, br *bufio.Reader, exp *Export, size int64, log logr.Logger) error {
	minB, _, _, err := exp.blockSizes(s.maxPayload())
	if err != nil { // checked during negotiation already
		return fmt.Errorf("export misconfigured: %w", err)
	}
	c := &conn{
		s:            s,
		nc:           nc,
		br:           br,
		log:          log,
		be:           exp.Backend,
		size:         uint64(size),
		minBlock:     minB,
		maxPayload:   s.maxPayload(),
		readOnly:     exp.ReadOnly,
		writeTimeout: s.writeTimeout(),
		maxInFlight:  s.maxInFlight(),
		maxBytes:     s.maxInFlightBytes(),
		barrier:      newFlushBarrier(),
	}
	if exp.Admit != nil {
		addr, admit := clientAddr(nc.RemoteAddr()), exp.Admit
		c.admit = func() error {
			if err := admit(addr); err != nil {
				return fmt.Errorf("%w: %w", ErrNotAdmitted, err)
			}
			return nil
		}
	}
	c.puncher, _ = exp.Backend.(ZeroPuncher)
	c.taker, _ = exp.Backend.(BufferTaker)
	c.slotFree = sync.NewCond(&c.slotMu)
	c.work = make(chan *request, c.maxInFlight)
	// Request contexts keep ctx's values but not its cancellation: a
	// shutdown first lets requests finish, for up to DrainTimeout.
	c.ctx, c.cancel = context.WithCancelCause(context.WithoutCancel(ctx))
	defer c.cancel(nil)
	admitCtx, cancelAdmit := context.WithCancel(ctx)
	defer cancelAdmit()
	stopAdmit := context.AfterFunc(c.ctx, cancelAdmit)
	defer stopAdmit()
	c.admitCtx = admitCtx

	// startDrain bounds how long requests in flight may still run once the
	// connection is going away on the server's initiative.
	var (
		drainOnce  sync.Once
		drainMu    sync.Mutex
		drainTimer *time.Timer
	)
	startDrain := func() {
		drainOnce.Do(func() {
			drainMu.Lock()
			defer drainMu.Unlock()
			drainTimer = time.AfterFunc(s.drainTimeout(), func() {
				log.Info("Drain timeout: cancelling requests in flight", "timeout", s.drainTimeout().String())
				c.cancel(ErrShuttingDown)
			})
		})
	}
	stopShutdown := context.AfterFunc(ctx, func() {
		c.shutdown.Store(true)
		_ = nc.SetReadDeadline(aLongTimeAgo) // stop reading requests
		startDrain()
	})
	defer func() {
		stopShutdown()
		drainMu.Lock()
		if drainTimer != nil {
			drainTimer.Stop()
		}
		drainMu.Unlock()
	}()

	log.V(1).Info("Transmission started", "size", c.size)
	disc, rerr := c.readLoop()

	var watch sync.WaitGroup
	var result error
	switch {
	case c.broken.Load():
		// fail already cancelled requests and closed the connection.
	case disc:
		log.V(1).Info("Client sent NBD_CMD_DISC; finishing requests in flight")
		// The client sends nothing after NBD_CMD_DISC; if its side closes
		// now, nobody is waiting for the remaining replies.
		watch.Go(func() {
			_, err := io.Copy(io.Discard, c.br)
			if !c.shutdown.Load() || !errors.Is(err, os.ErrDeadlineExceeded) {
				c.cancel(ErrDisconnected)
			}
		})
	case c.shutdown.Load() && errors.Is(rerr, os.ErrDeadlineExceeded),
		ctx.Err() != nil && errors.Is(rerr, errAdmitCancelled):
		log.V(1).Info("Shutting down; finishing requests in flight")
	case errors.Is(rerr, io.EOF):
		log.V(1).Info("Client disconnected without NBD_CMD_DISC")
		c.cancel(ErrDisconnected)
	case errors.Is(rerr, ErrProtocol):
		s.stats.protocolErrors.Add(1)
		log.Error(rerr, "Closing connection after protocol error; finishing requests in flight")
		result = rerr
		startDrain()
	default:
		result = fmt.Errorf("reading request: %w", rerr)
		log.Error(result, "Closing connection")
		c.cancel(ErrDisconnected)
	}
	close(c.work)
	c.wg.Wait()
	_ = nc.Close()
	watch.Wait()
	if c.broken.Load() {
		result = c.failErr
		log.Error(result, "Connection failed")
	}
	log.V(1).Info("Connection closed")
	return result
}

// fail records the first fatal error, cancels requests and closes the
// connection.
func (c *conn) fail(err error) {
	c.failOnce.Do(func() {
		c.failErr = err
		c.broken.Store(true)
		c.cancel(err)
		_ = c.nc.Close()
	})
}

// readLoop reads requests and dispatches them until NBD_CMD_DISC (disc is
// true), a read error, or a protocol violation.
func (c *conn) readLoop() (disc bool, err error) {
	var hb [requestHeaderSize]byte
	for {
		if _, err := io.ReadFull(c.br, hb[:]); err != nil {
			return false, err
		}
		h, err := decodeRequest(hb[:])
		if err != nil {
			return false, err
		}
		if h.Type == CmdDisc {
			c.s.stats.cmd(h.Type).requests.Add(1)
			return true, nil
		}
		r := requestPool.Get().(*request)
		r.hdr = h
		if err := c.prepare(r); err != nil {
			return false, err
		}
	}
}

// prepare validates a request, reads its payload and dispatches it. A
// non-nil error ends the connection (after the request, if it was
// dispatched, has been answered).
func (c *conn) prepare(r *request) error {
	h := &r.hdr
	switch h.Type {
	case CmdRead:
		r.errno = c.check(h, CmdFlagFUA, false)
		if r.errno == 0 && h.Length > c.maxPayload {
			r.errno = errnoEINVAL
		}
		if r.errno == 0 {
			r.cost = int64(h.Length)
		}
		c.acquire(r.cost)
		if err := c.charge(r); err != nil {
			return err
		}

	case CmdWrite:
		if h.Length > c.maxPayload {
			// The payload cannot be skipped safely: answer, then close.
			err := fmt.Errorf("%w: NBD_CMD_WRITE of %d bytes exceeds the maximum payload of %d bytes", ErrProtocol, h.Length, c.maxPayload)
			r.errno = errnoEINVAL
			c.acquire(0)
			c.dispatch(r) // r belongs to the worker from here on
			return err
		}
		r.errno = c.check(h, CmdFlagFUA, true)
		r.cost = int64(h.Length)
		c.acquire(r.cost)
		if r.errno == 0 {
			if err := c.charge(r); err != nil {
				return err
			}
		}
		var err error
		if r.errno == 0 {
			r.buf = getBuf(int(h.Length))
			_, err = io.ReadFull(c.br, *r.buf)
		} else {
			_, err = c.br.Discard(int(h.Length))
		}
		if err != nil {
			c.release(r)
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("reading NBD_CMD_WRITE payload: %w", err)
		}
		if r.errno == 0 {
			r.ep = c.barrier.begin()
		}

	case CmdFlush:
		if h.Flags&^CmdFlagFUA != 0 {
			r.errno = errnoEINVAL
		}
		c.acquire(0)
		if r.errno == 0 {
			r.flushWait = c.barrier.seal()
		}

	case CmdTrim, CmdWriteZeroes:
		allowed := CmdFlagFUA
		if h.Type == CmdWriteZeroes {
			allowed |= CmdFlagNoHole
		}
		r.errno = c.check(h, allowed, true)
		c.acquire(0)
		if r.errno == 0 {
			r.ep = c.barrier.begin()
		}

	default:
		r.errno = errnoEINVAL
		c.acquire(0)
	}
	c.dispatch(r)
	return nil
}

// check validates flags, permissions, range and alignment of a request.
func (c *conn) check(h *requestHeader, allowedFlags uint16, write bool) uint32 {
	if h.Flags&^allowedFlags != 0 {
		return errnoEINVAL
	}
	if write && c.readOnly {
		return errnoEPERM
	}
	if h.Offset > c.size || uint64(h.Length) > c.size-h.Offset {
		if write {
			return errnoENOSPC
		}
		return errnoEINVAL
	}
	if m := uint64(c.minBlock); m > 1 && (h.Offset%m != 0 || uint64(h.Length)%m != 0) {
		return errnoEINVAL
	}
	return 0
}

func (c *conn) dispatch(r *request) { c.work <- r }

func (c *conn) worker() {
	for r := range c.work {
		c.serve(r)
	}
}

// serve runs one request and sends its reply.
func (c *conn) serve(r *request) {
	h := &r.hdr
	st := c.s.stats.cmd(h.Type)
	st.requests.Add(1)
	errno := r.errno
	if errno == 0 {
		if err := c.exec(r); err != nil {
			errno = errnoFor(err)
			if c.ctx.Err() != nil {
				c.log.V(1).Info("Request cancelled", "command", CommandName(h.Type), "offset", h.Offset, "length", h.Length, "cause", context.Cause(c.ctx).Error())
			} else {
				c.log.Error(err, "Backend error", "command", CommandName(h.Type), "offset", h.Offset, "length", h.Length, "errno", errno)
			}
		}
	}
	if r.ep != nil {
		c.barrier.end(r.ep)
	}
	if errno == 0 {
		if h.Type != CmdFlush { // a FLUSH's offset and length are ignored
			st.bytes.Add(uint64(h.Length))
		}
	} else {
		st.errors.Add(1)
	}
	c.reply(r, errno)
}

// exec performs a validated request on the backend.
func (c *conn) exec(r *request) error {
	if c.admit != nil {
		if err := c.admit(); err != nil {
			return err
		}
	}
	h := &r.hdr
	ctx := c.ctx
	off, n := int64(h.Offset), int64(h.Length)
	fua := h.Flags&CmdFlagFUA != 0
	switch h.Type {
	case CmdRead:
		if n == 0 {
			return nil
		}
		r.buf = getBuf(int(n))
		return c.be.ReadAt(ctx, *r.buf, off)
	case CmdWrite:
		if n == 0 {
			return nil
		}
		if c.taker != nil {
			// The payload goes to the backend (and on to a peer) without a
			// copy; it gives the buffer back to the pool when done, and
			// with it the buffer's share of the budget.
			buf := r.buf
			r.buf = nil
			done := putBuf
			if charge := r.charge; charge > 0 {
				r.charge = 0
				b := c.s.Budget
				done = func(p *[]byte) {
					putBuf(p)
					b.Release(charge)
				}
			}
			return c.taker.WriteAtTake(ctx, buf, done, off, fua)
		}
		return c.be.WriteAt(ctx, *r.buf, off, fua)
	case CmdFlush:
		select {
		case <-r.flushWait:
		case <-ctx.Done():
			return ctx.Err()
		}
		return c.be.Flush(ctx)
	case CmdTrim:
		if n == 0 {
			return nil
		}
		return c.be.Trim(ctx, off, n, fua)
	case CmdWriteZeroes:
		if n == 0 {
			return nil
		}
		if c.puncher != nil && h.Flags&CmdFlagNoHole == 0 {
			return c.puncher.PunchZeroes(ctx, off, n, fua)
		}
		return c.be.WriteZeroes(ctx, off, n, fua)
	}
	return fmt.Errorf("unexpected command %d", h.Type)
}

// replyBatchHint: the worker that is to write replies yields its processor
// once first when fewer than this many are queued. runtime.Gosched returns
// at once when no other goroutine is ready to run (a lone request is
// answered without delay); under load the workers that are ready add their
// replies to the same writev, and the client reads them in one wakeup. On
// the bench's two CPUs this took the standalone agent's 4 KiB random writes
// from 0.74-0.81x nbdkit's IOPS to 1.13-1.17x (analysis in
// docs/benchmarks.md).
const replyBatchHint = 16

// reply queues the simple reply to r (with the data of a successful READ)
// and, unless another worker is writing already, writes the queue. The
// request is released once its reply is written.
func (c *conn) reply(r *request, errno uint32) {
	putReplyHeader(r.rh[:], errno, r.hdr.Handle)
	r.withData = r.hdr.Type == CmdRead && errno == 0 && r.hdr.Length > 0
	c.qmu.Lock()
	c.pending = append(c.pending, r)
	if c.writing {
		c.qmu.Unlock()
		return
	}
	c.writing = true
	if len(c.pending) < replyBatchHint {
		// Let the workers that are ready to run queue their replies
		// first (see replyBatchHint).
		c.qmu.Unlock()
		runtime.Gosched()
		c.qmu.Lock()
	}
	for len(c.pending) > 0 {
		batch := c.pending
		c.pending = c.spare[:0]
		c.qmu.Unlock()
		c.writeBatch(batch)
		clear(batch)
		c.qmu.Lock()
		c.spare = batch[:0]
	}
	c.writing = false
	c.qmu.Unlock()
}

// writeBatch writes the replies of batch and releases the requests.
func (c *conn) writeBatch(batch []*request) {
	if !c.broken.Load() {
		c.iov = c.iov[:0]
		for _, r := range batch {
			c.iov = append(c.iov, r.rh[:])
			if r.withData {
				c.iov = append(c.iov, *r.buf)
			}
		}
		c.bufs = c.iov
		_ = c.nc.SetWriteDeadline(time.Now().Add(c.writeTimeout))
		if _, err := c.bufs.WriteTo(c.nc); err != nil {
			c.fail(fmt.Errorf("writing %d replies: %w", len(batch), err))
		}
		clear(c.iov)
	}
	for _, r := range batch {
		c.release(r)
	}
}
