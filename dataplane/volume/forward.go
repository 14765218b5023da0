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
	waiting map[uint64]chan fwdResult
	err     error
}

type fwdResult struct {
	data []byte
	err  error
}

func newFwdClient(b *backupSide) *fwdClient {
	return &fwdClient{b: b, waiting: make(map[uint64]chan fwdResult)}
}

func (c *fwdClient) ok() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil
}

func (c *fwdClient) call(ctx context.Context, f *repl.Frame) ([]byte, error) {
	ch := make(chan fwdResult, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, c.err
	}
	c.next++
	id := c.next
	c.waiting[id] = ch
	c.mu.Unlock()
	f.Seq, f.Epoch = id, c.b.epoch
	if err := c.b.send(f); err != nil {
		c.fail(fmt.Errorf("forward to the writer: %w: %w", errStreamEnded, err))
	}
	select {
	case r := <-ch:
		return r.data, r.err
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.waiting, id)
		c.mu.Unlock()
		return nil, ctx.Err()
	}
}

func (c *fwdClient) deliver(f *repl.Frame) {
	c.mu.Lock()
	ch := c.waiting[f.Seq]
	delete(c.waiting, f.Seq)
	c.mu.Unlock()
	if ch == nil {
		return
	}
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
	for id, ch := range c.waiting {
		ch <- fwdResult{err: c.err}
		delete(c.waiting, id)
	}
}

// serveForwarded runs a request forwarded by the ex-writer on this (the new)
// writer and queues the reply on the stream.
func (l *link) serveForwarded(gen uint64, f *repl.Frame) {
	req := *f
	if f.Type == repl.TypeFwdWrite {
		req.Payload = append([]byte(nil), f.Payload...)
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.WithValue(l.ctx, fromPeerKey{}, true), 30*time.Second)
		defer cancel()
		var data []byte
		var err error
		fua := req.Flags&repl.FlagFUA != 0
		switch req.Type {
		case repl.TypeFwdWrite:
			err = l.v.WriteAt(ctx, req.Payload, int64(req.Offset), fua)
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
			data = make([]byte, req.Length)
			err = l.v.ReadAt(ctx, data, int64(req.Offset))
		}
		reply := repl.Frame{Type: repl.TypeFwdReply, Seq: req.Seq, Payload: data}
		if err != nil {
			reply.Offset, reply.Payload = 1, []byte(err.Error())
			if errors.Is(err, errNotForwardable) {
				reply.Offset = fwdReissue
			}
		}
		l.mu.Lock()
		if l.gen == gen {
			reply.Epoch = l.epoch
			l.queue = append(l.queue, qframe{f: reply})
			l.work.Signal()
		}
		l.mu.Unlock()
	}()
}
