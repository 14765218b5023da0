package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
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
	// geoP is the volume's geometry; Grow replaces it (the size only).
	geoP atomic.Pointer[geometry]
	log  logr.Logger

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
// extentSize bytes (0 means ExtentSizeFor(size, regionSize)).
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
		extentSize = ExtentSizeFor(size, regionSize)
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
		log:         log,
		lockF:       lockF,
		carry:       roaring.New(),
		flusherDone: make(chan struct{}),
		retryDelay:  minRetryDelay,
		minRetry:    minRetryDelay,
	}
	j.cond.L = &j.mu
	j.geoP.Store(&g)
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
		if !final.IsEmpty() && final.Maximum() >= j.geo().regions {
			err = fmt.Errorf("final bitmap: region %d outside the volume's %d regions", final.Maximum(), j.geo().regions)
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

// geo is the journal's current geometry.
func (j *Journal) geo() *geometry { return j.geoP.Load() }

// Size is the volume size the journal tracks now (it changes with Grow).
func (j *Journal) Size() int64 { return j.geo().size }

// ExtentSize is the write-intent extent size in bytes.
func (j *Journal) ExtentSize() int64 { return j.geo().extentSize }

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

// StoredExtentSize returns the extent size of the checkpoint in the journal
// directory dir, if it has an intact one (ok false otherwise). A volume
// that grew keeps the extent size its journal was created with, which may
// differ from ExtentSizeFor of its new size.
func StoredExtentSize(dir string) (extentSize int64, ok bool) {
	f, err := os.Open(filepath.Join(dir, checkpointName))
	if err != nil {
		return 0, false
	}
	defer f.Close()
	h := make([]byte, ckptHeaderLen)
	if _, err := io.ReadFull(f, h); err != nil {
		return 0, false
	}
	if string(h[:8]) != ckptMagic || crc32.Checksum(h[:60], castagnoli) != binary.LittleEndian.Uint32(h[60:]) {
		return 0, false
	}
	es := int64(binary.LittleEndian.Uint64(h[40:]))
	return es, es > 0
}
