package volume

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"golang.org/x/time/rate"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/repl"
)

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

// fullCopyReason says why the backup of pair uid must receive the whole
// volume, or "" when a copy of the diffs is enough: the backup lost its
// bitmaps or its own tracked another member (it asks, ack.FullCopy); this
// primary's bitmaps track another member than the backup (peerChanged: a
// member was replaced); or the backup does not hold this pair's data (new,
// wiped, another pair's). Both stores holding only zeros (ack.Zero and
// primaryZero) are identical: that needs no copy, whatever the bitmaps
// track (a replaced member's bitmaps included), but it does not override
// the backup's own request.
func fullCopyReason(ack HelloAck, uid string, primaryZero, peerChanged bool) string {
	bothZero := ack.Zero && primaryZero
	switch {
	case ack.FullCopy:
		return "the replica on " + ack.Node + " lost its data or its bitmaps, or they track another member"
	case peerChanged && !bothZero:
		return "this replica's bitmaps track another member than " + ack.Node + " (a member was replaced): copying everything"
	case peerHolds(ack, uid):
		return ""
	case bothZero:
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

// journalRegions durably marks the extents of the given regions, run by
// run: a full copy's 2^32-1 regions are one Mark, not a step per region
// (which took longer than the peer waits for a frame).
func (l *link) journalRegions(b *roaring.Bitmap) error {
	rs := l.v.opts.RegionSize
	err := bitmap.ForEachRun(b, func(first, last uint32) error {
		off := int64(first) * rs
		end := min((int64(last)+1)*rs, l.v.size.Load())
		return l.v.journal.Mark(l.ctx, off, end-off)
	})
	if err != nil {
		return fmt.Errorf("journal peer bitmap: %w", err)
	}
	return nil
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

		sticky := l.tr.Sticky()
		if sticky.IsEmpty() || pending > 0 {
			if sticky.IsEmpty() && pending == 0 {
				l.mu.Lock()
				if l.gen == gen && !l.copyDone {
					l.enqueueLocked(repl.Frame{Type: repl.TypeCopyDone, Flags: repl.FlagDurableAck}, nil, 0)
					l.copyDone = true
					// The member holds every write but the ones not
					// durable yet (watermark.go), unless regions were
					// marked for it again since the check above (they
					// set a hole after marking).
					if l.tr.StickyCount() == 0 {
						l.holeG = 0
					}
					// The peer holds every write but those in sentAt.
					l.behindSince = time.Time{}
					// In sync: a later loss of the peer needs a new
					// Outdated record before the writer continues alone.
					l.v.clearAlone(l.node)
					if l.cp.Running {
						l.cp.Running = false
						l.log.Info("Resync complete", "copiedBytes", l.cp.DoneBytes, "seconds", l.v.opts.Clock.Since(l.cp.StartTime).Seconds())
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
			now := l.v.opts.Clock.Now()
			l.noteBehindLocked(now)
			l.cp = CopyStatus{Running: true, TotalBytes: int64(sticky.GetCardinality()) * rs, StartTime: now}
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
				size := min(rs, l.v.size.Load()-off)
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
			tok = l.tr.CopyBegin(r)
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
		multi := l.multi.Load()
		if multi {
			// Ordered with the client writes fanned out (watermark.go).
			l.v.fanMu.Lock()
		}
		l.mu.Lock()
		if l.gen != gen {
			l.mu.Unlock()
			if multi {
				l.v.fanMu.Unlock()
			}
			locked.unlock()
			putBuf(buf)
			return errors.New("connection generation ended")
		}
		seq := l.enqueueLocked(f, buf, int64(len(f.Payload)))
		if multi {
			l.noteGLocked(seq, l.v.gseq.Load())
		}
		rec := copyRec{seq: seq, region: r, tok: tok, bytes: n, last: last}
		if last {
			rec.regionBytes = size
		}
		l.copies = append(l.copies, rec)
		l.copyBytes += n
		l.mu.Unlock()
		if multi {
			l.v.fanMu.Unlock()
		}
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
