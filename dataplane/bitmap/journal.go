package bitmap

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// ErrClosed is returned by Journal methods called after Close.
var ErrClosed = errors.New("bitmap journal closed")

const (
	checkpointName = "checkpoint"
	checkpointTmp  = "checkpoint.tmp"
	lockName       = "LOCK"
	logPrefix      = "intent-"
	logSuffix      = ".log"
)

func logName(gen uint64) string { return fmt.Sprintf("%s%016x%s", logPrefix, gen, logSuffix) }

func parseLogName(name string) (uint64, bool) {
	hex, ok := strings.CutPrefix(name, logPrefix)
	if !ok {
		return 0, false
	}
	hex, ok = strings.CutSuffix(hex, logSuffix)
	if !ok || len(hex) != 16 {
		return 0, false
	}
	gen, err := strconv.ParseUint(hex, 16, 64)
	return gen, err == nil
}

// Retry timing after a failed log append: the first reopen of the log may be
// attempted minRetryDelay after the failure, and the delay doubles with every
// failed attempt up to maxRetryDelay.
const (
	minRetryDelay = 100 * time.Millisecond
	maxRetryDelay = 5 * time.Second
)

// FaultOp names a journal I/O operation, for a fault hook (SetFaultHook).
type FaultOp int

// The operations a fault hook can fail.
const (
	// FaultAppend is the pwrite of a group commit's record.
	FaultAppend FaultOp = iota
	// FaultSync is the fdatasync after a group commit.
	FaultSync
	// FaultCreateLog is writing and syncing a new log file.
	FaultCreateLog
	// FaultCheckpoint is writing and installing a checkpoint.
	FaultCheckpoint
)

func (o FaultOp) String() string {
	switch o {
	case FaultAppend:
		return "append"
	case FaultSync:
		return "sync"
	case FaultCreateLog:
		return "create-log"
	case FaultCheckpoint:
		return "checkpoint"
	}
	return fmt.Sprintf("FaultOp(%d)", int(o))
}

// JournalStats are cumulative counters of one open Journal.
type JournalStats struct {
	Marks           uint64 // Mark calls with a non-empty range
	FastMarks       uint64 // Marks that found their extents already durable (no I/O, no wait)
	Batched         uint64 // Marks that waited for a group commit
	Records         uint64 // log appends; each is one group commit followed by one fdatasync
	Fsyncs          uint64 // every fsync/fdatasync: log appends, new logs, checkpoints, directories
	Bytes           uint64 // bytes appended to logs by group commits
	Checkpoints     uint64 // checkpoints written, including the ones at open and close
	CheckpointBytes uint64 // size of the last checkpoint file
	Generation      uint64 // current log generation
	// Extents is the number of extents marked in the current generation,
	// including the hot ones carried over from the previous one.
	Extents uint64
	// Carried counts extents carried into new generations (KeepHot).
	Carried uint64
	// Ahead counts extents marked ahead of a sequential writer.
	Ahead uint64
	// RetiredExtents is the number of extents the last checkpoint covered
	// in full because their generation retired (its over-report).
	RetiredExtents uint64
	// Failures counts failed log appends and failed attempts to reopen the
	// log after one; Reopens counts the reopens that brought the journal
	// back (see Err).
	Failures, Reopens uint64
}

// Journal makes a replica's dirty bitmap survive crashes: a write-intent log
// of coarse extents plus periodic checkpoints of the full bitmap, in one
// directory. See the package documentation for the protocol and file format.
// All methods are safe for concurrent use.
type Journal struct {
	dir string
	geo geometry
	log logr.Logger

	lockF *os.File

	// set holds the extents durably marked in the current log generation;
	// Mark's fast path reads it without locking.
	set atomic.Pointer[extSet]
	// used holds the extents some Mark asked for in the current generation
	// (a subset of set once their Marks returned); with keepHot they are
	// carried into the next generation's log at a checkpoint.
	used    atomic.Pointer[extSet]
	keepHot atomic.Bool

	mu       sync.Mutex
	cond     sync.Cond // signals pending work, flush completion, swap completion
	gen      uint64    // current log generation
	f        *os.File  // current log
	off      int64     // append offset in f
	pending  *batch    // extents waiting for the next group commit
	flushing bool      // the flusher is writing a batch outside mu
	inflight *batch    // the batch being written while flushing
	swapping bool      // a checkpoint is switching generations; do not start a flush
	closing  bool
	// err is set while the journal is failed: a log append failed, so the
	// current log (and, after an fsync error, its page cache) cannot be
	// trusted any more. New extents cannot be marked until a new log is
	// opened: by a Mark once retryAt has passed (reopenLog), or by a
	// Checkpoint (rotate). retryDelay is the wait after the next failure.
	err        error
	retryAt    time.Time
	retryDelay time.Duration
	minRetry   time.Duration // retryDelay after a recovery: minRetryDelay (tests shorten it)
	reopening  bool          // a Mark is reopening the log

	flusherDone chan struct{}

	ckptMu sync.Mutex // serializes Checkpoint and Close
	// carry holds regions of retired log generations that no durable
	// checkpoint covers yet (after a failed checkpoint write).
	carry *roaring.Bitmap

	fastMarks                       stripedCounter
	batched, records, fsyncs, bytes atomic.Uint64
	checkpoints, checkpointBytes    atomic.Uint64
	carried, ahead, retired         atomic.Uint64
	failures, reopens               atomic.Uint64

	faultHook atomic.Pointer[func(FaultOp) error]

	// beforeSync, if set (tests only, before the flusher starts), runs before
	// each log fdatasync.
	beforeSync func()
}

type batch struct {
	ext  *roaring.Bitmap
	done chan struct{}
	err  error
}

// OpenJournal opens (creating if needed) the journal in dir for a volume of
// size bytes tracked in regionSize regions, with write-intent extents of
// extentSize bytes (0 means DefaultExtentSize, or regionSize if larger).
//
// It returns the recovered regions: the last checkpoint ∪ every region of
// every extent marked in the logs since. The caller merges them into its
// Tracker with MarkRegions. The recovered state is immediately written as a
// new checkpoint and the old logs are removed, so the returned bitmap is owned
// by the caller.
//
// A damaged journal yields an error wrapping ErrCorrupt (the bitmaps are lost:
// resync fully, then ResetJournal); a journal of different geometry yields
// ErrGeometry. A fresh directory recovers an empty bitmap.
func OpenJournal(dir string, size, regionSize, extentSize int64, log logr.Logger) (*Journal, *roaring.Bitmap, error) {
	if extentSize == 0 {
		extentSize = max(DefaultExtentSize, regionSize)
	}
	g, err := newGeometry(size, regionSize, extentSize)
	if err != nil {
		return nil, nil, fmt.Errorf("opening bitmap journal %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("opening bitmap journal: %w", err)
	}
	lockF, err := lockDir(filepath.Join(dir, lockName))
	if err != nil {
		return nil, nil, fmt.Errorf("opening bitmap journal %s: %w", dir, err)
	}
	j := &Journal{
		dir:         dir,
		geo:         g,
		log:         log,
		lockF:       lockF,
		carry:       roaring.New(),
		flusherDone: make(chan struct{}),
		retryDelay:  minRetryDelay,
		minRetry:    minRetryDelay,
	}
	j.cond.L = &j.mu
	j.set.Store(newExtSet(g.extents))
	j.used.Store(newExtSet(g.extents))

	recovered, lastGen, err := j.recover()
	if err != nil {
		lockF.Close()
		return nil, nil, fmt.Errorf("opening bitmap journal %s: %w", dir, err)
	}
	j.gen = lastGen
	if err := j.rotate(recovered.Clone(), false, false); err != nil {
		if j.f != nil {
			j.f.Close()
		}
		lockF.Close()
		return nil, nil, fmt.Errorf("opening bitmap journal %s: writing recovered checkpoint: %w", dir, err)
	}
	go j.flusher()
	return j, recovered, nil
}

// ResetJournal deletes the journal files in dir (after ErrCorrupt or
// ErrGeometry, once the caller has arranged a full resync). The journal must
// not be open.
func ResetJournal(dir string) error {
	lockF, err := lockDir(filepath.Join(dir, lockName))
	if err != nil {
		return fmt.Errorf("resetting bitmap journal %s: %w", dir, err)
	}
	defer lockF.Close()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("resetting bitmap journal: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if _, ok := parseLogName(name); ok || name == checkpointName || name == checkpointTmp {
			if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("resetting bitmap journal: %w", err)
			}
		}
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return fmt.Errorf("resetting bitmap journal %s: %w", dir, err)
	}
	return nil
}

// KeepHot makes checkpoints carry the extents written during the generation
// they retire into the new generation's log (written and fdatasynced with
// the new log, before any Mark uses it), like DRBD's activity log: an extent
// that keeps being written stays marked across checkpoints instead of costing
// a group commit after each one, and leaves the log one generation after its
// last write. Recovery is unchanged (checkpoint ∪ every extent of the logs it
// does not cover); it over-reports by the extents written during the last
// two generations instead of one. A sequential writer (a Mark whose extent
// and the one before are marked) keeps a window of 64 MiB (at most 1/64 of
// the volume) marked ahead of it, queued without waiting, so it does not
// stall on a group commit each time it enters a new extent; this
// over-reports by at most that window per sequential stream.
func (j *Journal) KeepHot(on bool) { j.keepHot.Store(on) }

// SetFaultHook makes fn run before every journal I/O operation of the kinds
// FaultOp names; a non-nil error fails that operation as if the disk had
// returned it, before it reaches the file. It is for fault-injection tests
// (a full disk is fn returning syscall.ENOSPC); nil removes the hook.
func (j *Journal) SetFaultHook(fn func(FaultOp) error) {
	if fn == nil {
		j.faultHook.Store(nil)
		return
	}
	j.faultHook.Store(&fn)
}

// fault runs the fault hook for op, if any.
func (j *Journal) fault(op FaultOp) error {
	if fn := j.faultHook.Load(); fn != nil {
		return (*fn)(op)
	}
	return nil
}

// Err returns why the journal cannot mark new extents now (a log append
// failed and no new log could be opened since), or nil when it can. While
// it is failed, Marks of extents not already marked fail; the journal
// reopens its log by itself on a Mark after a backoff, or on a Checkpoint,
// once the disk works again.
func (j *Journal) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// failLocked records a failure of the log (an append, or an attempt to
// reopen it) and schedules the next attempt; j.mu held.
func (j *Journal) failLocked(err error) {
	j.err = err
	j.retryAt = time.Now().Add(j.retryDelay)
	j.retryDelay = min(2*j.retryDelay, maxRetryDelay)
	j.failures.Add(1)
}

// recoveredLocked clears the failure once a new log is in use; j.mu held.
func (j *Journal) recoveredLocked(how string) {
	if j.err == nil {
		return
	}
	j.log.Info("bitmap intent log usable again", "dir", j.dir, "generation", j.gen, "by", how, "failedWith", j.err.Error())
	j.err = nil
	j.retryDelay = j.minRetry
	j.reopens.Add(1)
}

// reopenLog replaces a failed log: it creates log generation gen+1 (durably,
// like rotate's step 1) and appends there from now on. The failed log stays:
// the checkpoint on disk still needs it, and its extents stay in the marked
// set, so the next Checkpoint covers them before removing it. Its tail may
// hold a torn record from the failed append; nothing is ever appended after
// it, so recovery ignores it (a torn last record). No checkpoint is written:
// checkpoint G means "replay logs G, G+1, …", which now include gen+1.
func (j *Journal) reopenLog() error {
	j.ckptMu.Lock() // serializes generation changes with rotate
	defer j.ckptMu.Unlock()
	j.mu.Lock()
	if j.closing {
		j.mu.Unlock()
		return ErrClosed
	}
	if j.err == nil { // a Checkpoint reopened it meanwhile
		j.mu.Unlock()
		return nil
	}
	newGen := j.gen + 1
	j.mu.Unlock()

	nf, off, err := j.createLog(newGen, nil)

	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("reopening the intent log: %w", err)
		j.failLocked(err)
		return err
	}
	if j.closing {
		nf.Close()
		return ErrClosed
	}
	j.swapping = true
	for j.flushing {
		j.cond.Wait()
	}
	oldF := j.f
	j.f, j.gen, j.off = nf, newGen, off
	j.swapping = false
	j.recoveredLocked("reopen")
	j.cond.Broadcast()
	if oldF != nil {
		_ = oldF.Close()
	}
	return nil
}

// markAheadBytes is how far past a sequential writer's extent Mark reaches.
const markAheadBytes = 64 << 20

// recover reads the checkpoint and the logs it does not cover. It returns the
// recovered regions and the highest log generation present.
func (j *Journal) recover() (*roaring.Bitmap, uint64, error) {
	if err := os.Remove(filepath.Join(j.dir, checkpointTmp)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fmt.Errorf("removing stale temporary checkpoint: %w", err)
	}
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, 0, fmt.Errorf("listing journal: %w", err)
	}
	var gens []uint64
	for _, e := range entries {
		if gen, ok := parseLogName(e.Name()); ok && e.Type().IsRegular() {
			gens = append(gens, gen)
		}
	}
	slices.Sort(gens)
	var maxGen uint64
	if len(gens) > 0 {
		maxGen = gens[len(gens)-1]
	}

	data, err := os.ReadFile(filepath.Join(j.dir, checkpointName))
	if errors.Is(err, fs.ErrNotExist) {
		// Fresh journal, or a crash during the very first open (before the
		// first checkpoint existed, so before any Mark could have returned).
		for _, gen := range gens {
			lc, err := j.readLog(gen)
			if err != nil && !errors.Is(err, errTornHeader) {
				return nil, 0, err
			}
			if lc.records > 0 {
				return nil, 0, fmt.Errorf("%w: %s has %d records but there is no checkpoint", ErrCorrupt, logName(gen), lc.records)
			}
		}
		j.log.Info("created bitmap journal", "dir", j.dir, "regions", j.geo.regions, "extentSize", j.geo.extentSize)
		return roaring.New(), maxGen, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading checkpoint: %w", err)
	}
	ckGen, bm, err := decodeCheckpoint(data, &j.geo)
	if err != nil {
		return nil, 0, err
	}
	fromCheckpoint := bm.GetCardinality()

	// Log ckGen is created (durably) before checkpoint ckGen is written, and
	// logs are created in generation order, so ckGen..maxGen must all exist.
	want := ckGen
	var records, torn int
	for _, gen := range gens {
		if gen < ckGen {
			continue // covered by the checkpoint; removed by the next rotate
		}
		if gen != want {
			return nil, 0, fmt.Errorf("%w: %s missing (checkpoint generation %d, found %s)", ErrCorrupt, logName(want), ckGen, logName(gen))
		}
		want++
		lc, err := j.readLog(gen)
		if errors.Is(err, errTornHeader) && gen == maxGen && gen > ckGen {
			continue // crash while creating the newest log: nothing was marked in it
		}
		if errors.Is(err, errTornHeader) {
			return nil, 0, fmt.Errorf("%w: %w (checkpoint generation %d, newest log %d)", ErrCorrupt, err, ckGen, maxGen)
		}
		if err != nil {
			return nil, 0, err
		}
		for _, r := range lc.runs {
			for e := r.first; e < r.first+r.n; e++ {
				lo, hi := j.geo.extentRegions(e)
				bm.AddRange(lo, hi)
			}
		}
		records += lc.records
		torn += lc.torn
	}
	if want == ckGen {
		return nil, 0, fmt.Errorf("%w: %s missing (checkpoint generation %d)", ErrCorrupt, logName(ckGen), ckGen)
	}
	j.log.Info("recovered dirty bitmap", "dir", j.dir, "checkpointGeneration", ckGen, "lastGeneration", maxGen,
		"checkpointRegions", fromCheckpoint, "logRecords", records, "tornBytes", torn, "recoveredRegions", bm.GetCardinality())
	return bm, maxGen, nil
}

func (j *Journal) readLog(gen uint64) (logContents, error) {
	name := logName(gen)
	data, err := os.ReadFile(filepath.Join(j.dir, name))
	if err != nil {
		return logContents{}, fmt.Errorf("reading %s: %w", name, err)
	}
	lc, err := decodeLog(data, &j.geo)
	if err != nil {
		return lc, fmt.Errorf("%s: %w", name, err)
	}
	if lc.gen != gen {
		return lc, fmt.Errorf("%w: %s: header says generation %d", ErrCorrupt, name, lc.gen)
	}
	return lc, nil
}

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
	if off < 0 || n < 0 || off >= j.geo.size || n > j.geo.size-off {
		return fmt.Errorf("marking [%d, %d+%d): outside the volume of %d bytes", off, off, n, j.geo.size)
	}
	first, last, _ := j.geo.extentRange(off, n)
	if set := j.set.Load(); set.hasRange(first, last) {
		j.noteUsed(first, last)
		j.fastMarks.add(first)
		// A sequential writer (the extent before is marked too) with less
		// than half the read-ahead window marked in front of it: mark the
		// window now, without waiting, so it never stalls on a commit.
		if j.keepHot.Load() && first > 0 && set.has(first-1) {
			if h := last + max(1, j.aheadExtents()/2); h < j.geo.extents && !set.has(h) {
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
	wait := (*batch)(nil)
	for e := first; ; e++ {
		switch {
		case set.has(e):
		case j.inflight != nil && j.inflight.ext.Contains(e):
			if wait == nil {
				wait = j.inflight
			}
		default:
			if j.pending == nil {
				j.pending = &batch{ext: roaring.New(), done: make(chan struct{})}
			}
			j.pending.ext.Add(e)
			wait = j.pending
		}
		if e == last {
			break
		}
	}
	if wait == nil { // became durable while we took the lock
		j.mu.Unlock()
		j.noteUsed(first, last)
		j.fastMarks.add(first)
		return nil
	}
	// A write entering an unmarked extent at its start right after a marked
	// one is likely sequential: mark the next extents in the same commit.
	if wait == j.pending && j.keepHot.Load() && first > 0 && set.has(first-1) && off-int64(first)<<j.geo.extentShift < j.geo.extentSize/4 {
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
	return uint32(max(1, min(markAheadBytes, j.geo.size/64)>>j.geo.extentShift))
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
	for e := last + 1; e <= last+ahead && e < j.geo.extents; e++ {
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
	u := j.used.Load()
	for e := first; ; e++ {
		if !u.has(e) {
			u.add(e)
		}
		if e == last {
			return
		}
	}
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
			b.ext.Iterate(func(e uint32) bool { set.add(e); return true })
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
	ext.Iterate(func(e uint32) bool {
		if k := len(runs) - 1; k >= 0 && runs[k].first+runs[k].n == e {
			runs[k].n++
		} else {
			runs = append(runs, extentRun{first: e, n: 1})
		}
		return true
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

// Checkpoint atomically replaces the checkpoint with b and starts a new, empty
// log generation, so later Marks must mark their extents again.
//
// b is the caller's dirty bitmap (Tracker.Dirty). It may have been taken
// before the call and Marks may run concurrently: the checkpoint written is b
// ∪ every region of the extents marked in the generation being retired, so an
// extent marked at any time before the switch stays covered. b must cover the
// writes marked in earlier generations (see the package documentation for the
// ordering that guarantees it). b is not modified. Checkpoint and Close are
// serialized.
func (j *Journal) Checkpoint(b *roaring.Bitmap) error {
	j.ckptMu.Lock()
	defer j.ckptMu.Unlock()
	content, err := j.checkpointContent(b)
	if err != nil {
		return err
	}
	if err := j.rotate(content, true, j.keepHot.Load()); err != nil {
		return fmt.Errorf("checkpoint of bitmap journal %s: %w", j.dir, err)
	}
	return nil
}

func (j *Journal) checkpointContent(b *roaring.Bitmap) (*roaring.Bitmap, error) {
	j.mu.Lock()
	closing := j.closing
	j.mu.Unlock()
	if closing {
		return nil, ErrClosed
	}
	// A failed journal checkpoints too: rotate opens a new log, which is
	// what recovers it.
	if b == nil {
		return roaring.New(), nil
	}
	if !b.IsEmpty() && b.Maximum() >= j.geo.regions {
		return nil, fmt.Errorf("checkpoint of bitmap journal %s: region %d outside the volume's %d regions", j.dir, b.Maximum(), j.geo.regions)
	}
	return b.Clone(), nil
}

// Close stops the journal. If final is non-nil it is written as the last
// checkpoint, exactly (without the retired generation's extents): the caller
// must have quiesced writes, so that final reflects every write and ack. With
// a nil final the logs are left for the next OpenJournal to replay. Marks
// waiting for a group commit complete before Close returns; later Marks fail
// with ErrClosed.
func (j *Journal) Close(final *roaring.Bitmap) error {
	j.ckptMu.Lock()
	defer j.ckptMu.Unlock()
	j.mu.Lock()
	if j.closing {
		j.mu.Unlock()
		return ErrClosed
	}
	j.closing = true
	// Fast-path Marks must fail from now on, not find old extents.
	j.set.Store(newExtSet(0))
	j.cond.Broadcast()
	j.mu.Unlock()
	<-j.flusherDone

	var err error
	// Also after a failed append: the final checkpoint goes with a new log.
	if final != nil {
		if !final.IsEmpty() && final.Maximum() >= j.geo.regions {
			err = fmt.Errorf("final bitmap: region %d outside the volume's %d regions", final.Maximum(), j.geo.regions)
		} else {
			err = j.rotate(final.Clone(), false, false)
		}
	}
	j.mu.Lock()
	f := j.f
	j.f = nil
	j.mu.Unlock()
	if f != nil {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}
	j.lockF.Close()
	if err != nil {
		return fmt.Errorf("closing bitmap journal %s: %w", j.dir, err)
	}
	return nil
}

// rotate starts log generation gen+1 and writes content (plus carry, plus the
// retired generation's extents if unionRetired) as checkpoint gen+1, then
// removes the older logs. With keepHot, log gen+1 starts with a record of the
// extents written during generation gen, and those extents start out marked
// in gen+1. The order makes every crash point recoverable:
//
//  1. create and fsync log gen+1 (with the hot extents) and the directory;
//     no Mark uses it yet, and recovery (checkpoint ≤ gen, logs ≤ gen+1) only
//     gains the hot extents, which were marked in log gen anyway;
//  2. switch Marks to it: wait for a flush in progress on gen, swap file and
//     extent set; extents marked from now on go to gen+1;
//  3. write checkpoint gen+1 (temp file, fsync, rename, fsync dir); recovery
//     is either the old checkpoint + logs ≥ old gen, or the new checkpoint +
//     logs ≥ gen+1;
//  4. delete logs < gen+1, which no checkpoint needs any more.
//
// The caller holds ckptMu (or is OpenJournal, before the flusher starts).
func (j *Journal) rotate(content *roaring.Bitmap, unionRetired, keepHot bool) error {
	newGen := j.gen + 1 // only rotate writes j.gen, and rotations are serialized
	var hot []extentRun
	if keepHot {
		j.used.Load().forEach(func(e uint32) {
			if k := len(hot) - 1; k >= 0 && hot[k].first+hot[k].n == e {
				hot[k].n++
			} else {
				hot = append(hot, extentRun{first: e, n: 1})
			}
		})
	}
	nf, off, err := j.createLog(newGen, hot)
	if err != nil {
		return err
	}
	newSet := newExtSet(j.geo.extents)
	carried := 0
	for _, r := range hot {
		for e := r.first; e < r.first+r.n; e++ {
			newSet.add(e)
			carried++
		}
	}

	j.mu.Lock()
	j.swapping = true
	for j.flushing {
		j.cond.Wait()
	}
	oldF, oldSet := j.f, j.set.Load()
	j.f, j.gen, j.off = nf, newGen, off
	j.set.Store(newSet)
	j.used.Store(newExtSet(j.geo.extents))
	j.swapping = false
	// A log that failed is retired now; the new one was written and synced.
	j.recoveredLocked("checkpoint")
	j.cond.Broadcast()
	j.mu.Unlock()
	j.carried.Add(uint64(carried))

	if oldF != nil {
		// Every record in it was fdatasynced before its Marks returned.
		_ = oldF.Close()
	}
	retired := 0
	if unionRetired {
		oldSet.forEach(func(uint32) { retired++ })
		oldSet.addRegionsTo(&j.geo, j.carry)
	}
	content.Or(j.carry)
	if err := j.writeCheckpoint(newGen, content); err != nil {
		// Logs < newGen stay on disk and carry keeps their extents for the
		// next checkpoint.
		return err
	}
	j.retired.Store(uint64(retired))
	j.carry = roaring.New()
	j.removeLogsBefore(newGen)
	return nil
}

// createLog creates log gen with its header and, if hot is not empty, one
// record of the hot extents, fdatasyncs it and the directory, and returns it
// with its append offset.
func (j *Journal) createLog(gen uint64, hot []extentRun) (*os.File, int64, error) {
	if err := j.fault(FaultCreateLog); err != nil {
		return nil, 0, fmt.Errorf("creating %s: %w", logName(gen), err)
	}
	path := filepath.Join(j.dir, logName(gen))
	// O_TRUNC, not O_EXCL: a file of this generation can only be left over
	// from a rotation that failed before switching to it, so it holds nothing.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("creating log: %w", err)
	}
	fail := func(err error) (*os.File, int64, error) {
		f.Close()
		os.Remove(path)
		return nil, 0, fmt.Errorf("creating %s: %w", logName(gen), err)
	}
	hdr := appendLogHeader(nil, gen, &j.geo)
	if _, err := f.WriteAt(hdr, 0); err != nil {
		return fail(err)
	}
	if err := fsutil.Fdatasync(f); err != nil {
		return fail(err)
	}
	if err := fsutil.SyncDir(j.dir); err != nil {
		return fail(err)
	}
	off := int64(len(hdr))
	if len(hot) > 0 {
		// A separate append after the durable header: a crash tearing it
		// leaves a torn last record, which recovery ignores.
		var rec []byte
		for len(hot) > 0 {
			k := min(len(hot), maxRunsPerRecord)
			rec = appendRecord(rec, gen, hot[:k])
			hot = hot[k:]
		}
		if _, err := f.WriteAt(rec, off); err != nil {
			return fail(err)
		}
		if err := fsutil.Fdatasync(f); err != nil {
			return fail(err)
		}
		j.fsyncs.Add(1)
		off += int64(len(rec))
	}
	j.fsyncs.Add(2)
	return f, off, nil
}

func (j *Journal) writeCheckpoint(gen uint64, bm *roaring.Bitmap) error {
	bm.RunOptimize()
	data, err := encodeCheckpoint(gen, &j.geo, bm)
	if err != nil {
		return err
	}
	if err := j.fault(FaultCheckpoint); err != nil {
		return fmt.Errorf("writing checkpoint: %w", err)
	}
	// Through checkpoint.tmp, the name the format gives it: OpenJournal and
	// ResetJournal delete it.
	if err := fsutil.WriteFileAtomicVia(filepath.Join(j.dir, checkpointName), checkpointTmp, data, 0o600); err != nil {
		return fmt.Errorf("writing checkpoint: %w", err)
	}
	j.fsyncs.Add(2)
	j.checkpoints.Add(1)
	j.checkpointBytes.Store(uint64(len(data)))
	j.log.V(1).Info("bitmap checkpoint written", "dir", j.dir, "generation", gen,
		"regions", bm.GetCardinality(), "bytes", len(data))
	return nil
}

// removeLogsBefore deletes logs older than gen. Failures only leave stale
// files that recovery ignores, so they are logged, not returned.
func (j *Journal) removeLogsBefore(gen uint64) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		j.log.Error(err, "listing bitmap journal for cleanup", "dir", j.dir)
		return
	}
	removed := 0
	for _, e := range entries {
		if g, ok := parseLogName(e.Name()); ok && g < gen {
			if err := os.Remove(filepath.Join(j.dir, e.Name())); err != nil {
				j.log.Error(err, "removing retired intent log", "dir", j.dir, "file", e.Name())
				continue
			}
			removed++
		}
	}
	if removed > 0 {
		if err := fsutil.SyncDir(j.dir); err != nil {
			j.log.Error(err, "syncing bitmap journal directory", "dir", j.dir)
		}
	}
}

// Stats returns the journal's counters.
func (j *Journal) Stats() JournalStats {
	j.mu.Lock()
	gen := j.gen
	j.mu.Unlock()
	fast, batched := j.fastMarks.load(), j.batched.Load()
	return JournalStats{
		Marks:           fast + batched,
		FastMarks:       fast,
		Batched:         batched,
		Records:         j.records.Load(),
		Fsyncs:          j.fsyncs.Load(),
		Bytes:           j.bytes.Load(),
		Checkpoints:     j.checkpoints.Load(),
		CheckpointBytes: j.checkpointBytes.Load(),
		Generation:      gen,
		Extents:         uint64(j.set.Load().count()),
		Carried:         j.carried.Load(),
		Ahead:           j.ahead.Load(),
		RetiredExtents:  j.retired.Load(),
		Failures:        j.failures.Load(),
		Reopens:         j.reopens.Load(),
	}
}

// ExtentSize is the write-intent extent size in bytes.
func (j *Journal) ExtentSize() int64 { return j.geo.extentSize }

// stripedCounter is a counter for the lock-free fast path: concurrent Marks
// of different extents increment different cache lines instead of bouncing
// one.
type stripedCounter [16]struct {
	n atomic.Uint64
	_ [120]byte // keep stripes on separate (pairs of) cache lines
}

func (c *stripedCounter) add(key uint32) { c[key&15].n.Add(1) }

func (c *stripedCounter) load() uint64 {
	var sum uint64
	for i := range c {
		sum += c[i].n.Load()
	}
	return sum
}
