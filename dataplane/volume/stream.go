package volume

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/tandem-storage/tandem/dataplane/repl"
)

type ticket struct{ gen, seq uint64 }

type qframe struct {
	f    repl.Frame
	buf  *[]byte
	free func(*[]byte) // gives buf back; nil: the volume's pool
}

// release gives the frame's payload buffer back.
func (q *qframe) release() {
	switch {
	case q.buf == nil:
	case q.free != nil:
		q.free(q.buf)
	default:
		putBuf(q.buf)
	}
}

type sentRec struct {
	seq uint64
	at  time.Time
}

// enqueueLocked appends a frame with the next seq; l.mu held.
func (l *link) enqueueLocked(f repl.Frame, buf *[]byte, size int64) uint64 {
	l.nextSeq++
	f.Seq = l.nextSeq
	f.Epoch = l.epoch
	l.queue = append(l.queue, qframe{f: f, buf: buf})
	l.qbytes += size
	l.work.Signal()
	return f.Seq
}

// enqueueClient queues a client write. It must be called with the region
// locks of [off, off+n) held, after the local write. It returns false when
// the link is not streaming (the caller then marks the regions dirty). With
// own set (p is *own.buf) the frame takes the buffer instead of a copy and
// own.buf is cleared; when it returns false the caller still owns it.
//
// g numbers the write among those fanned out to several backups (0: one
// backup, not numbered).
func (l *link) enqueueClient(kind opKind, p []byte, off, n int64, fua bool, own *owned, g uint64) (ticket, bool) {
	var buf *[]byte
	var free func(*[]byte)
	if kind == opWrite {
		if own != nil && own.buf != nil {
			buf, free = own.buf, own.done
		} else {
			buf = getBuf(len(p))
			copy(*buf, p)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	gen := l.gen
	for l.streaming && l.gen == gen && l.qbytes >= maxQueueBytes {
		l.space.Wait()
	}
	if !l.streaming || l.gen != gen {
		if free == nil {
			putBuf(buf)
		}
		l.noteBehindLocked(l.v.opts.Clock.Now()) // the caller marks it for the resync
		if g > 0 {
			l.holeLocked(g)
		}
		return ticket{}, false
	}
	f := repl.Frame{Type: kind.frameType(), Offset: uint64(off), Length: uint32(n)}
	if buf != nil {
		f.Payload = *buf
	}
	if fua {
		f.Flags |= repl.FlagFUA | repl.FlagDurableAck
	}
	seq := l.enqueueLocked(f, buf, int64(len(p)))
	if free != nil {
		l.queue[len(l.queue)-1].free = free
		own.buf = nil
	}
	l.tr.Mark(off, n, seq)
	if g > 0 {
		l.noteGLocked(seq, g)
	}
	l.sentAt = append(l.sentAt, sentRec{seq: seq, at: l.v.opts.Clock.Now()})
	return ticket{gen: gen, seq: seq}, true
}

// enqueueFlush queues a Flush; the ack covering it means durable.
func (l *link) enqueueFlush() (ticket, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.streaming {
		return ticket{}, false
	}
	seq := l.enqueueLocked(repl.Frame{Type: repl.TypeFlush, Flags: repl.FlagDurableAck}, nil, 0)
	return ticket{gen: l.gen, seq: seq}, true
}

// waiter is a sync-mode write (or flush) waiting for the ack of seq.
type waiter struct {
	seq     uint64
	durable bool
	ch      chan struct{} // buffered (1): acked or teardown signals it
}

var waitChans = sync.Pool{New: func() any { return make(chan struct{}, 1) }}

// waitApplied waits until the peer acknowledged t (durably when durable is
// set). It returns false if the connection of t was lost first. Only the
// acks that satisfy a waiter wake it (not every ack every waiter).
func (l *link) waitApplied(ctx context.Context, t ticket, durable bool) bool {
	ch := waitChans.Get().(chan struct{})
	defer func() {
		select { // drop a signal that raced with the last check
		case <-ch:
		default:
		}
		waitChans.Put(ch)
	}()
	for {
		l.mu.Lock()
		if l.gen != t.gen || !l.streaming {
			l.mu.Unlock()
			return false
		}
		got := l.applied
		if durable {
			got = l.durable
		}
		if got >= t.seq {
			l.mu.Unlock()
			return true
		}
		l.waiters = append(l.waiters, waiter{seq: t.seq, durable: durable, ch: ch})
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			l.mu.Lock()
			l.waiters = slices.DeleteFunc(l.waiters, func(w waiter) bool { return w.ch == ch })
			l.mu.Unlock()
			return false
		}
	}
}

// wakeLocked signals the waiters the acks satisfy (all of them with all
// set, at teardown) and forgets them; l.mu held.
func (l *link) wakeLocked(all bool) {
	n := 0
	for _, w := range l.waiters {
		got := l.applied
		if w.durable {
			got = l.durable
		}
		if all || got >= w.seq {
			select {
			case w.ch <- struct{}{}:
			default:
			}
			continue
		}
		l.waiters[n] = w
		n++
	}
	clear(l.waiters[n:])
	l.waiters = l.waiters[:n]
}

// senderBatchHint: a sender woken for fewer frames than this yields its
// processor once before it takes the queue. runtime.Gosched returns at once
// when no other goroutine is ready to run (an idle volume sends a lone
// write without delay); under load it lets the NBD workers that are ready
// add their writes to the same batch. Each send is a syscall here and a
// wakeup of the backup's apply loop there; on the two CPUs of the bench
// this took the Async pair's 4 KiB random writes from 52k to 57k IOPS
// (analysis in docs/benchmarks.md).
const senderBatchHint = 32

// sender writes queued frames to the connection, batching them into as few
// syscalls as possible, and pings when idle. With headerOnly (negotiated in
// the handshake) the data frames' checksums cover their headers only.
func (l *link) sender(gen uint64, conn net.Conn, bw *bufio.Writer, headerOnly bool) error {
	ticker := time.NewTicker(pingInterval)
	defer ticker.Stop()
	pinger := make(chan struct{}, 1)
	go func() {
		for {
			select {
			case <-ticker.C:
				l.mu.Lock()
				if l.gen != gen {
					l.mu.Unlock()
					return
				}
				if len(l.queue) == 0 {
					select {
					case pinger <- struct{}{}:
					default:
					}
					l.work.Signal()
				}
				l.mu.Unlock()
			case <-l.ctx.Done():
				return
			}
		}
	}()
	for {
		l.mu.Lock()
		for len(l.queue) == 0 && l.gen == gen && len(pinger) == 0 && l.wm == nil {
			l.work.Wait()
		}
		if l.gen != gen {
			l.mu.Unlock()
			return errors.New("connection generation ended")
		}
		if len(l.queue) < senderBatchHint {
			// Let the writers that are ready to run queue their frames
			// first: one send then carries them all, and the backup
			// wakes once for them (see senderBatchHint).
			l.mu.Unlock()
			runtime.Gosched()
			l.mu.Lock()
			if l.gen != gen {
				l.mu.Unlock()
				return errors.New("connection generation ended")
			}
		}
		// A watermark names only frames the member applied: sent after
		// the batch, it follows them anyway.
		wm := l.wm
		l.wm = nil
		batch := l.queue
		l.queue, l.spare = l.spare[:0], nil
		l.qbytes = 0
		l.space.Broadcast()
		l.mu.Unlock()

		select {
		case <-pinger:
			if err := repl.WriteFrame(bw, &repl.Frame{Type: repl.TypePing, Epoch: l.epoch}); err != nil {
				return fmt.Errorf("send Ping: %w", err)
			}
		default:
		}
		_ = conn.SetWriteDeadline(time.Now().Add(peerTimeout))
		var err error
		for i := range batch {
			if t := batch[i].f.Type; headerOnly && (t == repl.TypeWrite || t == repl.TypeCopyData) {
				batch[i].f.Flags |= repl.FlagHeaderChecksum
			}
			if err == nil {
				if len(batch[i].f.Payload) >= bigFrame {
					// Header and payload in one writev, not copied through
					// the buffer.
					if err = bw.Flush(); err == nil {
						err = repl.WriteFrame(conn, &batch[i].f)
					}
				} else {
					err = repl.WriteFrame(bw, &batch[i].f)
				}
			}
			batch[i].release()
			batch[i] = qframe{}
		}
		if err == nil && wm != nil {
			err = repl.WriteFrame(bw, wm)
		}
		if err == nil {
			err = bw.Flush()
		}
		if err != nil {
			return fmt.Errorf("send to peer: %w", err)
		}
		l.v.ctr.framesSent.Add(int64(len(batch)))
		l.mu.Lock()
		if l.spare == nil {
			l.spare = batch[:0]
		}
		l.mu.Unlock()
	}
}

// receiver reads acks (and forwarded requests) from the backup.
func (l *link) receiver(gen uint64, conn net.Conn, rd *repl.Reader, fs *fwdSession) error {
	for {
		_ = conn.SetReadDeadline(time.Now().Add(peerTimeout))
		f, err := rd.Next()
		if err != nil {
			return fmt.Errorf("read from peer: %w", err)
		}
		if f.Epoch != l.epoch {
			l.v.ctr.rejected.Add(1)
			return fmt.Errorf("peer sent %v at epoch %d, link is at epoch %d", f.Type, f.Epoch, l.epoch)
		}
		switch f.Type {
		case repl.TypeAck:
			l.acked(gen, f.Seq, f.Offset)
		case repl.TypeNack:
			return fmt.Errorf("%w %d: %s", errPeerRefused, f.Seq, f.Payload)
		case repl.TypePong:
		case repl.TypeFwdWrite, repl.TypeFwdTrim, repl.TypeFwdZero, repl.TypeFwdFlush, repl.TypeFwdRead:
			if err := l.serveForwarded(gen, f, fs); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unexpected %v frame from the backup", f.Type)
		}
	}
}

func (l *link) acked(gen, applied, durable uint64) {
	if durable > applied {
		durable = applied
	}
	l.mu.Lock()
	if l.gen != gen {
		l.mu.Unlock()
		return
	}
	if applied > l.applied {
		l.applied = applied
	}
	if durable > l.durable {
		l.durable = durable
	}
	durable = l.durable
	i := 0
	for i < len(l.sentAt) && l.sentAt[i].seq <= l.applied {
		i++
	}
	l.sentAt = l.sentAt[:copy(l.sentAt, l.sentAt[i:])]
	// Bits clear only once the peer holds the data durably.
	l.tr.Acked(durable)
	j := 0
	for j < len(l.copies) && l.copies[j].seq <= durable {
		c := l.copies[j]
		if c.last && l.tr.CopyDone(c.region, c.tok, durable) {
			l.cp.DoneBytes += c.regionBytes
		}
		l.copyBytes -= c.bytes
		j++
	}
	l.copies = l.copies[:copy(l.copies, l.copies[j:])]
	l.wakeLocked(false)
	// The copier and copyRegion wait on changed for copies to be acked;
	// plain write acks wake only their waiters.
	if j > 0 || len(l.copies) > 0 || !l.copyDone {
		l.notifyLocked()
	}
	l.mu.Unlock()
}
