package volume

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

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
	// FullCopy: the backup's data or bitmaps were lost, or its bitmaps
	// track another member than this primary (its peer changed, a member
	// was replaced); copy everything.
	FullCopy bool `json:"fullCopy,omitempty"`
	// Joined and PairUID: the backup holds the data of that pair (see
	// Status). A backup that does not hold the primary's pair's data gets
	// a full copy, unless both stores hold only zeros (Zero).
	Joined  bool   `json:"joined,omitempty"`
	PairUID string `json:"pairUID,omitempty"`
	Zero    bool   `json:"zero,omitempty"`
	// Checksum is what the backup asks of the data frames' checksums
	// (repl.Hello.Checksum); empty from an agent older than the
	// negotiation: payload checksums.
	Checksum string `json:"checksum,omitempty"`
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
	v    *Volume
	spec Spec
	// peer is the member this link mirrors to (its address and mode),
	// node its resolved name, tr its tracker.
	peer Peer
	node string
	tr   *bitmap.Tracker
	// multi: the writer has other backups too; the link keeps what the
	// watermarks need (watermark.go).
	multi  atomic.Bool
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

	// Watermarks (watermark.go): the data frames some sibling may still
	// need to hear about, the last one forgotten, the first write the
	// member missed (0: none), and the Watermark frame for the sender
	// with what the last one said.
	gs          []gseq
	poppedSeq   uint64
	poppedG     uint64
	holeG       uint64
	wm          *repl.Frame
	wmSent      []repl.WatermarkEntry
	wmCleanSent uint64

	// behindSince is when the peer started to lack a write that no frame
	// in sentAt accounts for: the oldest unacked frame at a teardown, or
	// a write made while no connection streamed (or, for a new link, its
	// start if regions were already dirty). Zero once a resync completed.
	behindSince time.Time
}

// logLike is the subset of logr.Logger the link uses (eases testing).
type logLike interface {
	Info(msg string, kv ...any)
	Error(err error, msg string, kv ...any)
}

func newLink(v *Volume, s Spec, p *peer) *link {
	ctx, cancel := context.WithCancel(context.Background())
	l := &link{
		v: v, spec: s, peer: p.Peer, node: p.node, tr: p.tr, epoch: s.Epoch, ctx: ctx, cancel: cancel,
		done:    make(chan struct{}),
		changed: make(chan struct{}),
		log:     v.log.WithValues("peer", p.node, "peerAddress", p.Address, "epoch", s.Epoch),
	}
	l.space = sync.NewCond(&l.mu)
	l.work = sync.NewCond(&l.mu)
	if l.tr.Count() > 0 {
		// Owed from before this link: how long is not known, at least
		// this long.
		l.behindSince = v.opts.Clock.Now()
		l.holeLocked(0)
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
		return l.v.opts.Dial(ctx, l.peer.Address)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", l.peer.Address)
}

// session runs one connection: handshake, then stream until an error.
func (l *link) session() error {
	conn, err := l.dial()
	if err != nil {
		return fmt.Errorf("dial %s: %w", l.peer.Address, err)
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
	// Likewise: a peer change after this is a new change (peerGen), which
	// this session does not clear.
	peerChanged, peerGen, tracked := l.v.peerChangedState(l.node)
	ack, peerBitmap, err := l.handshake(conn, rd, bw)
	if err != nil {
		return err
	}
	// The tracker is about one member: a backup other than that one (an
	// address that leads elsewhere, a spec without a node) is a changed
	// peer for this session too, and does not clear the flag.
	otherPeer := len(tracked) > 0 && (ack.Node != l.node || !slices.Contains(tracked, ack.Node))
	// Journal the peer's diff before relying on it: if this side crashes
	// now, the merged regions must still be copied (invariant 3).
	merge := l.spec.MergesPeerBitmap() && peerBitmap != nil && !peerBitmap.IsEmpty()
	// The backup keeps what it wrote alone when its diff is not merged
	// (mergePrimaryBitmap false): it must know, to report those regions.
	unmerged := !l.spec.MergesPeerBitmap() && peerBitmap != nil && !peerBitmap.IsEmpty()
	full := fullCopyReason(ack, l.spec.PairUID, primaryZero, peerChanged || otherPeer)
	if full != "" {
		all := roaring.New()
		all.AddRange(0, uint64(l.tr.Regions()))
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
		l.tr.MarkRegions(peerBitmap)
	}
	if peerChanged && !otherPeer {
		// The tracker now durably owes this peer every region (the full
		// copy's, journaled above; a crash recovers them from the
		// journal, and only this peer's acks clear them), or both stores
		// hold only zeros: either way the bitmaps describe the
		// differences to this peer again, so later resyncs with it copy
		// only them. Until this write, every handshake copies everything.
		how := "journaled every region as owed to the peer"
		if full == "" {
			how = "both replicas hold only zeros"
		}
		if err := l.v.clearPeerChanged(peerGen, ack.Node, how); err != nil {
			return fmt.Errorf("record the full copy to %s: %w", ack.Node, err)
		}
	}
	total := l.tr.Bytes()
	l.log.Info("Replication link up", "peerDataState", ack.DataState, "peerDiffRegions", cardinality(peerBitmap),
		"merged", merge, "fullCopy", full != "", "fullCopyReason", full, "toCopyBytes", total,
		"payloadChecksums", !repl.HeaderChecksumAgreed(l.v.checksumScope(), ack.Checksum))

	l.mu.Lock()
	l.gen++
	gen := l.gen
	l.streaming = true
	l.nextSeq, l.applied, l.durable = 0, 0, 0
	l.gs, l.poppedSeq, l.poppedG, l.wm, l.wmSent, l.wmCleanSent = l.gs[:0], 0, 0, nil, nil, 0
	if merge || full != "" {
		// The member's data differs from ours where it wrote alone.
		l.holeLocked(0)
	}
	l.copies, l.copyBytes, l.copyDone = nil, 0, false
	l.cp = CopyStatus{Running: total > 0, TotalBytes: total, StartTime: l.v.opts.Clock.Now(), FullCopy: full != "", Reason: full}
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

	headerOnly := repl.HeaderChecksumAgreed(l.v.checksumScope(), ack.Checksum)
	rd.RequirePayloadChecksum(!headerOnly)
	errc := make(chan error, 3)
	var wg sync.WaitGroup
	wg.Add(3)
	fs := newFwdSession(l.ctx)
	go func() { defer wg.Done(); errc <- l.sender(gen, conn, bw, headerOnly) }()
	go func() { defer wg.Done(); errc <- l.receiver(gen, conn, rd, fs) }()
	go func() { defer wg.Done(); errc <- l.copier(gen) }()
	err = preferRefusal(<-errc, errc)
	l.teardown(gen)
	fs.end()
	conn.Close()
	wg.Wait()
	return err
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
		Size: l.v.size.Load(), RegionSize: l.v.opts.RegionSize, PairUID: l.spec.PairUID, Token: l.v.opts.token(),
		Checksum: l.v.checksumScope(),
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
		if bm.GetCardinality() > 0 && bm.Maximum() >= l.tr.Regions() {
			// A backup that grew before this primary and was itself a
			// primary at its new size may hold writes past our end: we
			// must grow before it can be served (the link retries).
			return ack, nil, fmt.Errorf("peer bitmap names region %d of a volume with %d regions (%d bytes): a larger backup holds writes past this member's end until it grows too", bm.Maximum(), l.tr.Regions(), l.v.size.Load())
		}
	}
	return ack, bm, nil
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
	l.tr.PeerLost()
	// The member misses every write from the oldest it did not durably
	// acknowledge (watermark.go).
	for _, e := range l.gs {
		if e.seq > l.durable {
			l.holeLocked(e.g)
			break
		}
	}
	l.gs, l.wm = l.gs[:0], nil
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

// inSync reports whether the peer holds everything: streaming, nothing dirty.
func (l *link) inSync() bool {
	l.mu.Lock()
	s := l.streaming
	l.mu.Unlock()
	return s && l.tr.Count() == 0
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
		st.oldest = l.v.opts.Clock.Since(l.sentAt[0].at)
	}
	if !l.behindSince.IsZero() {
		st.oldest = max(st.oldest, l.v.opts.Clock.Since(l.behindSince))
	}
	if st.copy.Running {
		el := l.v.opts.Clock.Since(st.copy.StartTime).Seconds()
		if el > 0 {
			st.copy.BytesPerSecond = int64(float64(st.copy.DoneBytes) / el)
		}
		if st.copy.BytesPerSecond > 0 {
			st.copy.ETASeconds = (st.copy.TotalBytes - st.copy.DoneBytes) / st.copy.BytesPerSecond
		}
	}
	return st
}

// checksumScope is what this replica asks of its links' data frames in the
// handshake (repl.Hello.Checksum).
func (v *Volume) checksumScope() string {
	if v.opts.PayloadChecksums {
		return repl.ChecksumPayload
	}
	return repl.ChecksumHeader
}
