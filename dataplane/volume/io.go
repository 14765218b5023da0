package volume

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/dataplane/repl"
)

// regionLocks serialise the local write and the queueing of its frame for
// writes (and resync copies) touching the same regions. Regions map onto a
// fixed number of stripes; a range locks its stripes in ascending order.
type regionLocks struct {
	shift   uint
	stripes [256]sync.Mutex
}

func (l *regionLocks) init(regionSize int64) {
	for s := uint(0); s < 63; s++ {
		if int64(1)<<s == regionSize {
			l.shift = s
			return
		}
	}
	panic(fmt.Sprintf("region size %d is not a power of two", regionSize))
}

// held is a set of locked stripes, returned by lock; unlock releases them.
// It is a value (four words), so locking allocates nothing.
type held struct {
	l    *regionLocks
	bits [len(regionLocks{}.stripes) / 64]uint64
}

// lock locks the stripes of [off, off+n) in ascending order.
func (l *regionLocks) lock(off, n int64) held {
	h := held{l: l}
	first := off >> l.shift
	last := (off + max(n, 1) - 1) >> l.shift
	if last-first >= int64(len(l.stripes))-1 {
		for i := range h.bits {
			h.bits[i] = ^uint64(0)
		}
	} else {
		for r := first; r <= last; r++ {
			s := r % int64(len(l.stripes))
			h.bits[s>>6] |= 1 << (s & 63)
		}
	}
	for w, b := range h.bits {
		for b != 0 {
			i := bits.TrailingZeros64(b)
			l.stripes[w*64+i].Lock()
			b &= b - 1
		}
	}
	return h
}

func (h held) unlock() {
	for w, b := range h.bits {
		for b != 0 {
			i := bits.TrailingZeros64(b)
			h.l.stripes[w*64+i].Unlock()
			b &= b - 1
		}
	}
}

// opKind is a client operation that changes data.
type opKind uint8

const (
	opWrite opKind = iota
	opTrim
	opZero
)

func (k opKind) frameType() repl.Type {
	switch k {
	case opTrim:
		return repl.TypeTrim
	case opZero:
		return repl.TypeZero
	}
	return repl.TypeWrite
}

func (v *Volume) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > v.size.Load() || n > v.size.Load()-off {
		return fmt.Errorf("range [%d, +%d) outside the volume of %d bytes: %w", off, n, v.size.Load(), syscall.EINVAL)
	}
	return nil
}

// admit waits until a client write may start: the member is the writer and
// is not holding writes for a failback. It returns errForward when the member
// stopped being the writer while holding, so the write goes to the new
// writer instead.
func (v *Volume) admit(ctx context.Context) (*forwarder, error) {
	if err := v.awaitAuthority(ctx); err != nil {
		return nil, err
	}
	held := false // counted once in heldWrites
	for {
		v.mu.Lock()
		if v.fwd != nil {
			f := v.fwd
			v.mu.Unlock()
			if err := forwardable(ctx); err != nil {
				return nil, err
			}
			return f, nil
		}
		if err := v.writableLocked(); err != nil {
			v.mu.Unlock()
			return nil, err
		}
		if v.holdStart.IsZero() {
			v.inflight++
			v.mu.Unlock()
			return nil, nil
		}
		if !held {
			held = true
			v.heldWrites.Add(1)
		}
		ch := v.changed
		v.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("write held for failback: %w", ctx.Err())
		}
	}
}

// authorityWait bounds how long a request waits for a new writer's first
// grant of authority (ErrAuthorityPending) before it is refused.
const authorityWait = 10 * time.Second

// awaitAuthority returns once the member's authority is no longer pending
// (granted, refused, or still pending after authorityWait); the caller then
// checks writability as usual. It fails only when ctx ends.
func (v *Volume) awaitAuthority(ctx context.Context) error {
	var deadline time.Time
	for {
		v.mu.Lock()
		err := v.writableLocked()
		v.mu.Unlock()
		if err == nil || !errors.Is(err, ErrAuthorityPending) {
			return nil
		}
		if deadline.IsZero() {
			deadline = time.Now().Add(authorityWait)
		} else if time.Now().After(deadline) {
			return nil
		}
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("waiting for the writer's authority: %w", ctx.Err())
		}
	}
}

func (v *Volume) release() {
	v.mu.Lock()
	v.inflight--
	// A failback hold and Close wait for the last admitted write.
	if v.inflight == 0 && (!v.holdStart.IsZero() || v.closed) {
		v.notifyLocked()
	}
	v.mu.Unlock()
}

// ReadAt reads from the local copy. Only the writer serves reads, so a client
// never reads data older than what it wrote.
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	if err := v.awaitAuthority(ctx); err != nil {
		return err
	}
	for attempt := 1; ; attempt++ {
		v.mu.Lock()
		f := v.fwd
		if f == nil {
			break // v.mu held
		}
		v.mu.Unlock()
		if err := forwardable(ctx); err != nil {
			return err
		}
		err := f.read(ctx, p, off)
		if !v.reissue(ctx, err, attempt) {
			return err
		}
	}
	if err := v.writableLocked(); err != nil {
		v.mu.Unlock()
		return err
	}
	v.mu.Unlock()
	if _, err := v.store.ReadAt(p, off); err != nil {
		v.setError(err)
		return fmt.Errorf("reading %d bytes at %d: %w", len(p), off, err)
	}
	v.ctr.reads.Add(1)
	v.ctr.readBytes.Add(int64(len(p)))
	return nil
}

// WriteAt writes p at off; with fua the data is durable locally before
// return. In Sync mode it returns once the peer applied it too.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return v.submit(ctx, opWrite, p, off, int64(len(p)), fua)
}

// owned is a client write buffer the volume took from the NBD server
// (WriteAtTake): done gives it back. Whoever ends up holding it calls done
// exactly once: the link after sending the frame, else submit's caller.
type owned struct {
	buf  *[]byte
	done func(*[]byte)
}

// WriteAtTake is WriteAt for a buffer the caller hands over (it implements
// nbd.BufferTaker): the replication frame carries *buf itself instead of a
// copy, and done(buf) is called once nothing needs it any more.
func (v *Volume) WriteAtTake(ctx context.Context, buf *[]byte, done func(*[]byte), off int64, fua bool) error {
	o := owned{buf: buf, done: done}
	err := v.submitOwned(ctx, opWrite, *buf, off, int64(len(*buf)), fua, &o)
	if o.buf != nil { // not handed to the link
		o.done(o.buf)
	}
	return err
}

// Trim deallocates a range (reads return zeros afterwards).
func (v *Volume) Trim(ctx context.Context, off, n int64, fua bool) error {
	return v.submit(ctx, opTrim, nil, off, n, fua)
}

// WriteZeroes makes a range read as zeros.
func (v *Volume) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	return v.submit(ctx, opZero, nil, off, n, fua)
}

func (v *Volume) submit(ctx context.Context, kind opKind, p []byte, off, n int64, fua bool) error {
	return v.submitOwned(ctx, kind, p, off, n, fua, nil)
}

// submitOwned runs a client write. With own set, p is *own.buf and the link
// takes the buffer instead of copying it (then it clears own.buf).
func (v *Volume) submitOwned(ctx context.Context, kind opKind, p []byte, off, n int64, fua bool, own *owned) error {
	if err := v.checkRange(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	for attempt := 1; ; attempt++ {
		fwd, err := v.admit(ctx)
		if err != nil {
			return err
		}
		if fwd == nil {
			break
		}
		v.forwarded.Add(1)
		err = fwd.submit(ctx, kind, p, off, n, fua)
		if !v.reissue(ctx, err, attempt) {
			return err
		}
	}
	defer v.release()
	if err := v.clearZero(); err != nil {
		err = fmt.Errorf("write to a new replica: %w", err)
		v.setError(err)
		return err
	}

	// Write intent first: after a crash the extent is resynced even if the
	// peer never saw this write (invariant 3).
	v.ckpt.RLock()
	if err := v.journal.Mark(ctx, off, n); err != nil {
		// Nothing was written locally: there is nothing the peer could
		// lack, and the client gets an error, never an ack.
		v.ckpt.RUnlock()
		err = writeIntentError(off, n, err)
		v.setError(err)
		return err
	}
	locked := v.locks.lock(off, n)
	if err := v.applyLocal(kind, p, off, n); err != nil {
		// The store may have changed part of the range before failing (a
		// torn write), and no frame carries it to the peer: mark the
		// range for resync so the replicas cannot stay different with a
		// clean bitmap (invariant 3). Done under the region locks and
		// the checkpoint read lock, like the mark of an unqueued write.
		v.markAllHoled(off, n)
		locked.unlock()
		v.ckpt.RUnlock()
		v.setError(err)
		return err
	}
	// A region written whole is the same on both members once this write
	// is replicated or resynced: it is no longer unmerged.
	v.coveredUnmerged(off, n)
	v.mu.Lock()
	ps := v.peers
	v.mu.Unlock()
	// Every member gets the frame, or its tracker marks the range for the
	// resync. The client's buffer goes to the last link; the others copy
	// it, as the first to send it could give it back meanwhile.
	var inline [4]ticket
	tks := inline[:0]
	if len(ps) > len(inline) {
		tks = make([]ticket, 0, len(ps))
	}
	lastLink, links := -1, 0
	for i, pr := range ps {
		if pr.link != nil {
			lastLink = i
			links++
		}
	}
	// With several links, writes are numbered and queued on every link in
	// one order, for the watermarks (watermark.go).
	var g uint64
	if links > 1 {
		v.fanMu.Lock()
		g = v.gseq.Add(1)
	}
	for i, pr := range ps {
		var tk ticket
		queued := false
		if pr.link != nil {
			o := own
			if i != lastLink {
				o = nil
			}
			tk, queued = pr.link.enqueueClient(kind, p, off, n, fua, o, g)
		}
		if !queued {
			pr.tr.MarkRange(off, n)
			tk = ticket{}
		}
		tks = append(tks, tk)
	}
	if links > 1 {
		v.fanMu.Unlock()
	}
	locked.unlock()
	v.ckpt.RUnlock()

	if fua {
		if err := v.store.Sync(); err != nil {
			err = fmt.Errorf("FUA sync: %w", err)
			v.setError(err)
			return err
		}
	}
	v.ctr.writes.Add(1)
	v.ctr.writeBytes.Add(n)
	// Sync members acknowledge first (invariant 2); async ones never hold
	// the write beyond their queue bound.
	for i, pr := range ps {
		if pr.Mode != ModeSync {
			continue
		}
		if tks[i] != (ticket{}) && pr.link.waitApplied(ctx, tks[i], fua) {
			continue
		}
		if err := v.waitAlone(ctx, pr.node); err != nil {
			return err
		}
	}
	return v.stillWriter()
}

// stillWriter is checked before a write is acknowledged: a write admitted
// just before the authority lapsed (a stalled disk, a slow peer) must not be
// acknowledged after the member fenced itself, when the backup may already
// be writing (invariant 1). Its data stays local and unacknowledged.
func (v *Volume) stillWriter() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.writableLocked(); err != nil {
		return fmt.Errorf("write done locally but not acknowledged: %v: %w", err, syscall.EIO)
	}
	return nil
}

func (v *Volume) applyLocal(kind opKind, p []byte, off, n int64) error {
	var err error
	switch kind {
	case opWrite:
		_, err = v.store.WriteAt(p, off)
	case opTrim:
		err = v.store.Punch(off, n)
	case opZero:
		err = v.store.Zero(off, n)
	}
	if err != nil {
		return fmt.Errorf("local %v of [%d, +%d): %w", kind.frameType(), off, n, err)
	}
	return nil
}

// waitAlone holds a sync-mode write that member node did not confirm
// until the controller has recorded it as Outdated, or its link is back and
// in sync (then the resync carried the write to it).
func (v *Volume) waitAlone(ctx context.Context, node string) error {
	v.waitingAlone.Add(1)
	defer v.waitingAlone.Add(-1)
	logged := false
	for {
		v.mu.Lock()
		if v.alone[node] == v.epoch && v.role == RolePrimary {
			v.mu.Unlock()
			return nil
		}
		if v.closed || v.role != RolePrimary {
			v.mu.Unlock()
			return fmt.Errorf("sync write not confirmed by the peer and this member stopped being primary: %w", syscall.EIO)
		}
		// The member, or, if it is no longer one (it was replaced), every
		// current member: the write must reach one that is in sync, or the
		// controller must have recorded them Outdated.
		var waitFor []*peer
		if p := v.peerForLocked(node); p != nil {
			waitFor = []*peer{p}
		} else {
			for _, p := range v.peers {
				if v.alone[p.node] != v.epoch {
					waitFor = append(waitFor, p)
				}
			}
		}
		ch := v.changed
		v.mu.Unlock()
		inSync := len(waitFor) > 0
		for _, p := range waitFor {
			inSync = inSync && p.link != nil && p.link.inSync()
		}
		if inSync || len(waitFor) == 0 {
			return nil
		}
		if !logged {
			v.log.Info("Holding sync write until the peer is recorded Outdated", "peer", node)
			logged = true
		}
		select {
		case <-ch:
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("sync write held for peer outdating: %w", ctx.Err())
		}
	}
}

// Flush makes every completed write durable locally and on every Sync
// member.
func (v *Volume) Flush(ctx context.Context) error {
	if err := v.awaitAuthority(ctx); err != nil {
		return err
	}
	for attempt := 1; ; attempt++ {
		v.mu.Lock()
		f := v.fwd
		if f == nil {
			break // v.mu held
		}
		v.mu.Unlock()
		if err := forwardable(ctx); err != nil {
			return err
		}
		err := f.flush(ctx)
		if !v.reissue(ctx, err, attempt) {
			return err
		}
	}
	if err := v.writableLocked(); err != nil {
		v.mu.Unlock()
		return err
	}
	ps := v.peers
	v.mu.Unlock()
	v.ctr.flushes.Add(1)
	if err := v.store.Sync(); err != nil {
		err = fmt.Errorf("flush: %w", err)
		v.setError(err)
		return err
	}
	for _, p := range ps {
		if p.Mode != ModeSync {
			continue
		}
		if p.link != nil {
			if tk, ok := p.link.enqueueFlush(); ok && p.link.waitApplied(ctx, tk, true) {
				continue
			}
		}
		if err := v.waitAlone(ctx, p.node); err != nil {
			return err
		}
	}
	return nil
}
