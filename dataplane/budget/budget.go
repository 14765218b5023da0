// Package budget is the agent's one memory budget for in-flight data: the
// payloads of the requests it holds at once (NBD reads and writes of every
// connection, requests forwarded by a peer), in bytes.
//
// Without it, each connection is bounded on its own (the NBD server holds up
// to 128 MiB per connection), so a few busy clients could make the agent
// hold more than its memory limit and be OOM-killed, taking every pair on
// the node with it. With it, a request that cannot get its bytes waits
// until earlier requests give theirs back; it does not fail.
//
// Waiters are served in arrival order (a large request is not starved by a
// stream of small ones). A request larger than the whole budget is charged
// the whole budget: it waits until it has the budget to itself, then runs,
// so it is served rather than deadlocked. Force charges without waiting,
// beyond the size if need be, for the one caller that must never block (the
// replication receiver, which also reads the acks every waiting write
// needs); the overdraft is bounded by the caller and delays later Acquires
// until the budget is back under its size.
//
// A nil *Budget is valid and unbounded: every method is a no-op.
//
// Why not golang.org/x/sync/semaphore.Weighted, which is FIFO too: it has no
// overdraft (Force), an Acquire larger than the size never succeeds there,
// and it reports neither use nor waits, which the agent exports as metrics.
package budget

import (
	"container/list"
	"context"
	"sync"
)

// Budget is a byte budget shared by everything that holds request payloads
// in memory. It is safe for concurrent use.
type Budget struct {
	size int64

	mu      sync.Mutex
	used    int64
	peak    int64
	waiters list.List // of *waiter, in arrival order
	waits   int64     // Acquires that had to wait, ever
}

type waiter struct {
	n     int64
	ready chan struct{} // closed when granted
}

// New returns a budget of size bytes. size must be positive.
func New(size int64) *Budget {
	if size <= 0 {
		panic("budget: size must be positive")
	}
	return &Budget{size: size}
}

// Stats is a snapshot of a Budget.
type Stats struct {
	// Size is the budget; InUse the bytes charged now (above Size after a
	// Force); Peak the highest InUse so far.
	Size, InUse, Peak int64
	// Waiting is the number of Acquires waiting now; Waits counts every
	// Acquire that had to wait.
	Waiting int
	Waits   int64
}

// Stats returns the budget's counters (zero for a nil Budget).
func (b *Budget) Stats() Stats {
	if b == nil {
		return Stats{}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return Stats{Size: b.size, InUse: b.used, Peak: b.peak, Waiting: b.waiters.Len(), Waits: b.waits}
}

// charge is what a request of n bytes is charged: n, at most the size.
func (b *Budget) charge(n int64) int64 {
	return max(0, min(n, b.size))
}

// Acquire waits until n bytes are available (or, for n above the size, the
// whole budget) and charges them. It returns the charge to give back with
// Release. It fails only when ctx is done first; then nothing is charged.
func (b *Budget) Acquire(ctx context.Context, n int64) (int64, error) {
	if b == nil {
		return 0, nil
	}
	n = b.charge(n)
	if n == 0 {
		return 0, nil
	}
	b.mu.Lock()
	if b.waiters.Len() == 0 && b.used+n <= b.size {
		b.takeLocked(n)
		b.mu.Unlock()
		return n, nil
	}
	w := &waiter{n: n, ready: make(chan struct{})}
	e := b.waiters.PushBack(w)
	b.waits++
	b.mu.Unlock()

	select {
	case <-w.ready:
		return n, nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-w.ready:
		// Granted while ctx ended: the caller has it.
		return n, nil
	default:
	}
	front := b.waiters.Front() == e
	b.waiters.Remove(e)
	if front {
		// The waiters behind it may fit now.
		b.grantLocked()
	}
	return 0, ctx.Err()
}

// TryAcquire charges n bytes (at most the size) if they are available now
// and nobody waits before it.
func (b *Budget) TryAcquire(n int64) (int64, bool) {
	if b == nil {
		return 0, true
	}
	n = b.charge(n)
	b.mu.Lock()
	defer b.mu.Unlock()
	if n == 0 || (b.waiters.Len() == 0 && b.used+n <= b.size) {
		b.takeLocked(n)
		return n, true
	}
	return 0, false
}

// Force charges n bytes at once, even beyond the size. It returns the
// charge to give back with Release (n itself).
func (b *Budget) Force(n int64) int64 {
	if b == nil || n <= 0 {
		return 0
	}
	b.mu.Lock()
	b.takeLocked(n)
	b.mu.Unlock()
	return n
}

// Release gives back a charge returned by Acquire, TryAcquire or Force.
func (b *Budget) Release(charge int64) {
	if b == nil || charge <= 0 {
		return
	}
	b.mu.Lock()
	b.used -= charge
	if b.used < 0 {
		b.mu.Unlock()
		panic("budget: released more than was charged")
	}
	b.grantLocked()
	b.mu.Unlock()
}

func (b *Budget) takeLocked(n int64) {
	b.used += n
	b.peak = max(b.peak, b.used)
}

// grantLocked wakes the waiters at the front that fit, in order.
func (b *Budget) grantLocked() {
	for e := b.waiters.Front(); e != nil; e = b.waiters.Front() {
		w := e.Value.(*waiter)
		if b.used+w.n > b.size {
			return
		}
		b.takeLocked(w.n)
		b.waiters.Remove(e)
		close(w.ready)
	}
}
