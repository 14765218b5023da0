package bitmap

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// markAheadBytes is how far past a sequential writer's extent Mark reaches.
const markAheadBytes = 64 << 20

// Mark durably records that writes to [off, off+n) may be unacknowledged to
// the peer: when it returns nil, every extent touching the range is in the
// log (or a checkpoint) and survives a crash. Call it before issuing the local
// write, and acknowledge the write only after both are done; see the package
// documentation for its ordering against Tracker updates and Checkpoint.
//
// If every extent is already marked since the last checkpoint, Mark returns
// immediately without locking or I/O. Otherwise the extents join the next
// group commit (one append and one fdatasync for all concurrent callers) and
// Mark waits for it, or for ctx. A write of n == 0 is a no-op; a range outside
// the volume is an error. Once a log append fails, every later Mark fails.
func (j *Journal) Mark(ctx context.Context, off, n int64) error {
	if n == 0 {
		return nil
	}
	if off < 0 || n < 0 || off >= j.geo().size || n > j.geo().size-off {
		return fmt.Errorf("marking [%d, %d+%d): outside the volume of %d bytes", off, off, n, j.geo().size)
	}
	first, last, _ := j.geo().extentRange(off, n)
	if set := j.set.Load(); set.hasRange(first, last) {
		j.noteUsed(first, last)
		j.fastMarks.add(first)
		// A sequential writer (the extent before is marked too) with less
		// than half the read-ahead window marked in front of it: mark the
		// window now, without waiting, so it never stalls on a commit.
		if j.keepHot.Load() && first > 0 && set.has(first-1) {
			if h := last + max(1, j.aheadExtents()/2); h < j.geo().extents && !set.has(h) {
				j.markAhead(last)
			}
		}
		return nil
	}

	j.mu.Lock()
	for j.err != nil && !j.closing {
		// The log failed. Fail at once (the caller must not acknowledge
		// the write) unless it is time to try a new log.
		if err := j.err; j.reopening || time.Now().Before(j.retryAt) {
			j.mu.Unlock()
			return fmt.Errorf("marking extents %d-%d: %w", first, last, err)
		}
		j.reopening = true
		j.mu.Unlock()
		err := j.reopenLog()
		j.mu.Lock()
		j.reopening = false
		if err != nil {
			j.mu.Unlock()
			return fmt.Errorf("marking extents %d-%d: %w", first, last, err)
		}
	}
	if j.closing {
		j.mu.Unlock()
		return ErrClosed
	}
	set := j.set.Load()
	// Extents already in the batch being written need only that commit;
	// the others join the next one (which the flusher writes after it).
	// The unmarked extents are taken run by run, so marking a whole volume
	// (a full copy's regions) costs a word per 64 extents, not a step each.
	wait := (*batch)(nil)
	for e := uint64(first); e <= uint64(last); {
		c := set.nextClear(e, uint64(last))
		if c > uint64(last) {
			break
		}
		end := set.nextSet(c, uint64(last)) // [c, end) unmarked
		add := roaring.New()
		add.AddRange(c, end)
		if j.inflight != nil && j.inflight.ext.IntersectsWithInterval(c, end) {
			if wait == nil {
				wait = j.inflight
			}
			add.AndNot(j.inflight.ext)
		}
		if !add.IsEmpty() {
			if j.pending == nil {
				j.pending = &batch{ext: roaring.New(), done: make(chan struct{})}
			}
			j.pending.ext.Or(add)
			wait = j.pending
		}
		e = end
	}
	if wait == nil { // became durable while we took the lock
		j.mu.Unlock()
		j.noteUsed(first, last)
		j.fastMarks.add(first)
		return nil
	}
	// A write entering an unmarked extent at its start right after a marked
	// one is likely sequential: mark the next extents in the same commit.
	if wait == j.pending && j.keepHot.Load() && first > 0 && set.has(first-1) && off-int64(first)<<j.geo().extentShift < j.geo().extentSize/4 {
		j.addAheadLocked(set, last)
	}
	b := wait
	j.cond.Broadcast()
	j.mu.Unlock()
	j.batched.Add(1)
	j.noteUsed(first, last)

	select {
	case <-b.done:
		if b.err != nil {
			return fmt.Errorf("marking extents %d-%d: %w", first, last, b.err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("marking extents %d-%d: waiting for the intent log: %w", first, last, ctx.Err())
	}
}

// aheadExtents is the read-ahead window in extents: markAheadBytes, but at
// most 1/64 of the volume (and at least one extent), so that the
// over-report after a crash stays small on small volumes.
func (j *Journal) aheadExtents() uint32 {
	return uint32(max(1, min(markAheadBytes, j.geo().size/64)>>j.geo().extentShift))
}

// markAhead queues the extents after last for the next group commit without
// waiting for it (KeepHot's read-ahead for sequential writers).
func (j *Journal) markAhead(last uint32) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closing || j.err != nil {
		return
	}
	if j.addAheadLocked(j.set.Load(), last) {
		j.cond.Broadcast()
	}
}

// addAheadLocked adds up to markAheadBytes of extents after last that are
// neither marked nor being written to the pending batch; j.mu held.
func (j *Journal) addAheadLocked(set *extSet, last uint32) bool {
	ahead := j.aheadExtents()
	added := false
	for e := last + 1; e <= last+ahead && e < j.geo().extents; e++ {
		if set.has(e) || (j.inflight != nil && j.inflight.ext.Contains(e)) || (j.pending != nil && j.pending.ext.Contains(e)) {
			continue
		}
		if j.pending == nil {
			j.pending = &batch{ext: roaring.New(), done: make(chan struct{})}
		}
		j.pending.ext.Add(e)
		j.ahead.Add(1)
		added = true
	}
	return added
}

// noteUsed records that [first, last] is being written in this generation,
// for KeepHot. Losing a note to a concurrent rotation only costs a re-mark.
func (j *Journal) noteUsed(first, last uint32) {
	if !j.keepHot.Load() {
		return
	}
	j.used.Load().addRange(first, last)
}

// flusher performs group commits: it takes every pending extent, appends
// them as one record and fdatasyncs, then wakes the waiting Marks.
func (j *Journal) flusher() {
	defer close(j.flusherDone)
	j.mu.Lock()
	defer j.mu.Unlock()
	for {
		for (j.pending == nil || j.swapping) && !j.closing {
			j.cond.Wait()
		}
		if j.pending == nil {
			return // closing, nothing left to flush
		}
		b := j.pending
		j.pending = nil
		if j.err != nil {
			b.err = j.err
			close(b.done)
			continue
		}
		j.flushing = true
		j.inflight = b
		f, gen, off, set := j.f, j.gen, j.off, j.set.Load()
		j.mu.Unlock()

		n, err := j.appendBatch(f, gen, off, b.ext)
		if err == nil {
			_ = ForEachRun(b.ext, func(first, last uint32) error { set.addRange(first, last); return nil })
		}

		j.mu.Lock()
		j.flushing = false
		j.inflight = nil
		if err != nil {
			// The log cannot be trusted any more (after a failed fsync
			// not even its page cache): no more appends to it. Marks of
			// new extents fail until a new log is opened.
			j.failLocked(fmt.Errorf("appending to %s: %w", logName(gen), err))
			j.log.Error(err, "bitmap intent log append failed; new extents cannot be marked until the log is reopened",
				"dir", j.dir, "generation", gen, "retryIn", j.retryDelay.String())
			err = j.err
		} else {
			j.off += int64(n)
		}
		b.err = err
		close(b.done)
		j.cond.Broadcast()
	}
}

// appendBatch writes the extents of b at off as one record (or several, for
// a batch too large for one) and fdatasyncs.
func (j *Journal) appendBatch(f *os.File, gen uint64, off int64, ext *roaring.Bitmap) (int, error) {
	runs := make([]extentRun, 0, 8)
	_ = ForEachRun(ext, func(first, last uint32) error {
		runs = append(runs, extentRun{first: first, n: last - first + 1})
		return nil
	})
	var rec []byte
	for len(runs) > 0 {
		k := min(len(runs), maxRunsPerRecord)
		rec = appendRecord(rec, gen, runs[:k])
		runs = runs[k:]
	}
	if err := j.fault(FaultAppend); err != nil {
		return 0, err
	}
	if _, err := f.WriteAt(rec, off); err != nil {
		return 0, err
	}
	if j.beforeSync != nil {
		j.beforeSync()
	}
	if err := j.fault(FaultSync); err != nil {
		return 0, fmt.Errorf("fdatasync: %w", err)
	}
	if err := fsutil.Fdatasync(f); err != nil {
		return 0, err
	}
	j.fsyncs.Add(1)
	j.records.Add(1)
	j.bytes.Add(uint64(len(rec)))
	return len(rec), nil
}
