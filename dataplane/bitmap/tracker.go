package bitmap

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/RoaringBitmap/roaring/v2"
)

// Tracker is the in-memory dirty bitmap of one replica: bit r is set when the
// peer may lack a write to region r. It is safe for concurrent use.
//
// A region becomes dirty in one of two ways:
//
//   - Mark(off, n, seq): a write that is being shipped to the peer as frame
//     seq. The bit is cleared by Acked once the peer has applied every frame
//     that wrote to the region, unless the region was also dirtied in the
//     second way meanwhile.
//   - MarkRegions/Or (and frames lost by PeerLost): the peer lacks the data and
//     no ack will ever say otherwise. Such a region is "sticky": only a
//     completed resync copy (CopyBegin/CopyDone) or Clear cleans it.
//
// Acked costs O(regions written by the acked frames): the Tracker keeps a FIFO
// of (seq, first region, last region) for frames in flight and, per region
// with a frame in flight, the highest seq that wrote it.
//
// The dirty set is sticky ∪ pending: a roaring bitmap of the sticky regions
// and a hash table of the regions with frames in flight. The write path (Mark,
// Acked) touches only the hash table and the FIFO, which stay as small as the
// replication window; the roaring bitmap changes only off the fast path.
type Tracker struct {
	// geoP is the volume's geometry; Grow replaces it (the size only).
	geoP atomic.Pointer[geometry]

	mu      sync.Mutex
	sticky  *roaring.Bitmap // dirty regions that no ack can clean
	pending seqTable        // region -> highest in-flight seq that wrote it
	queue   []inflight      // in-flight frames in seq order, from head
	head    int
	lastSeq uint64 // highest seq passed to Mark since New/PeerLost
	anySeq  bool   // lastSeq is meaningful
	copies  map[uint32]*copyState
	token   CopyToken
}

type inflight struct {
	seq         uint64
	first, last uint32
}

// CopyToken identifies one resync copy of one region, from CopyBegin to
// CopyDone. The zero token is never issued.
type CopyToken uint64

type copyState struct {
	token  CopyToken
	maxSeq uint64 // highest seq marked on the region since CopyBegin
	seqd   bool   // maxSeq is meaningful
	noSeq  bool   // the region was dirtied without a seq since CopyBegin
}

// NewTracker returns an empty Tracker for a volume of size bytes with one bit
// per regionSize bytes. It panics if the geometry is invalid (see
// ValidateGeometry); the last region may be shorter than regionSize.
func NewTracker(size, regionSize int64) *Tracker {
	g, err := newGeometry(size, regionSize, 0)
	if err != nil {
		panic(fmt.Sprintf("bitmap.NewTracker: %v", err))
	}
	t := &Tracker{
		sticky:  roaring.New(),
		pending: newSeqTable(),
		copies:  make(map[uint32]*copyState),
	}
	t.geoP.Store(&g)
	return t
}

func (t *Tracker) geo() *geometry { return t.geoP.Load() }

// Grow makes the Tracker cover a volume of size bytes, keeping its region
// size and every bit: the new regions start clean (the grown space reads as
// zeros on every member, so no member lacks it). Marks of the new regions
// are tracked once Grow returns; a size below the current one is refused.
// Safe while Marks and Acks run.
func (t *Tracker) Grow(size int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := t.geo()
	if size < cur.size {
		return fmt.Errorf("growing the dirty bitmap to %d bytes: it tracks %d, a volume never shrinks", size, cur.size)
	}
	g, err := newGeometry(size, cur.regionSize, 0)
	if err != nil {
		return fmt.Errorf("growing the dirty bitmap: %w", err)
	}
	t.geoP.Store(&g)
	return nil
}

// RegionSize is the number of bytes one bit stands for.
func (t *Tracker) RegionSize() int64 { return t.geo().regionSize }

// Regions is the number of regions (bits) of the volume.
func (t *Tracker) Regions() uint32 { return t.geo().regions }

// Size is the volume size in bytes.
func (t *Tracker) Size() int64 { return t.geo().size }

// RegionRange returns the first and last (inclusive) regions touched by the
// byte range [off, off+n), clamped to the volume. ok is false when the range
// is empty (n <= 0) or lies entirely outside the volume (off < 0 or
// off >= size); first and last are then meaningless.
func (t *Tracker) RegionRange(off, n int64) (first, last uint32, ok bool) {
	return t.geo().regionRange(off, n)
}

// Mark records a write of [off, off+n) that will be shipped to the peer as
// frame seq: it sets the regions' bits and remembers, per region, the highest
// seq written to it. Ranges are clamped to the volume; an empty range is a
// no-op.
//
// seq must be strictly greater than every seq passed to Mark since the
// Tracker was created or PeerLost was last called. A seq that violates this
// cannot be tracked by ack, so its regions are marked sticky instead (as if by
// MarkRegions): the Tracker over-reports rather than under-reports.
func (t *Tracker) Mark(off, n int64, seq uint64) {
	first, last, ok := t.geo().regionRange(off, n)
	if !ok {
		return
	}
	t.mu.Lock()
	if t.anySeq && seq <= t.lastSeq {
		t.markStickyRange(first, last)
		t.mu.Unlock()
		return
	}
	t.lastSeq, t.anySeq = seq, true
	for r := first; ; r++ {
		t.pending.set(r, seq)
		if r == last {
			break
		}
	}
	t.queue = append(t.queue, inflight{seq: seq, first: first, last: last})
	if len(t.copies) != 0 {
		t.forCopies(first, last, func(c *copyState) { c.maxSeq, c.seqd = seq, true })
	}
	t.mu.Unlock()
}

// forCopies calls fn for each copy in progress on a region in [first, last],
// iterating whichever is smaller: the range or the copies. t.mu must be held.
func (t *Tracker) forCopies(first, last uint32, fn func(c *copyState)) {
	if len(t.copies) == 0 {
		return
	}
	if uint64(len(t.copies)) < uint64(last-first)+1 {
		for r, c := range t.copies {
			if r >= first && r <= last {
				fn(c)
			}
		}
		return
	}
	for r := first; ; r++ {
		if c := t.copies[r]; c != nil {
			fn(c)
		}
		if r == last {
			return
		}
	}
}

// markStickyRange sets [first, last] dirty and sticky. t.mu must be held.
func (t *Tracker) markStickyRange(first, last uint32) {
	t.sticky.AddRange(uint64(first), uint64(last)+1)
	t.forCopies(first, last, func(c *copyState) { c.noSeq = true })
}

// MarkRegions sets the bits of b without a seq: writes made while the peer is
// away, or a peer's bitmap merged in for resync. Such bits are sticky: Acked
// never clears them, only a completed copy (CopyDone) or Clear does. Bits at
// or beyond Regions() are ignored.
func (t *Tracker) MarkRegions(b *roaring.Bitmap) {
	if b == nil || b.IsEmpty() {
		return
	}
	if b.Maximum() >= t.geo().regions {
		b = b.Clone()
		b.RemoveRange(uint64(t.geo().regions), 1<<32)
	}
	t.mu.Lock()
	t.sticky.Or(b)
	for r, c := range t.copies {
		if b.Contains(r) {
			c.noSeq = true
		}
	}
	t.mu.Unlock()
}

// Or merges b into the bitmap. It is MarkRegions under the name resync code
// uses for "OR of both sides' bitmaps".
func (t *Tracker) Or(b *roaring.Bitmap) { t.MarkRegions(b) }

// Acked records that the peer has durably applied every frame with
// seq <= upTo (acks are cumulative and the link is ordered). Each region
// written by those frames is cleared if no later frame in flight wrote it and
// it is not sticky. The cost is proportional to the regions written by the
// newly acked frames.
func (t *Tracker) Acked(upTo uint64) {
	t.mu.Lock()
	q := t.queue
	h := t.head
	for h < len(q) && q[h].seq <= upTo {
		p := q[h]
		h++
		for r := p.first; ; r++ {
			t.pending.deleteIfAtMost(r, upTo)
			if r == p.last {
				break
			}
		}
	}
	switch {
	case h == len(q):
		t.queue, t.head = q[:0], 0
		t.pending.maybeShrink()
	case h > 1024 && h > len(q)/2:
		n := copy(q, q[h:])
		t.queue, t.head = q[:n], 0
	default:
		t.head = h
	}
	t.mu.Unlock()
}

// PeerLost records that the link dropped: frames in flight will never be
// acked. Their regions stay dirty and become sticky, pending seqs are
// forgotten, copies in progress are invalidated (their CopyDone returns
// false), and seq numbering may restart.
func (t *Tracker) PeerLost() {
	t.mu.Lock()
	t.pending.forEach(func(r uint32, _ uint64) { t.sticky.Add(r) })
	t.pending.reset()
	t.queue, t.head = t.queue[:0], 0
	t.lastSeq, t.anySeq = 0, false
	clear(t.copies)
	t.mu.Unlock()
}

// CopyBegin starts a resync copy of region r: call it before reading the
// region's data to send to the peer. The returned token is passed to
// CopyDone. A newer CopyBegin of the same region invalidates older tokens.
// It returns the zero token for a region outside the volume.
func (t *Tracker) CopyBegin(r uint32) CopyToken {
	if r >= t.geo().regions {
		return 0
	}
	t.mu.Lock()
	t.token++
	tok := t.token
	t.copies[r] = &copyState{token: tok}
	t.mu.Unlock()
	return tok
}

// CopyDone ends the copy of region r started by CopyBegin: the peer has
// durably applied the copied data, and ackedSeq is the highest frame seq the
// peer has acknowledged. The region's sticky state is cleared only if no
// region write without a seq happened since CopyBegin and every write marked
// on the region since CopyBegin has seq <= ackedSeq; otherwise the copy may
// be stale and the region stays dirty for another copy. Writes marked before
// CopyBegin and still unacked keep the bit set until Acked covers them (the
// copy read their data, but only their ack proves the peer did not lose
// them).
//
// CopyDone reports whether the region is clean afterwards. A stale token (a
// newer CopyBegin, PeerLost or Clear happened since) returns false and changes
// nothing.
func (t *Tracker) CopyDone(r uint32, tok CopyToken, ackedSeq uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.copies[r]
	if c == nil || tok == 0 || c.token != tok {
		return false
	}
	delete(t.copies, r)
	if c.noSeq || (c.seqd && c.maxSeq > ackedSeq) {
		return false
	}
	t.sticky.Remove(r)
	if s, ok := t.pending.get(r); ok {
		if s > ackedSeq {
			return false // Acked clears it once the in-flight write is acked.
		}
		t.pending.delete(r)
	}
	return true
}

// Dirty returns a copy of the dirty bitmap.
func (t *Tracker) Dirty() *roaring.Bitmap {
	t.mu.Lock()
	defer t.mu.Unlock()
	d := t.sticky.Clone()
	if t.pending.len() > 0 {
		rs := make([]uint32, 0, t.pending.len())
		t.pending.forEach(func(r uint32, _ uint64) { rs = append(rs, r) })
		slices.Sort(rs)
		d.AddMany(rs)
	}
	return d
}

// IsDirty reports whether region r's bit is set.
func (t *Tracker) IsDirty(r uint32) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.isDirtyLocked(r)
}

func (t *Tracker) isDirtyLocked(r uint32) bool {
	return t.pending.has(r) || t.sticky.Contains(r)
}

// Count is the number of dirty regions.
func (t *Tracker) Count() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.countLocked()
}

func (t *Tracker) countLocked() uint64 {
	n := t.sticky.GetCardinality()
	t.pending.forEach(func(r uint32, _ uint64) {
		if !t.sticky.Contains(r) {
			n++
		}
	})
	return n
}

// Bytes is the number of volume bytes in dirty regions; the last region
// counts only its bytes inside the volume.
func (t *Tracker) Bytes() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.bytesLocked()
}

func (t *Tracker) bytesLocked() int64 {
	n := int64(t.countLocked()) * t.geo().regionSize
	if t.isDirtyLocked(t.geo().regions - 1) {
		n -= t.geo().lastRegionShort()
	}
	return n
}

// InFlight is the number of regions with a write in flight (marked with a
// seq and not yet acked).
func (t *Tracker) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending.len()
}

// Clear forgets every dirty region except those with a write still in
// flight: their bits stay set until Acked (or become sticky on PeerLost),
// since clearing them could under-report. Use it when the peer has been
// brought fully in sync by other means (a completed full resync). Copies in
// progress are invalidated.
func (t *Tracker) Clear() {
	t.mu.Lock()
	t.sticky.Clear()
	clear(t.copies)
	t.mu.Unlock()
}
