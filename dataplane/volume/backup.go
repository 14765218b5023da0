package volume

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/store"
)

// backupSide is the backup's end of the replication stream: it applies the
// primary's frames in order and acknowledges them, cumulatively, as applied
// and as durable.
type backupSide struct {
	v     *Volume
	conn  net.Conn
	epoch uint64
	// pairUID is the pair the stream serves (the controller's, checked
	// against the primary's Hello).
	pairUID string
	// primary is the primary's node (its Hello); peerGen the replica's
	// peer change (Volume.peerGen) its HelloAck answered: a full copy that
	// completes clears the peerChanged flag only if the peer did not
	// change since.
	primary string
	peerGen uint64
	// tr is the tracker of the primary (this replica's own diff towards
	// it, sent in the HelloAck and cleared at ResyncBegin); nil when
	// several members are tracked and the primary is none of them (then
	// the HelloAck sent their union and asked for a full copy).
	tr *bitmap.Tracker
	// siblings are the trackers of the other members (watermark.go): the
	// frames this stream applies are marked in them until the primary's
	// watermarks clear them. When the stream stops they become sticky
	// (PeerLost): the next stream numbers its frames from 1 again.
	siblings []*bitmap.Tracker

	wmu sync.Mutex // serialises frames written to conn
	bw  *bufio.Writer

	applied atomic.Uint64
	durable atomic.Uint64
	// wantDurable is the seq of the last frame applied that asked for a
	// durable ack (FlagDurableAck).
	wantDurable atomic.Uint64
	// kick asks the syncer for a sync now (a FUA write or a Flush was
	// applied): the apply loop goes on with the next frames meanwhile.
	kick chan struct{}
	// quiet fires quietAfter after the apply loop last ran out of frames
	// to read (it is reset each time) and sends on quietKick: the stream
	// went quiet (a failback's hold, the end of a burst).
	quiet     *time.Timer
	quietKick chan struct{}
	alive     atomic.Bool
	done      chan struct{}
	once      sync.Once

	// emu is held across every effect of a frame on the replica (a store
	// write, a data-state change, the bitmap). stop sets stopped under it,
	// so once stop returns no effect of this stream is in progress and none
	// will start: frames still buffered from a primary that lost its role
	// are never applied after the member changed role or epoch (invariant 1),
	// nor after a newer stream from the same primary took over.
	emu     sync.Mutex
	stopped bool
	// fullCopy: the resync in progress copies the whole volume.
	fullCopy bool
	// primarySize is the primary's size (its Hello): at most ours, less
	// while the pair grows (backups first).
	primarySize int64

	fwd *fwdClient
}

// errStopped ends the apply loop of a stream that was stopped.
var errStopped = errors.New("replication stream stopped")

func (b *backupSide) connected() bool { return b.alive.Load() }

func (b *backupSide) close(reason error) {
	b.once.Do(func() {
		b.alive.Store(false)
		b.v.log.Info("Closing replication stream from the primary", "reason", reason.Error())
		b.conn.Close()
	})
}

// stop closes the stream and waits until no frame of it is being applied;
// none will be afterwards. The caller must not hold v.mu (an effect may
// need it).
func (b *backupSide) stop(reason error) {
	b.close(reason)
	b.emu.Lock()
	b.stopLocked()
	b.emu.Unlock()
}

// stopLocked marks the stream stopped and ends its seq numbering in the
// sibling trackers; b.emu held.
func (b *backupSide) stopLocked() {
	if b.stopped {
		return
	}
	b.stopped = true
	for _, t := range b.siblings {
		t.PeerLost()
	}
}

func (b *backupSide) send(f *repl.Frame) error {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	_ = b.conn.SetWriteDeadline(time.Now().Add(peerTimeout))
	if err := repl.WriteFrame(b.bw, f); err != nil {
		return err
	}
	return b.bw.Flush()
}

func (b *backupSide) ack() error {
	return b.send(&repl.Frame{Type: repl.TypeAck, Epoch: b.epoch, Seq: b.applied.Load(), Offset: b.durable.Load()})
}

// refuse answers a Hello with a Nack and closes the connection.
func refuse(conn net.Conn, epoch uint64, reason string) {
	bw := bufio.NewWriter(conn)
	_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_ = repl.WriteFrame(bw, &repl.Frame{Type: repl.TypeNack, Epoch: epoch, Payload: []byte(reason)})
	_ = bw.Flush()
	conn.Close()
}

// maxOwnBitmap is the largest own diff a backup sends in its handshake (a
// variable so that tests can make a small diff "too large").
var maxOwnBitmap = repl.MaxPayload

// ServePrimary takes over a connection whose Hello named this volume and
// serves it as the backup until it fails. br must be the buffered reader the
// Hello was read from. It returns when the stream ends.
func (v *Volume) ServePrimary(conn net.Conn, br *bufio.Reader, rd *repl.Reader, h repl.Hello) error {
	// Attaching a stream is ordered with Apply: a stream attaches to the
	// role and epoch it was checked against.
	v.applyMu.Lock()
	v.mu.Lock()
	var reason string
	switch {
	case v.closed:
		reason = "volume is closing"
	case v.role != RoleBackup:
		reason = fmt.Sprintf("member %s is %s at epoch %d, not a backup", v.opts.Node, v.role, v.epoch)
	case h.Epoch != v.epoch:
		reason = fmt.Sprintf("epoch mismatch: primary %s is at epoch %d, member %s at epoch %d", h.Node, h.Epoch, v.opts.Node, v.epoch)
	case v.spec.PeerNode != "" && h.Node != v.spec.PeerNode:
		reason = fmt.Sprintf("member %s expects its primary to be %s, not %s", v.opts.Node, v.spec.PeerNode, h.Node)
	case v.spec.PairUID != "" && h.PairUID != "" && h.PairUID != v.spec.PairUID:
		reason = fmt.Sprintf("pair mismatch: primary %s serves VolumePair uid %s, member %s belongs to uid %s", h.Node, h.PairUID, v.opts.Node, v.spec.PairUID)
	case h.RegionSize != v.opts.RegionSize:
		reason = fmt.Sprintf("geometry mismatch: primary has size %d region %d, backup size %d region %d", h.Size, h.RegionSize, v.size.Load(), v.opts.RegionSize)
	case h.Size > v.size.Load():
		// A backup grows before its primary (Grow): this one has not yet,
		// and could not hold the writes past its end. The link retries.
		reason = fmt.Sprintf("size mismatch: primary %s has size %d, backup %s only %d; the backup must grow first (a volume never shrinks)", h.Node, h.Size, v.opts.Node, v.size.Load())
	}
	if reason != "" {
		epoch := v.epoch
		v.mu.Unlock()
		v.applyMu.Unlock()
		v.ctr.rejected.Add(1)
		v.log.Info("Refused replication stream", "from", h.Node, "reason", reason)
		refuse(conn, epoch, reason)
		return errors.New(reason)
	}
	uid := v.spec.PairUID
	if uid == "" {
		uid = h.PairUID
	}
	gen, changed := v.changedPeers[h.Node]
	primaryTr := v.trackerForLocked(h.Node)
	var siblings []*bitmap.Tracker
	for _, t := range v.trackers {
		if t != primaryTr {
			siblings = append(siblings, t)
		}
	}
	b := &backupSide{v: v, conn: conn, epoch: v.epoch, pairUID: uid, primary: h.Node, primarySize: h.Size, peerGen: gen, tr: primaryTr, siblings: siblings,
		bw: bufio.NewWriterSize(conn, 64<<10), done: make(chan struct{}), kick: make(chan struct{}, 1),
		quietKick: make(chan struct{}, 1)}
	b.fwd = newFwdClient(b)
	old := v.backupConn
	v.backupConn = b
	// Our bitmaps say nothing of what this primary lacks or holds if they
	// were lost, or if they track another member than it: the peer
	// changed (peerChanged), or a spec without a peer node let another
	// primary than the one they track connect.
	fullCopy := v.bitmapsLost || changed || b.tr == nil || (len(v.tracked) > 0 && !slices.Contains(v.tracked, h.Node))
	ds := v.dataState
	joined, pairUID, zero := v.joined, v.pairUID, v.zero.Load()
	fwd := v.fwd
	v.notifyLocked()
	v.mu.Unlock()
	if old != nil {
		// Its buffered frames are older than what the new stream brings.
		old.stop(errors.New("replaced by a new stream from the primary"))
	}
	v.applyMu.Unlock()
	b.alive.Store(true)
	defer func() {
		b.stop(errors.New("stream ended"))
		close(b.done)
		b.fwd.fail(errStreamEnded)
		v.mu.Lock()
		if v.backupConn == b {
			v.backupConn = nil
		}
		v.notifyLocked()
		v.mu.Unlock()
	}()

	// Answer with our state and our own diff: writes this member acknowledged
	// as a primary that may never have reached the peer. A diff too large
	// for one frame is replaced by a request for a full copy, which the
	// HelloAck must carry (it is encoded after this decision).
	ownDiff := v.dirty()
	if b.tr != nil {
		ownDiff = b.tr.Dirty()
	}
	own, err := ownDiff.ToBytes()
	if err != nil {
		return fmt.Errorf("serialise own bitmap: %w", err)
	}
	if len(own) > maxOwnBitmap {
		fullCopy = true
		own = nil
	}
	ackPayload, _ := json.Marshal(HelloAck{Node: v.opts.Node, DataState: ds, FullCopy: fullCopy,
		Joined: joined, PairUID: pairUID, Zero: zero, Checksum: v.checksumScope()})
	// Data frames may come without payload checksums only if both sides
	// said so.
	rd.RequirePayloadChecksum(!repl.HeaderChecksumAgreed(v.checksumScope(), h.Checksum))
	if err := b.send(&repl.Frame{Type: repl.TypeHelloAck, Epoch: b.epoch, Payload: ackPayload}); err != nil {
		return fmt.Errorf("send HelloAck: %w", err)
	}
	if err := b.send(&repl.Frame{Type: repl.TypeBitmap, Epoch: b.epoch, Payload: own}); err != nil {
		return fmt.Errorf("send bitmap: %w", err)
	}
	// Forwarded requests may flow only after the handshake frames: the
	// primary reads HelloAck and Bitmap first.
	if fwd != nil {
		fwd.attach(b.fwd)
	}
	v.log.Info("Serving replication stream from the primary", "primary", h.Node, "epoch", b.epoch, "ownDiffRegions", ownDiff.GetCardinality())

	stopSync := make(chan struct{})
	defer close(stopSync)
	b.quiet = time.AfterFunc(time.Hour, func() {
		select {
		case b.quietKick <- struct{}{}:
		default:
		}
	})
	b.quiet.Stop()
	defer b.quiet.Stop()
	go b.syncer(stopSync)
	return b.apply(br, rd)
}

// syncer makes applied frames durable and reports it, so the primary can
// clear bits (and finish FUA writes, flushes and copies) without the apply
// loop stopping for an fdatasync. Every frame up to the applied seq read
// before the fdatasync was written before it, so the durable ack covers
// them. When it syncs (syncDue):
//
//   - at once when kicked, for a FUA write or a Flush;
//   - when a frame asked for a durable ack (the resync's CopyData and
//     CopyDone: the copy's window moves on durable acks): kicked once the
//     frames received so far are applied, or at the next tick;
//   - when the stream went quiet (no frame to read for quietAfter, or
//     none applied since the last tick), at most once per syncEvery: the
//     primary sees a burst's regions clean right after it, and a
//     failback's hold drains at once;
//   - under a steady stream of plain writes, at most lazySyncAfter after
//     the oldest write not yet durable. Those writes were acknowledged as
//     applied (what both modes promise without FUA), so nothing waits for
//     this sync but the primary's dirty bits; leaving the writeback to the
//     kernel meanwhile spares the disk rewrites of the same pages and
//     fdatasyncs that compete with the primary's (on one shared disk),
//     as the page cache does for a client of one replica.
func (b *backupSide) syncer(stop <-chan struct{}) {
	t := time.NewTicker(syncEvery)
	defer t.Stop()
	var lastApplied uint64 // applied at the previous tick
	var pendingSince, lastSync time.Time
	for {
		kicked, quietNow := false, false
		select {
		case <-stop:
			return
		case <-t.C:
		case <-b.kick:
			kicked = true
		case <-b.quietKick:
			quietNow = time.Since(lastSync) >= syncEvery
		}
		a := b.applied.Load()
		if a <= b.durable.Load() {
			lastApplied, pendingSince = a, time.Time{}
			continue
		}
		now := time.Now()
		if pendingSince.IsZero() {
			pendingSince = now
		}
		quiet := quietNow || a == lastApplied
		lastApplied = a
		if !syncDue(kicked, quiet, b.wantDurable.Load() > b.durable.Load(), now.Sub(pendingSince)) {
			continue
		}
		lastSync = now
		if err := b.v.store.Sync(); err != nil {
			// Tell the primary why, as the apply loop does for its errors.
			err = b.fail(fmt.Errorf("backup sync: %w", err))
			b.close(err)
			return
		}
		if a > b.durable.Load() {
			b.durable.Store(a)
		}
		pendingSince = time.Time{}
		if err := b.ack(); err != nil {
			b.close(err)
			return
		}
		// A backup never reads its data while it is one: the pages it
		// wrote are only a cost once durable. Left cached, they keep the
		// granularity of the writes that made them (the client's 4 KiB
		// writes, say), and later writes to the same range pay per page;
		// they also hold memory the backup's node could use. Dropped, the
		// next writes cache pages sized by themselves (analysis in
		// docs/benchmarks.md). A promoted backup reads from the disk.
		if err := store.DropCache(b.v.store); err != nil {
			b.v.log.V(1).Info("Could not drop the backup's cached pages", "error", err.Error())
		}
	}
}

// syncDue is the syncer's decision for applied frames not durable yet:
// kicked (a FUA write or a Flush), quiet (no frame to read for quietAfter,
// at most once per syncEvery, or none applied since the last tick), asked (a frame asked for a durable ack), pending (how long the
// oldest has waited, as the syncer saw it).
func syncDue(kicked, quiet, asked bool, pending time.Duration) bool {
	return kicked || quiet || asked || pending >= lazySyncAfter
}

// syncEvery is the syncer's tick: how late a quiet stream's or a copy's
// frames become durable.
const syncEvery = 20 * time.Millisecond

// quietAfter is how long the stream must bring nothing for the syncer to
// treat it as quiet.
const quietAfter = 2 * time.Millisecond

// lazySyncAfter bounds how long a plain write applied here stays not
// durable under a steady stream (the checkpoint interval's default): how
// stale the primary's dirty bits of this member get, and how much a resync
// after this member crashes may copy beyond what it lacks.
const lazySyncAfter = 5 * time.Second

func (b *backupSide) apply(br *bufio.Reader, rd *repl.Reader) error {
	v := b.v
	for {
		_ = b.conn.SetReadDeadline(time.Now().Add(peerTimeout))
		f, err := rd.Next()
		if err != nil {
			return fmt.Errorf("read from primary: %w", err)
		}
		if f.Epoch != b.epoch {
			v.ctr.rejected.Add(1)
			reason := fmt.Sprintf("frame %v at epoch %d refused by member %s at epoch %d", f.Type, f.Epoch, v.opts.Node, b.epoch)
			_ = b.send(&repl.Frame{Type: repl.TypeNack, Epoch: b.epoch, Seq: f.Seq, Payload: []byte(reason)})
			return errors.New(reason)
		}
		switch f.Type {
		case repl.TypePing:
			if err := b.send(&repl.Frame{Type: repl.TypePong, Epoch: b.epoch, Seq: f.Seq}); err != nil {
				return fmt.Errorf("send Pong: %w", err)
			}
			continue
		case repl.TypeFwdReply:
			b.fwd.deliver(f)
			continue
		case repl.TypeWatermark:
			// Not acknowledged; never applied once the stream stopped (the
			// trackers may serve this member's own links by then).
			b.emu.Lock()
			err := errStopped
			if !b.stopped {
				err = b.watermark(f)
			}
			b.emu.Unlock()
			if err != nil {
				v.ctr.rejected.Add(1)
				return err
			}
			continue
		}
		ackNow, err := b.effect(f)
		if err != nil {
			return err
		}
		if ackNow || br.Buffered() == 0 {
			if err := b.ack(); err != nil {
				return fmt.Errorf("send Ack: %w", err)
			}
		}
		if br.Buffered() == 0 {
			b.quiet.Reset(quietAfter)
		}
		if br.Buffered() == 0 && b.wantDurable.Load() > b.durable.Load() {
			// The resync's window moves on durable acks: sync what came
			// now rather than at the next tick.
			select {
			case b.kick <- struct{}{}:
			default:
			}
		}
	}
}

// effect applies one frame to the replica, under b.emu and only while the
// stream has not been stopped. It reports whether the frame must be acked
// at once (it was made durable inline).
func (b *backupSide) effect(f *repl.Frame) (bool, error) {
	v := b.v
	b.emu.Lock()
	defer b.emu.Unlock()
	if b.stopped {
		return false, errStopped
	}
	sync := f.Flags&repl.FlagFUA != 0
	switch f.Type {
	case repl.TypeWrite, repl.TypeCopyData, repl.TypeTrim, repl.TypeZero:
		if err := v.clearZero(); err != nil {
			return false, b.fail(fmt.Errorf("apply %v to a new replica: %w", f.Type, err))
		}
	}
	switch f.Type {
	case repl.TypeWrite, repl.TypeCopyData, repl.TypeTrim, repl.TypeZero:
		if err := b.checkRange(f); err != nil {
			return false, err
		}
		off, n := int64(f.Offset), int64(f.Length)
		do := func() error {
			var err error
			switch f.Type {
			case repl.TypeWrite, repl.TypeCopyData:
				_, err = v.store.WriteAt(f.Payload, off)
			case repl.TypeTrim:
				err = v.store.Punch(off, n)
			default:
				err = v.store.Zero(off, n)
			}
			if err != nil {
				return fmt.Errorf("apply %v at %d: %w", f.Type, f.Offset, err)
			}
			return nil
		}
		var err error
		if len(b.siblings) > 0 {
			err = b.markSiblings(off, n, f.Seq, do)
		} else {
			err = do()
		}
		if err != nil {
			return false, b.fail(err)
		}
		v.coveredUnmerged(off, n)
	case repl.TypeFlush:
		sync = true
	case repl.TypeResyncBegin:
		if f.Offset > 0 {
			if err := v.setDataState(Inconsistent); err != nil {
				return false, b.fail(err)
			}
		}
		// A full copy is of the primary's size, which may be below ours
		// (we grew first): past its end the primary holds zeros.
		b.fullCopy = int64(f.Offset) >= b.primarySize
		if b.fullCopy && v.size.Load() > b.primarySize {
			if err := v.store.Punch(b.primarySize, v.size.Load()-b.primarySize); err != nil {
				return false, b.fail(fmt.Errorf("zeroing past the primary's end for a full copy: %w", err))
			}
		}
		if f.Length&repl.ResyncUnmerged != 0 && b.tr != nil {
			// Our diff stays ours (second embodiment): remember it.
			if err := v.keepUnmerged(b.tr.Dirty()); err != nil {
				return false, b.fail(err)
			}
		}
		// The primary journaled our diff before sending this (or keeps
		// it unmerged): ours can go. Our trackers of other members stay:
		// they say where those may differ from what we held.
		if b.tr != nil {
			b.tr.Clear()
		}
		v.mu.Lock()
		v.bitmapsLost = false
		v.mu.Unlock()
		if err := v.checkpoint(); err != nil {
			return false, b.fail(err)
		}
	case repl.TypeCopyDone:
		sync = true
	default:
		v.ctr.rejected.Add(1)
		return false, fmt.Errorf("unexpected %v frame from the primary", f.Type)
	}
	// A FUA write or a Flush is made durable by the syncer, while the
	// loop applies the next frames; CopyDone needs it before UpToDate.
	kick := sync && f.Type != repl.TypeCopyDone
	if sync && !kick {
		if err := v.store.Sync(); err != nil {
			return false, b.fail(fmt.Errorf("sync for %v: %w", f.Type, err))
		}
	}
	if f.Type == repl.TypeCopyDone {
		// Everything the primary holds is here now: the replica holds
		// the pair's data.
		if b.fullCopy {
			v.clearUnmerged()
		}
		if err := v.flushUnmerged(); err != nil {
			return false, b.fail(err)
		}
		// A full copy also ends a peer change (peerChanged): this replica
		// now holds what the primary holds, and its bitmaps (cleared at
		// ResyncBegin) track the primary. Not earlier: from ResyncBegin
		// on, only the primary that journaled the full copy knows what
		// is still missing here; were the copy interrupted (a crash, a
		// lost connection, another replacement), the flag keeps asking
		// whoever connects next for the whole volume, as a replica not
		// joined yet does. Being Inconsistent during the copy is not
		// enough: a joined Inconsistent backup gets only the diffs.
		if err := v.completeCopy(b.pairUID, b.fullCopy, b.primary, b.peerGen); err != nil {
			return false, b.fail(err)
		}
	}
	v.ctr.framesApplied.Add(1)
	if f.Flags&repl.FlagDurableAck != 0 {
		b.wantDurable.Store(f.Seq)
	}
	b.applied.Store(f.Seq)
	if kick {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	} else if sync {
		b.durable.Store(f.Seq)
	}
	return sync && !kick, nil
}

func (b *backupSide) checkRange(f *repl.Frame) error {
	if err := b.v.checkRange(int64(f.Offset), int64(f.Length)); err != nil {
		b.v.ctr.rejected.Add(1)
		reason := fmt.Sprintf("%v frame %d: %v", f.Type, f.Seq, err)
		_ = b.send(&repl.Frame{Type: repl.TypeNack, Epoch: b.epoch, Seq: f.Seq, Payload: []byte(reason)})
		return errors.New(reason)
	}
	return nil
}

// fail reports a local I/O error to the primary and ends the stream.
func (b *backupSide) fail(err error) error {
	b.v.setError(err)
	_ = b.send(&repl.Frame{Type: repl.TypeNack, Epoch: b.epoch, Payload: []byte(err.Error())})
	return err
}
