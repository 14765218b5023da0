package volume

import (
	"context"
	"slices"
	"time"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/repl"
)

// Watermarks: what a backup knows of the other backups.
//
// A backup X of a writer W with other backups keeps a tracker per other
// member Y ("sibling"): the regions X applied that Y may lack. It marks
// every data frame it applies (journaled first, like a write) with the
// frame's seq in each sibling's tracker. W tells X, every
// watermarkInterval, up to which seq of X's link each Y durably holds
// every write the link carried (a Watermark frame), and X clears Y's
// tracker up to there; when every member holds everything W does, W says
// so (the frame's offset) and X clears its sibling trackers whole. When W
// is lost and X is promoted, its tracker of Y is what Y lacks from X; Y's
// own tracker of X, sent in its HelloAck, what X lacks from Y; the resync
// copies their OR, no full copy (invariant 5).
//
// W numbers its client writes (g, in the order they are queued on every
// link: v.fanMu) and keeps, per link, the g of every data frame the link
// carried that some sibling may still need to hear about (link.gs). A
// member Y holds every write up to durG(Y): the writes before the oldest
// one it did not durably acknowledge, and none from the first write it
// missed (its link was down or resyncing: link.holeG) until a resync
// completes. The watermark of Y on X's link is the last seq of X's link
// whose frames all carry a g at or below durG(Y).

// watermarkInterval is how often a writer with several backups sends
// watermarks.
const watermarkInterval = 100 * time.Millisecond

// gseq is one data frame a link carried: its seq on the link and the
// number of the last client write it reflects.
type gseq struct{ seq, g uint64 }

// watermarkLoop sends the watermarks while the volume is open.
func (v *Volume) watermarkLoop() {
	defer v.wg.Done()
	t := time.NewTicker(watermarkInterval)
	defer t.Stop()
	for {
		select {
		case <-v.stop:
			return
		case <-t.C:
			v.sendWatermarks()
		}
	}
}

// multiLinks returns the links of the current peers when there are two or
// more (a writer with several backups), else nil.
func multiLinks(ps []*peer) []*link {
	var out []*link
	for _, p := range ps {
		if p.link != nil {
			out = append(out, p.link)
		}
	}
	if len(out) < 2 {
		return nil
	}
	return out
}

// sendWatermarks computes every link's watermarks and hands them to its
// sender.
func (v *Volume) sendWatermarks() {
	v.mu.Lock()
	links := multiLinks(v.peers)
	// A member without a link (its address not known) lacks whatever it
	// lacks: the pair is not wholly in sync.
	clean := !slices.ContainsFunc(v.peers, func(p *peer) bool { return p.link == nil })
	v.mu.Unlock()
	if links == nil {
		return
	}
	// No write or copy is between links while the fan-out lock is held.
	v.fanMu.Lock()
	defer v.fanMu.Unlock()
	g := v.gseq.Load()
	dur := make([]uint64, len(links))
	holed := make([]bool, len(links))
	for i, l := range links {
		l.mu.Lock()
		dur[i], holed[i] = l.durGLocked(g)
		clean = clean && l.streaming && l.copyDone && l.applied >= l.nextSeq && l.durable >= l.nextSeq
		l.mu.Unlock()
		clean = clean && l.tr.Count() == 0
	}
	for i, x := range links {
		x.mu.Lock()
		entries := make([]repl.WatermarkEntry, 0, len(links)-1)
		floor := g // the lowest durG of the siblings still streaming
		for j, y := range links {
			if j == i {
				continue
			}
			entries = append(entries, repl.WatermarkEntry{Node: y.node, Seq: min(x.lookupLocked(dur[j]), x.applied)})
			if !holed[j] {
				floor = min(floor, dur[j])
			}
		}
		var cleanSeq uint64
		if clean {
			cleanSeq = x.nextSeq
		}
		x.setWatermarkLocked(entries, cleanSeq)
		x.popGsLocked(floor)
		x.mu.Unlock()
	}
}

// durGLocked is the last client write this link's member holds with every
// write before it (durG), and whether it misses a write (a hole: down,
// or resyncing); l.mu and v.fanMu held, g the last write numbered.
func (l *link) durGLocked(g uint64) (uint64, bool) {
	d := g
	// The oldest data frame not durable on the member.
	if i, _ := slices.BinarySearchFunc(l.gs, l.durable+1, func(e gseq, seq uint64) int {
		switch {
		case e.seq < seq:
			return -1
		case e.seq > seq:
			return 1
		}
		return 0
	}); i < len(l.gs) {
		d = min(d, l.gs[i].g-1)
	}
	if l.holeG > 0 {
		d = min(d, l.holeG-1)
	}
	return d, l.holeG > 0 || !l.streaming
}

// lookupLocked is the last seq of this link whose data frames (and every
// one before it) carry a g at or below d; 0 when it is not known (the
// frames were forgotten). l.mu held.
func (l *link) lookupLocked(d uint64) uint64 {
	var seq uint64
	if l.poppedG <= d {
		seq = l.poppedSeq
	}
	for _, e := range l.gs {
		if e.g > d {
			break
		}
		seq = e.seq
	}
	return seq
}

// popGsLocked forgets the data frames durable on this link's member whose
// writes every streaming sibling holds (g at or below floor). l.mu held.
func (l *link) popGsLocked(floor uint64) {
	n := 0
	for n < len(l.gs) && l.gs[n].seq <= l.durable && l.gs[n].g <= floor {
		n++
	}
	if n == 0 {
		return
	}
	l.poppedSeq, l.poppedG = l.gs[n-1].seq, l.gs[n-1].g
	l.gs = l.gs[:copy(l.gs, l.gs[n:])]
}

// noteGLocked records a data frame of seq carrying writes up to g; l.mu
// held.
func (l *link) noteGLocked(seq, g uint64) {
	if l.multi.Load() {
		l.gs = append(l.gs, gseq{seq: seq, g: g})
	}
}

// holeLocked records that the member misses write g (or, g 0, has missed
// writes since before any was numbered); l.mu held.
func (l *link) holeLocked(g uint64) {
	g = max(g, 1)
	if l.holeG == 0 || g < l.holeG {
		l.holeG = g
	}
}

// setWatermarkLocked queues a Watermark frame for the sender if it says
// more than the last one sent; l.mu held.
func (l *link) setWatermarkLocked(entries []repl.WatermarkEntry, clean uint64) {
	if !l.streaming || (slices.Equal(entries, l.wmSent) && clean == l.wmCleanSent) {
		return
	}
	l.wm = &repl.Frame{Type: repl.TypeWatermark, Epoch: l.epoch, Offset: clean, Payload: repl.AppendWatermark(nil, entries)}
	l.wmSent, l.wmCleanSent = entries, clean
	l.work.Signal()
}

// markSiblings journals [off, off+n), applied as frame seq of the primary's
// stream, and marks it in every sibling tracker: the other members may
// lack it until the primary's watermark says otherwise. A crash keeps the
// knowledge (invariant 3): the extent is journaled before the frame is
// applied.
func (b *backupSide) markSiblings(off, n int64, seq uint64, apply func() error) error {
	v := b.v
	v.ckpt.RLock()
	defer v.ckpt.RUnlock()
	if err := v.journal.Mark(context.Background(), off, n); err != nil {
		return writeIntentError(off, n, err)
	}
	if err := apply(); err != nil {
		// The store may hold part of it: the others may lack it.
		for _, t := range b.siblings {
			t.MarkRange(off, n)
		}
		return err
	}
	for _, t := range b.siblings {
		t.Mark(off, n, seq)
	}
	return nil
}

// watermark applies a Watermark frame: each sibling named holds every
// frame of this stream up to its seq; with the frame's offset set, every
// member holds everything up to that seq.
func (b *backupSide) watermark(f *repl.Frame) error {
	entries, err := repl.ParseWatermark(f.Payload)
	if err != nil {
		return err
	}
	v := b.v
	v.mu.Lock()
	byNode := make(map[string]*bitmap.Tracker, len(entries))
	for _, e := range entries {
		if t, ok := v.trackers[e.Node]; ok && t != b.tr {
			byNode[e.Node] = t
		}
	}
	v.mu.Unlock()
	for _, e := range entries {
		if t := byNode[e.Node]; t != nil {
			t.Acked(e.Seq)
		}
	}
	if f.Offset > 0 {
		for _, t := range b.siblings {
			t.Clear()
			t.Acked(f.Offset)
		}
	}
	return nil
}
