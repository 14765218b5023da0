package volume

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"golang.org/x/time/rate"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/repl"
)

// DialFunc connects to a peer's replication listener.
type DialFunc func(ctx context.Context, addr string) (net.Conn, error)

// Link tuning.
const (
	maxQueueBytes     = 64 << 20 // client frames queued for the peer before writers wait
	maxCopyInFlight   = 16 << 20 // resync bytes sent but not yet acked
	pingInterval      = 500 * time.Millisecond
	peerTimeout       = 4 * time.Second // no frame from the peer for this long: link lost
	dialTimeout       = 2 * time.Second
	minBackoff        = 100 * time.Millisecond
	maxBackoff        = 2 * time.Second
	handshakeDeadline = 10 * time.Second
	bigFrame          = 128 << 10 // frames this large bypass the send buffer
	// copyChunk is the largest CopyData frame: a region larger than this
	// (up to the 64 MiB maximum region size, above the frame's 32 MiB
	// payload limit) is copied in several frames.
	copyChunk = 4 << 20
)

// HelloAck is the backup's answer to a Hello.
type HelloAck struct {
	Node      string    `json:"node"`
	DataState DataState `json:"dataState"`
	// FullCopy: the backup's data or bitmaps were lost; copy everything.
	FullCopy bool `json:"fullCopy,omitempty"`
	// Joined and PairUID: the backup holds the data of that pair (see
	// Status). A backup that does not hold the primary's pair's data gets
	// a full copy, unless both stores hold only zeros (Zero).
	Joined  bool   `json:"joined,omitempty"`
	PairUID string `json:"pairUID,omitempty"`
	Zero    bool   `json:"zero,omitempty"`
}

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

// copyRec is one frame of a resync copy in flight: a region is sent in
// chunks of at most copyChunk bytes, and only its last chunk (region != 0
// or last set) ends the region's copy.
type copyRec struct {
	seq    uint64
	region uint32
	tok    bitmap.CopyToken
	bytes  int64 // this frame's bytes, for the in-flight bound
	// last: the region's last chunk; regionBytes is then the region's
	// size, counted as done when its copy completes.
	last        bool
	regionBytes int64
}

type linkStatus struct {
	streaming bool
	copy      CopyStatus
	copyDone  bool
	allAcked  bool
	oldest    time.Duration
}

// link is the primary's side of the replication stream to its backup: it
// dials, handshakes, merges the backup's bitmap, streams writes in order and
// runs the resync copy. One per (volume, epoch, peer address).
type link struct {
	v      *Volume
	spec   Spec
	epoch  uint64
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	log    logLike

	mu        sync.Mutex
	space     *sync.Cond // queue space freed, or the generation changed
	work      *sync.Cond // frames queued, or the generation changed
	changed   chan struct{}
	gen       uint64 // connection generation
	streaming bool
	nextSeq   uint64
	queue     []qframe
	spare     []qframe
	qbytes    int64
	applied   uint64
	durable   uint64
	sentAt    []sentRec // unacked client frames, for the oldest-write age
	waiters   []waiter  // sync-mode writes waiting for their ack
	copies    []copyRec
	copyBytes int64
	copyDone  bool // CopyDone queued and nothing left to copy
	cp        CopyStatus

	// behindSince is when the peer started to lack a write that no frame
	// in sentAt accounts for: the oldest unacked frame at a teardown, or
	// a write made while no connection streamed (or, for a new link, its
	// start if regions were already dirty). Zero once a resync completed.
	behindSince time.Time
}

type sentRec struct {
	seq uint64
	at  time.Time
}

// logLike is the subset of logr.Logger the link uses (eases testing).
type logLike interface {
	Info(msg string, kv ...any)
	Error(err error, msg string, kv ...any)
}

func newLink(v *Volume, s Spec) *link {
	ctx, cancel := context.WithCancel(context.Background())
	l := &link{
		v: v, spec: s, epoch: s.Epoch, ctx: ctx, cancel: cancel,
		done:    make(chan struct{}),
		changed: make(chan struct{}),
		log:     v.log.WithValues("peer", s.PeerNode, "peerAddress", s.PeerAddress, "epoch", s.Epoch),
	}
	l.space = sync.NewCond(&l.mu)
	l.work = sync.NewCond(&l.mu)
	if v.tracker.Count() > 0 {
		// Owed from before this link: how long is not known, at least
		// this long.
		l.behindSince = time.Now()
	}
	return l
}

func (l *link) start() { go l.run() }

func (l *link) stop() {
	l.cancel()
	<-l.done
}

func (l *link) notifyLocked() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// run dials and serves the link until stopped, reconnecting with backoff.
func (l *link) run() {
	defer close(l.done)
	backoff := minBackoff
	for l.ctx.Err() == nil {
		start := time.Now()
		err := l.session()
		if l.ctx.Err() != nil {
			return
		}
		if time.Since(start) > 5*time.Second {
			backoff = minBackoff
		}
		l.log.Info("Replication link down; will retry", "error", err.Error(), "backoff", backoff.String())
		l.v.ctr.reconnects.Add(1)
		select {
		case <-l.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

func (l *link) dial() (net.Conn, error) {
	ctx, cancel := context.WithTimeout(l.ctx, dialTimeout)
	defer cancel()
	if l.v.opts.Dial != nil {
		return l.v.opts.Dial(ctx, l.spec.PeerAddress)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", l.spec.PeerAddress)
}

// session runs one connection: handshake, then stream until an error.
func (l *link) session() error {
	conn, err := l.dial()
	if err != nil {
		return fmt.Errorf("dial %s: %w", l.spec.PeerAddress, err)
	}
	defer conn.Close()
	stopOnCancel := context.AfterFunc(l.ctx, func() { conn.Close() })
	defer stopOnCancel()

	br := bufio.NewReaderSize(conn, 256<<10)
	bw := bufio.NewWriterSize(conn, 256<<10)
	rd := repl.NewReader(br, 0)

	// Read before the stream starts: a write that clears it later is
	// either streamed or tracked dirty (not streaming yet), so it is copied.
	primaryZero := l.v.zero.Load()
	ack, peerBitmap, err := l.handshake(conn, rd, bw)
	if err != nil {
		return err
	}
	// Journal the peer's diff before relying on it: if this side crashes
	// now, the merged regions must still be copied (invariant 3).
	merge := l.spec.MergesPeerBitmap() && peerBitmap != nil && !peerBitmap.IsEmpty()
	// The backup keeps what it wrote alone when its diff is not merged
	// (mergePrimaryBitmap false): it must know, to report those regions.
	unmerged := !l.spec.MergesPeerBitmap() && peerBitmap != nil && !peerBitmap.IsEmpty()
	full := fullCopyReason(ack, l.spec.PairUID, primaryZero)
	if full != "" {
		all := roaring.New()
		all.AddRange(0, uint64(l.v.tracker.Regions()))
		peerBitmap, merge, unmerged = all, true, false
	} else if !peerHolds(ack, l.spec.PairUID) {
		// Both all-zero: identical without a copy; the backup joins at
		// CopyDone. Its own diff means nothing.
		peerBitmap, merge, unmerged = nil, false, false
	}
	if merge {
		if err := l.journalRegions(peerBitmap); err != nil {
			return err
		}
		l.v.tracker.MarkRegions(peerBitmap)
	}
	total := l.v.tracker.Bytes()
	l.log.Info("Replication link up", "peerDataState", ack.DataState, "peerDiffRegions", cardinality(peerBitmap),
		"merged", merge, "fullCopy", full != "", "fullCopyReason", full, "toCopyBytes", total)

	l.mu.Lock()
	l.gen++
	gen := l.gen
	l.streaming = true
	l.nextSeq, l.applied, l.durable = 0, 0, 0
	l.copies, l.copyBytes, l.copyDone = nil, 0, false
	l.cp = CopyStatus{Running: total > 0, TotalBytes: total, StartTime: time.Now(), FullCopy: full != "", Reason: full}
	// The first frame tells the backup how much is coming: it marks itself
	// Inconsistent before the first copied region lands.
	begin := repl.Frame{Type: repl.TypeResyncBegin, Offset: uint64(total)}
	if unmerged {
		begin.Length = repl.ResyncUnmerged
	}
	l.enqueueLocked(begin, nil, 0)
	l.notifyLocked()
	l.mu.Unlock()
	l.v.notify()

	errc := make(chan error, 3)
	var wg sync.WaitGroup
	wg.Add(3)
	fs := newFwdSession(l.ctx)
	go func() { defer wg.Done(); errc <- l.sender(gen, conn, bw) }()
	go func() { defer wg.Done(); errc <- l.receiver(gen, conn, rd, fs) }()
	go func() { defer wg.Done(); errc <- l.copier(gen) }()
	err = preferRefusal(<-errc, errc)
	l.teardown(gen)
	fs.end()
	conn.Close()
	wg.Wait()
	return err
}

// fullCopyReason says why the backup of pair uid must receive the whole
// volume, or "" when a copy of the diffs is enough: the backup lost its
// bitmaps, or it does not hold this pair's data (new, wiped, another
// pair's) and is not, like this primary, all zeros.
func fullCopyReason(ack HelloAck, uid string, primaryZero bool) string {
	switch {
	case ack.FullCopy:
		return "the replica on " + ack.Node + " lost its data or its bitmaps"
	case peerHolds(ack, uid):
		return ""
	case ack.Zero && primaryZero:
		return ""
	case ack.Joined:
		return "the replica on " + ack.Node + " holds another VolumePair's data (uid " + ack.PairUID + ")"
	}
	return "the replica on " + ack.Node + " is new or was wiped: it holds no data of the pair"
}

// peerHolds reports whether the backup holds the data of pair uid (a
// replica joined before UIDs were recorded holds whatever pair it serves).
func peerHolds(ack HelloAck, uid string) bool {
	return ack.Joined && (ack.PairUID == uid || ack.PairUID == "" || uid == "")
}

// errPeerRefused: the peer sent a Nack for a frame, with its reason.
var errPeerRefused = errors.New("peer refused frame")

// refusalGrace bounds how long a session whose send was reset waits for the
// peer's reason. A backup that cannot apply a frame (its disk failed) sends
// a Nack saying why and closes the connection; with frames still unread on
// its side, the close resets it, and the sender's next write can fail with
// ECONNRESET before the receiver has read the Nack, which is already in
// the socket. Closing at once would log "connection reset by peer" and drop
// the backup's reason. The receiver returns at once on a reset connection
// (the Nack, or the reset): the bound only matters if it is not scheduled
// (a loaded node) or is busy serving a forwarded request.
const refusalGrace = time.Second

// preferRefusal returns the session's error: first, the first one, unless
// it is a send the peer reset and the next error (the receiver's, within
// refusalGrace) is the peer's refusal.
func preferRefusal(first error, errc <-chan error) error {
	if !errors.Is(first, syscall.ECONNRESET) && !errors.Is(first, syscall.EPIPE) {
		return first
	}
	t := time.NewTimer(refusalGrace)
	defer t.Stop()
	select {
	case err := <-errc:
		if errors.Is(err, errPeerRefused) {
			return err
		}
	case <-t.C:
	}
	return first
}

func cardinality(b *roaring.Bitmap) uint64 {
	if b == nil {
		return 0
	}
	return b.GetCardinality()
}

func (l *link) handshake(conn net.Conn, rd *repl.Reader, bw *bufio.Writer) (HelloAck, *roaring.Bitmap, error) {
	var ack HelloAck
	_ = conn.SetDeadline(time.Now().Add(handshakeDeadline))
	defer conn.SetDeadline(time.Time{})
	h := repl.Hello{
		Volume: l.v.opts.Name, Node: l.v.opts.Node, Role: string(RolePrimary), Epoch: l.epoch,
		Size: l.v.opts.Size, RegionSize: l.v.opts.RegionSize, PairUID: l.spec.PairUID, Token: l.v.opts.Token,
	}
	if err := repl.WriteFrame(bw, &repl.Frame{Type: repl.TypeHello, Epoch: l.epoch, Payload: h.Payload()}); err != nil {
		return ack, nil, fmt.Errorf("send Hello: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return ack, nil, fmt.Errorf("send Hello: %w", err)
	}
	f, err := rd.Next()
	if err != nil {
		return ack, nil, fmt.Errorf("read HelloAck: %w", err)
	}
	switch f.Type {
	case repl.TypeNack:
		return ack, nil, fmt.Errorf("peer refused the link: %s", f.Payload)
	case repl.TypeHelloAck:
	default:
		return ack, nil, fmt.Errorf("peer answered Hello with %v", f.Type)
	}
	if f.Epoch != l.epoch {
		return ack, nil, fmt.Errorf("peer answered at epoch %d, want %d", f.Epoch, l.epoch)
	}
	if err := json.Unmarshal(f.Payload, &ack); err != nil {
		return ack, nil, fmt.Errorf("decode HelloAck: %w", err)
	}
	f, err = rd.Next()
	if err != nil {
		return ack, nil, fmt.Errorf("read peer bitmap: %w", err)
	}
	if f.Type != repl.TypeBitmap {
		return ack, nil, fmt.Errorf("peer sent %v, want Bitmap", f.Type)
	}
	bm := roaring.New()
	if len(f.Payload) > 0 {
		if _, err := bm.FromBuffer(append([]byte(nil), f.Payload...)); err != nil {
			return ack, nil, fmt.Errorf("decode peer bitmap: %w", err)
		}
		if bm.GetCardinality() > 0 && bm.Maximum() >= l.v.tracker.Regions() {
			return ack, nil, fmt.Errorf("peer bitmap names region %d of a volume with %d regions", bm.Maximum(), l.v.tracker.Regions())
		}
	}
	return ack, bm, nil
}

// journalRegions durably marks the extents of the given regions.
func (l *link) journalRegions(b *roaring.Bitmap) error {
	rs := l.v.opts.RegionSize
	it := b.ManyIterator()
	buf := make([]uint32, 4096)
	var runStart, runEnd int64 = -1, -1
	flush := func() error {
		if runStart < 0 {
			return nil
		}
		n := min(runEnd, l.v.opts.Size) - runStart
		return l.v.journal.Mark(l.ctx, runStart, n)
	}
	for {
		n := it.NextMany(buf)
		if n == 0 {
			break
		}
		for _, r := range buf[:n] {
			off := int64(r) * rs
			if off == runEnd {
				runEnd += rs
				continue
			}
			if err := flush(); err != nil {
				return fmt.Errorf("journal peer bitmap: %w", err)
			}
			runStart, runEnd = off, off+rs
		}
	}
	if err := flush(); err != nil {
		return fmt.Errorf("journal peer bitmap: %w", err)
	}
	return nil
}

// teardown ends generation gen: frames in flight will never be acked, so
// their regions stay dirty (sticky) in the tracker.
func (l *link) teardown(gen uint64) {
	l.mu.Lock()
	if l.gen != gen {
		l.mu.Unlock()
		return
	}
	l.gen++
	l.streaming = false
	l.v.tracker.PeerLost()
	for i := range l.queue {
		l.queue[i].release()
	}
	l.queue, l.qbytes = l.queue[:0], 0
	// The unacked writes are now owed through the resync: keep the age
	// of the oldest for the oldest-unreplicated metric.
	if len(l.sentAt) > 0 {
		l.noteBehindLocked(l.sentAt[0].at)
	}
	l.sentAt = l.sentAt[:0]
	l.copies, l.copyBytes, l.copyDone = nil, 0, false
	l.cp.Running = false
	l.space.Broadcast()
	l.work.Broadcast()
	l.wakeLocked(true)
	l.notifyLocked()
	l.mu.Unlock()
	l.v.notify()
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
func (l *link) enqueueClient(kind opKind, p []byte, off, n int64, fua bool, own *owned) (ticket, bool) {
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
		l.noteBehindLocked(time.Now()) // the caller marks it for the resync
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
	l.v.tracker.Mark(off, n, seq)
	l.sentAt = append(l.sentAt, sentRec{seq: seq, at: time.Now()})
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

// inSync reports whether the peer holds everything: streaming, nothing dirty.
func (l *link) inSync() bool {
	l.mu.Lock()
	s := l.streaming
	l.mu.Unlock()
	return s && l.v.tracker.Count() == 0
}

// noteBehindLocked records that the peer lacks a write made at t; l.mu held.
func (l *link) noteBehindLocked(t time.Time) {
	if l.behindSince.IsZero() || t.Before(l.behindSince) {
		l.behindSince = t
	}
}

func (l *link) status() linkStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := linkStatus{streaming: l.streaming, copy: l.cp, copyDone: l.copyDone,
		allAcked: l.applied >= l.nextSeq && l.durable >= l.nextSeq}
	if len(l.sentAt) > 0 {
		st.oldest = time.Since(l.sentAt[0].at)
	}
	if !l.behindSince.IsZero() {
		st.oldest = max(st.oldest, time.Since(l.behindSince))
	}
	if st.copy.Running {
		el := time.Since(st.copy.StartTime).Seconds()
		if el > 0 {
			st.copy.BytesPerSecond = int64(float64(st.copy.DoneBytes) / el)
		}
		if st.copy.BytesPerSecond > 0 {
			st.copy.ETASeconds = (st.copy.TotalBytes - st.copy.DoneBytes) / st.copy.BytesPerSecond
		}
	}
	return st
}

// sender writes queued frames to the connection, batching them into as few
// syscalls as possible, and pings when idle.
func (l *link) sender(gen uint64, conn net.Conn, bw *bufio.Writer) error {
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
		for len(l.queue) == 0 && l.gen == gen && len(pinger) == 0 {
			l.work.Wait()
		}
		if l.gen != gen {
			l.mu.Unlock()
			return errors.New("connection generation ended")
		}
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
	l.v.tracker.Acked(durable)
	j := 0
	for j < len(l.copies) && l.copies[j].seq <= durable {
		c := l.copies[j]
		if c.last && l.v.tracker.CopyDone(c.region, c.tok, durable) {
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

// copier runs the resync: it copies every region that no ack can clean (the
// OR of both sides' diffs) to the peer, rate-limited, then tells the peer it
// is consistent again.
func (l *link) copier(gen uint64) error {
	var lim *rate.Limiter
	if bps := l.spec.MaxBytesPerSecond; bps > 0 {
		lim = rate.NewLimiter(rate.Limit(bps), int(l.v.opts.RegionSize))
	}
	rs := l.v.opts.RegionSize
	ids := make([]uint32, 1024)
	for {
		l.mu.Lock()
		if l.gen != gen {
			l.mu.Unlock()
			return errors.New("connection generation ended")
		}
		pending := len(l.copies)
		ch := l.changed
		l.mu.Unlock()

		sticky := l.v.tracker.Sticky()
		if sticky.IsEmpty() || pending > 0 {
			if sticky.IsEmpty() && pending == 0 {
				l.mu.Lock()
				if l.gen == gen && !l.copyDone {
					l.enqueueLocked(repl.Frame{Type: repl.TypeCopyDone, Flags: repl.FlagDurableAck}, nil, 0)
					l.copyDone = true
					// The peer holds every write but those in sentAt.
					l.behindSince = time.Time{}
					// In sync: a later loss of the peer needs a new
					// Outdated record before the writer continues alone.
					l.v.clearAlone()
					if l.cp.Running {
						l.cp.Running = false
						l.log.Info("Resync complete", "copiedBytes", l.cp.DoneBytes, "seconds", time.Since(l.cp.StartTime).Seconds())
					}
				}
				l.mu.Unlock()
			}
			select {
			case <-ch:
			case <-time.After(100 * time.Millisecond):
			case <-l.ctx.Done():
				return l.ctx.Err()
			}
			continue
		}
		l.mu.Lock()
		if l.copyDone {
			// New sticky regions after a CopyDone: the peer is
			// inconsistent again until they are copied.
			l.copyDone = false
			l.noteBehindLocked(time.Now())
			l.cp = CopyStatus{Running: true, TotalBytes: int64(sticky.GetCardinality()) * rs, StartTime: time.Now()}
			l.enqueueLocked(repl.Frame{Type: repl.TypeResyncBegin, Offset: uint64(l.cp.TotalBytes)}, nil, 0)
		}
		l.mu.Unlock()
		it := sticky.ManyIterator()
		for {
			n := it.NextMany(ids)
			if n == 0 {
				break
			}
			for _, r := range ids[:n] {
				off := int64(r) * rs
				size := min(rs, l.v.opts.Size-off)
				if lim != nil {
					if err := lim.WaitN(l.ctx, int(size)); err != nil {
						return err
					}
				}
				if err := l.copyRegion(gen, r, off, size); err != nil {
					return err
				}
			}
		}
	}
}

// copyRegion copies one region: each chunk of it is read under the
// region's lock and queued before the lock is released, so no live write to
// the chunk can be ordered between the read and the copy frame. A chunk of
// zeros goes as a Zero frame (no payload): a sparse or new volume copies
// only what was written. The region's copy ends with the durable ack of its
// last chunk (CopyDone), which is ordered after every live write marked
// since CopyBegin.
func (l *link) copyRegion(gen uint64, r uint32, off, size int64) error {
	var tok bitmap.CopyToken
	for done := int64(0); done < size; {
		n := min(size-done, copyChunk)
		if err := l.waitCopySpace(gen); err != nil {
			return err
		}
		buf := getBuf(int(n))
		locked := l.v.locks.lock(off+done, n)
		if done == 0 {
			tok = l.v.tracker.CopyBegin(r)
		}
		if _, err := l.v.store.ReadAt(*buf, off+done); err != nil {
			locked.unlock()
			putBuf(buf)
			err = fmt.Errorf("resync read of region %d: %w", r, err)
			l.v.setError(err)
			return err
		}
		f := repl.Frame{Type: repl.TypeCopyData, Flags: repl.FlagDurableAck, Offset: uint64(off + done), Length: uint32(n), Payload: *buf}
		if allZero(*buf) {
			putBuf(buf)
			buf = nil
			f.Type, f.Payload = repl.TypeZero, nil
		}
		last := done+n == size
		l.mu.Lock()
		if l.gen != gen {
			l.mu.Unlock()
			locked.unlock()
			putBuf(buf)
			return errors.New("connection generation ended")
		}
		seq := l.enqueueLocked(f, buf, int64(len(f.Payload)))
		rec := copyRec{seq: seq, region: r, tok: tok, bytes: n, last: last}
		if last {
			rec.regionBytes = size
		}
		l.copies = append(l.copies, rec)
		l.copyBytes += n
		l.mu.Unlock()
		locked.unlock()
		l.v.copiedTotal.Add(n)
		done += n
	}
	return nil
}

// waitCopySpace waits until fewer than maxCopyInFlight copy bytes await
// their ack.
func (l *link) waitCopySpace(gen uint64) error {
	l.mu.Lock()
	for l.gen == gen && l.copyBytes >= maxCopyInFlight {
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-l.ctx.Done():
			return l.ctx.Err()
		}
		l.mu.Lock()
	}
	l.mu.Unlock()
	return nil
}

// zeros is compared against in allZero.
var zeros [64 << 10]byte

// allZero reports whether p holds only zero bytes.
func allZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeros))
		if !bytes.Equal(p[:n], zeros[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}
