package store

import (
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Op names a Store operation for Faulty's counters and hook.
type Op int

// The operations Faulty counts and can fail.
const (
	OpRead Op = iota
	OpWrite
	OpSync
	OpPunch
	OpZero
	OpGrow
	numOps
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpSync:
		return "sync"
	case OpPunch:
		return "punch"
	case OpZero:
		return "zero"
	case OpGrow:
		return "grow"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

type span struct{ off, n int64 }

func (s span) overlaps(off, n int64) bool {
	return n > 0 && off < s.off+s.n && s.off < off+n
}

// Faulty wraps a Store and injects faults: EIO on reads or writes (always or
// for byte ranges), ENOSPC on writes, failing or slow Syncs, or any error from
// a hook. It counts calls and injected failures per operation. A failed
// operation does not reach the wrapped store, so a failed Sync leaves the
// writes before it unsynced (see Mem.DropUnsynced). Faulty is safe for
// concurrent use, and faults can be changed while I/O is in flight.
//
// "Write" faults apply to every modification: WriteAt, Punch and Zero. ENOSPC
// applies to WriteAt and Zero (which may allocate), not to Punch.
type Faulty struct {
	s Store

	mu          sync.Mutex
	readAll     bool
	readSpans   []span
	writeAll    bool
	writeSpans  []span
	noSpace     bool
	syncFail    bool
	syncDelay   time.Duration
	hook        func(op Op, off, n int64) error
	closeOnce   sync.Once
	closed      chan struct{}
	calls, errs [numOps]atomic.Int64
}

var _ Store = (*Faulty)(nil)

// NewFaulty wraps s; until a fault is set it passes every call through.
func NewFaulty(s Store) *Faulty { return &Faulty{s: s, closed: make(chan struct{})} }

// AllZero reports whether the wrapped store is known to hold only zeros.
func (f *Faulty) AllZero() bool { return AllZero(f.s) }

// Unwrap returns the wrapped store.
func (f *Faulty) Unwrap() Store { return f.s }

// FailReads makes every read fail with EIO.
func (f *Faulty) FailReads() { f.set(func() { f.readAll = true }) }

// FailReadsAt makes reads overlapping [off, off+n) fail with EIO (a bad sector).
func (f *Faulty) FailReadsAt(off, n int64) {
	f.set(func() { f.readSpans = append(f.readSpans, span{off, n}) })
}

// FailWrites makes every WriteAt, Punch and Zero fail with EIO.
func (f *Faulty) FailWrites() { f.set(func() { f.writeAll = true }) }

// FailWritesAt makes WriteAt, Punch and Zero overlapping [off, off+n) fail
// with EIO.
func (f *Faulty) FailWritesAt(off, n int64) {
	f.set(func() { f.writeSpans = append(f.writeSpans, span{off, n}) })
}

// SetNoSpace makes WriteAt and Zero fail with ENOSPC while on is true (a full
// thin pool or file system).
func (f *Faulty) SetNoSpace(on bool) { f.set(func() { f.noSpace = on }) }

// FailSync makes Sync fail with EIO without syncing.
func (f *Faulty) FailSync() { f.set(func() { f.syncFail = true }) }

// SetSyncDelay makes every Sync wait d before it syncs (a slow fsync). Close
// cuts the wait short.
func (f *Faulty) SetSyncDelay(d time.Duration) { f.set(func() { f.syncDelay = d }) }

// SetHook installs fn, called before every operation that passed the other
// fault rules (off and n are 0 for Sync). A non-nil result fails the
// operation with that error, wrapped. nil removes the hook.
func (f *Faulty) SetHook(fn func(op Op, off, n int64) error) { f.set(func() { f.hook = fn }) }

// Heal removes every fault, delay and hook. Counters are kept.
func (f *Faulty) Heal() {
	f.set(func() {
		f.readAll, f.readSpans = false, nil
		f.writeAll, f.writeSpans = false, nil
		f.noSpace, f.syncFail, f.syncDelay, f.hook = false, false, 0, nil
	})
}

// Calls is the number of op calls so far, failed or not.
func (f *Faulty) Calls(op Op) int64 { return f.calls[op].Load() }

// Failures is the number of op calls that Faulty failed on purpose.
func (f *Faulty) Failures(op Op) int64 { return f.errs[op].Load() }

func (f *Faulty) set(fn func()) {
	f.mu.Lock()
	fn()
	f.mu.Unlock()
}

// fault decides whether op on [off, off+n) fails, and how.
func (f *Faulty) fault(op Op, off, n int64) error {
	f.calls[op].Add(1)
	f.mu.Lock()
	var errno syscall.Errno
	switch op {
	case OpRead:
		if f.readAll || anyOverlap(f.readSpans, off, n) {
			errno = syscall.EIO
		}
	case OpWrite, OpPunch, OpZero:
		if f.writeAll || anyOverlap(f.writeSpans, off, n) {
			errno = syscall.EIO
		} else if f.noSpace && op != OpPunch {
			errno = syscall.ENOSPC
		}
	case OpSync:
		if f.syncFail {
			errno = syscall.EIO
		}
	}
	hook := f.hook
	f.mu.Unlock()
	if errno != 0 {
		f.errs[op].Add(1)
		return fmt.Errorf("store: injected %s fault at [%d, +%d): %w", op, off, n, errno)
	}
	if hook != nil {
		if err := hook(op, off, n); err != nil {
			f.errs[op].Add(1)
			return fmt.Errorf("store: injected %s fault at [%d, +%d): %w", op, off, n, err)
		}
	}
	return nil
}

func anyOverlap(spans []span, off, n int64) bool {
	for _, s := range spans {
		if s.overlaps(off, n) {
			return true
		}
	}
	return false
}

// Size is the wrapped store's size.
func (f *Faulty) Size() int64 { return f.s.Size() }

// Grow grows the wrapped store (Grower). The hook sees it as OpGrow with
// off the new size and n 0; an error from it fails the grow.
func (f *Faulty) Grow(size int64) error {
	if err := f.fault(OpGrow, size, 0); err != nil {
		return err
	}
	return Grow(f.s, size)
}

// ReadAt reads from the wrapped store unless a read fault applies.
func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.s.ReadAt(p, off)
}

// WriteAt writes to the wrapped store unless a write fault applies.
func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	if err := f.fault(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.s.WriteAt(p, off)
}

// Punch punches the wrapped store unless a write fault applies.
func (f *Faulty) Punch(off, n int64) error {
	if err := f.fault(OpPunch, off, n); err != nil {
		return err
	}
	return f.s.Punch(off, n)
}

// Zero zeroes the wrapped store unless a write or space fault applies.
func (f *Faulty) Zero(off, n int64) error {
	if err := f.fault(OpZero, off, n); err != nil {
		return err
	}
	return f.s.Zero(off, n)
}

// Sync waits the configured delay, then syncs the wrapped store unless a sync
// fault applies.
func (f *Faulty) Sync() error {
	f.mu.Lock()
	d := f.syncDelay
	f.mu.Unlock()
	if d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-f.closed:
			t.Stop()
		}
	}
	if err := f.fault(OpSync, 0, 0); err != nil {
		return err
	}
	return f.s.Sync()
}

// DropCache drops the wrapped store's cached pages (CacheDropper).
func (f *Faulty) DropCache() error { return DropCache(f.s) }

// Close closes the wrapped store and ends pending Sync delays.
func (f *Faulty) Close() error {
	f.closeOnce.Do(func() { close(f.closed) })
	return f.s.Close()
}
