package volume

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/dataplane/repl"
)

// Forwarding lets a member that just handed the writer role over (failback)
// complete the client requests it was holding, and keep serving the client
// connections that are still open to it, by sending them to the new writer
// over the replication stream. FwdReply frames answer with Offset 0 for
// success (payload: data for a read), 1 for an error (payload: the text), or
// 2 when the writer stepped down while holding the request: the sender
// issues it again wherever the writer is now.
const fwdWait = 15 * time.Second

// errStreamEnded: the replication stream a request was forwarded on ended
// before its answer came back.
var errStreamEnded = errors.New("replication stream to the writer ended")

// fromPeerKey marks the context of a request the peer forwarded to this
// member (serveForwarded). Should this member step down while holding it, it
// must not forward it back: the member it came from issues it again.
type fromPeerKey struct{}

// forwardable returns nil when a request with ctx may be forwarded by this
// member (it did not come from the peer).
func forwardable(ctx context.Context) error {
	if ctx.Value(fromPeerKey{}) != nil {
		return fmt.Errorf("stepped down while holding a request forwarded by the peer: %w", errNotForwardable)
	}
	return nil
}

// errNotForwardable: see forwardable. The FwdReply says fwdReissue, and the
// member the request came from issues it again.
var errNotForwardable = fmt.Errorf("the member it came from issues it again: %w", ErrNotWriter)

// fwdReissue is the FwdReply offset that tells the sender to issue the
// request again (0 is success, 1 an error).
const fwdReissue = 2

// maxReissue bounds how often one request is re-issued after streams end.
const maxReissue = 5

// Forwarded requests outstanding on one stream at once: at most
// maxFwdRequests, and at most maxFwdBytes of payload (write data, read
// length) unless a single request is larger. The sender (fwdClient) waits
// for room before it sends one and frees the room when the answer arrives;
// the writer counts them from arrival until it queues the answer, so it
// never sees more outstanding than the sender allows, and a peer that sends
// more breaks the protocol: the writer drops the stream. This bounds what a
// writer holds for its peer: the goroutines, and the payload copies (which
// it charges to the agent's budget, see serveForwarded).
const (
	maxFwdRequests = 64
	maxFwdBytes    = 64 << 20
)

// fwdCost is what a forwarded request counts against maxFwdBytes: the data
// it carries (a write) or asks for (a read).
func fwdCost(f *repl.Frame) int64 {
	switch f.Type {
	case repl.TypeFwdWrite:
		return int64(len(f.Payload))
	case repl.TypeFwdRead:
		return int64(f.Length)
	}
	return 0
}

// fwdRoom reports whether one more request of cost fits beside n requests
// of bytes.
func fwdRoom(n int, bytes, cost int64) bool {
	return n < maxFwdRequests && (bytes == 0 || bytes+cost <= maxFwdBytes)
}

// reissue reports whether a forwarded request that failed with err should be
// issued again: its stream to the writer ended before the answer (the
// writer stepped down in a failback, or the link dropped). The request was
// never acknowledged, so running it again, wherever the writer is now (this
// member, if it was just promoted, or over the next stream), is what any
// block device client may see for a request in flight; the client gets an
// answer instead of an error (invariant 6).
func (v *Volume) reissue(ctx context.Context, err error, attempt int) bool {
	if err == nil || !errors.Is(err, errStreamEnded) || ctx.Err() != nil || attempt >= maxReissue {
		return false
	}
	v.log.V(1).Info("Re-issuing a forwarded request whose stream ended", "attempt", attempt)
	return true
}

// forwarder belongs to an ex-writer; it waits for the new writer's stream.
type forwarder struct {
	v       *Volume
	mu      sync.Mutex
	client  *fwdClient
	changed chan struct{}
}

func newForwarder(v *Volume) *forwarder {
	return &forwarder{v: v, changed: make(chan struct{})}
}

// attach is called when the new writer connects to us as its backup.
func (f *forwarder) attach(c *fwdClient) {
	f.mu.Lock()
	f.client = c
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *forwarder) get(ctx context.Context) (*fwdClient, error) {
	deadline := time.NewTimer(fwdWait)
	defer deadline.Stop()
	for {
		f.v.mu.Lock()
		current := f.v.fwd == f
		f.v.mu.Unlock()
		if !current {
			// The member became the writer again (or changed roles once
			// more) while the request waited: issue it again from the top.
			return nil, fmt.Errorf("member %s stopped forwarding: %w", f.v.opts.Node, errStreamEnded)
		}
		f.mu.Lock()
		c, ch := f.client, f.changed
		f.mu.Unlock()
		if c != nil && c.ok() {
			return c, nil
		}
		select {
		case <-ch:
		case <-time.After(20 * time.Millisecond):
		case <-deadline.C:
			return nil, fmt.Errorf("member %s is no longer the writer and the new writer did not connect within %v: %w", f.v.opts.Node, fwdWait, syscall.EIO)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (f *forwarder) submit(ctx context.Context, kind opKind, p []byte, off, n int64, fua bool) error {
	c, err := f.get(ctx)
	if err != nil {
		return err
	}
	fr := repl.Frame{Offset: uint64(off), Length: uint32(n)}
	switch kind {
	case opWrite:
		fr.Type, fr.Payload = repl.TypeFwdWrite, p
	case opTrim:
		fr.Type = repl.TypeFwdTrim
	case opZero:
		fr.Type = repl.TypeFwdZero
	}
	if fua {
		fr.Flags |= repl.FlagFUA
	}
	_, err = c.call(ctx, &fr)
	return err
}

func (f *forwarder) read(ctx context.Context, p []byte, off int64) error {
	c, err := f.get(ctx)
	if err != nil {
		return err
	}
	data, err := c.call(ctx, &repl.Frame{Type: repl.TypeFwdRead, Offset: uint64(off), Length: uint32(len(p))})
	if err != nil {
		return err
	}
	if len(data) != len(p) {
		return fmt.Errorf("forwarded read returned %d bytes, want %d: %w", len(data), len(p), syscall.EIO)
	}
	copy(p, data)
	return nil
}

func (f *forwarder) flush(ctx context.Context) error {
	c, err := f.get(ctx)
	if err != nil {
		return err
	}
	_, err = c.call(ctx, &repl.Frame{Type: repl.TypeFwdFlush})
	return err
}

// fwdClient sends forwarded requests on one backup stream.
type fwdClient struct {
	b       *backupSide
	mu      sync.Mutex
	next    uint64
	waiting map[uint64]fwdCall
	err     error
	// Requests sent and not answered yet, and their cost: see
	// maxFwdRequests. room is closed (and replaced) when some is freed.
	inflight int
	inBytes  int64
	room     chan struct{}
}

type fwdCall struct {
	ch   chan fwdResult // buffered (1): delivering never blocks
	cost int64
}

type fwdResult struct {
	data []byte
	err  error
}

func newFwdClient(b *backupSide) *fwdClient {
	return &fwdClient{b: b, waiting: make(map[uint64]fwdCall), room: make(chan struct{})}
}

// reserve waits for room for one more request of cost on the stream.
func (c *fwdClient) reserve(ctx context.Context, cost int64) error {
	for {
		c.mu.Lock()
		if c.err != nil {
			c.mu.Unlock()
			return c.err
		}
		if fwdRoom(c.inflight, c.inBytes, cost) {
			c.inflight++
			c.inBytes += cost
			c.mu.Unlock()
			return nil
		}
		room := c.room
		c.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// unreserveLocked frees the room of one request; c.mu held.
func (c *fwdClient) unreserveLocked(cost int64) {
	c.inflight--
	c.inBytes -= cost
	close(c.room)
	c.room = make(chan struct{})
}

func (c *fwdClient) ok() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil
}

func (c *fwdClient) call(ctx context.Context, f *repl.Frame) ([]byte, error) {
	cost := fwdCost(f)
	if err := c.reserve(ctx, cost); err != nil {
		return nil, err
	}
	ch := make(chan fwdResult, 1)
	c.mu.Lock()
	if c.err != nil {
		c.unreserveLocked(cost)
		c.mu.Unlock()
		return nil, c.err
	}
	c.next++
	id := c.next
	c.waiting[id] = fwdCall{ch: ch, cost: cost}
	c.mu.Unlock()
	f.Seq, f.Epoch = id, c.b.epoch
	if err := c.b.send(f); err != nil {
		c.fail(fmt.Errorf("forward to the writer: %w: %w", errStreamEnded, err))
	}
	select {
	case r := <-ch:
		return r.data, r.err
	case <-ctx.Done():
		// The writer may still be running it: the request keeps its room
		// until its answer arrives (or the stream ends), so the writer
		// never counts more outstanding than this side allows.
		return nil, ctx.Err()
	}
}

func (c *fwdClient) deliver(f *repl.Frame) {
	c.mu.Lock()
	call, ok := c.waiting[f.Seq]
	if ok {
		delete(c.waiting, f.Seq)
		c.unreserveLocked(call.cost)
	}
	c.mu.Unlock()
	if !ok {
		return
	}
	ch := call.ch
	if f.Offset == fwdReissue {
		// The writer on this stream stepped down: nothing more goes over it.
		// The request is issued again once this member is the writer or a
		// new writer's stream attaches.
		err := fmt.Errorf("the member it was forwarded to stepped down: %w", errStreamEnded)
		c.fail(err)
		ch <- fwdResult{err: err}
		return
	}
	if f.Offset != 0 {
		ch <- fwdResult{err: fmt.Errorf("writer refused forwarded request: %s: %w", f.Payload, syscall.EIO)}
		return
	}
	ch <- fwdResult{data: append([]byte(nil), f.Payload...)}
}

func (c *fwdClient) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = fmt.Errorf("%w: %w", err, syscall.EIO)
	}
	for id, call := range c.waiting {
		call.ch <- fwdResult{err: c.err}
		delete(c.waiting, id)
		c.inflight--
		c.inBytes -= call.cost
	}
	// Wake the requests waiting for room: they see the error.
	close(c.room)
	c.room = make(chan struct{})
}

// fwdSession is the writer's side of the requests forwarded over one
// stream: it counts them (see maxFwdRequests) and ends them with the stream,
// whose answers could not be sent anyway (the sender issues them again).
type fwdSession struct {
	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.Mutex
	n     int
	bytes int64
}

func newFwdSession(parent context.Context) *fwdSession {
	ctx, cancel := context.WithCancel(parent)
	return &fwdSession{ctx: ctx, cancel: cancel}
}

// end cancels the requests still running.
func (s *fwdSession) end() { s.cancel() }

func (s *fwdSession) admit(cost int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !fwdRoom(s.n, s.bytes, cost) {
		return fmt.Errorf("the peer forwarded a request of %d bytes with %d requests of %d bytes outstanding; a stream allows %d requests and %d bytes: %w",
			cost, s.n, s.bytes, maxFwdRequests, maxFwdBytes, repl.ErrMalformed)
	}
	s.n++
	s.bytes += cost
	return nil
}

func (s *fwdSession) done(cost int64) {
	s.mu.Lock()
	s.n--
	s.bytes -= cost
	s.mu.Unlock()
}

// serveForwarded runs a request forwarded by the ex-writer on this (the new)
// writer and queues the reply on the stream. It is called by the receiver,
// which must not wait: it also reads the acks that writes in flight (and so
// the budget they hold) wait for. So a write's payload copy is charged to
// the budget at once, even beyond it (bounded by maxFwdBytes per stream),
// and a read waits for its bytes in the request's own goroutine. An error
// (the peer exceeded the stream's bounds) ends the stream.
func (l *link) serveForwarded(gen uint64, f *repl.Frame, fs *fwdSession) error {
	cost := fwdCost(f)
	if err := fs.admit(cost); err != nil {
		return err
	}
	bud := l.v.opts.Budget
	req := *f
	req.Payload = nil
	var wbuf *[]byte
	var wcharge int64
	if f.Type == repl.TypeFwdWrite {
		wbuf = getBuf(len(f.Payload))
		copy(*wbuf, f.Payload)
		wcharge = bud.Force(int64(len(*wbuf)))
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.WithValue(fs.ctx, fromPeerKey{}, true), 30*time.Second)
		defer cancel()
		var (
			data   *[]byte // a read's reply payload
			charge int64   // data's share of the budget
			err    error
		)
		fua := req.Flags&repl.FlagFUA != 0
		switch req.Type {
		case repl.TypeFwdWrite:
			// The copy goes on to the link without another one; the
			// volume gives it back (and its budget) once sent or dropped.
			err = l.v.WriteAtTake(ctx, wbuf, func(b *[]byte) {
				putBuf(b)
				bud.Release(wcharge)
			}, int64(req.Offset), fua)
		case repl.TypeFwdTrim:
			err = l.v.Trim(ctx, int64(req.Offset), int64(req.Length), fua)
		case repl.TypeFwdZero:
			err = l.v.WriteZeroes(ctx, int64(req.Offset), int64(req.Length), fua)
		case repl.TypeFwdFlush:
			err = l.v.Flush(ctx)
		case repl.TypeFwdRead:
			if int64(req.Length) > repl.MaxPayload {
				err = errors.New("forwarded read too large")
				break
			}
			if charge, err = bud.Acquire(ctx, int64(req.Length)); err != nil {
				err = fmt.Errorf("waiting for the agent's in-flight budget: %w", err)
				break
			}
			data = getBuf(int(req.Length))
			err = l.v.ReadAt(ctx, *data, int64(req.Offset))
		}
		reply := qframe{f: repl.Frame{Type: repl.TypeFwdReply, Seq: req.Seq}}
		if data != nil {
			reply.buf, reply.free = data, func(b *[]byte) {
				putBuf(b)
				bud.Release(charge)
			}
			reply.f.Payload = *data
		} else {
			bud.Release(charge)
		}
		if err != nil {
			reply.release()
			reply = qframe{f: repl.Frame{Type: repl.TypeFwdReply, Seq: req.Seq, Offset: 1, Payload: []byte(err.Error())}}
			if errors.Is(err, errNotForwardable) {
				reply.f.Offset = fwdReissue
			}
		}
		// Off the count before the answer can reach the sender (see
		// maxFwdRequests).
		fs.done(cost)
		l.mu.Lock()
		if l.gen == gen {
			reply.f.Epoch = l.epoch
			l.queue = append(l.queue, reply)
			l.work.Signal()
		} else {
			reply.release()
		}
		l.mu.Unlock()
	}()
	return nil
}
