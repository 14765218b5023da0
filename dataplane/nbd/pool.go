package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from size-classed pools (powers of two from 4 KiB to
// 64 MiB), so the hot path does not allocate. Larger buffers are allocated
// and dropped.
const (
	minBufShift = 12
	maxBufShift = 26
)

var bufPools [maxBufShift + 1]sync.Pool

// getBuf returns a buffer of length n and the pool handle to give back to
// putBuf. The contents are not zeroed.
func getBuf(n int) *[]byte {
	shift := minBufShift
	if n > 1<<minBufShift {
		shift = bits.Len(uint(n - 1))
	}
	if shift > maxBufShift {
		b := make([]byte, n)
		return &b
	}
	if p, _ := bufPools[shift].Get().(*[]byte); p != nil {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<shift)
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(p *[]byte) {
	c := cap(*p)
	if c < 1<<minBufShift || bits.OnesCount(uint(c)) != 1 {
		return
	}
	shift := bits.Len(uint(c)) - 1
	if shift > maxBufShift {
		return
	}
	bufPools[shift].Put(p)
}

// flushBarrier lets a FLUSH wait for the writes received before it on the
// same connection. Writes are counted in epochs; a FLUSH seals the current
// epoch and waits until it and every older epoch have drained.
//
// begin and seal are called by the connection's reader goroutine only (in
// request order); end is called by workers.
type flushBarrier struct {
	mu  sync.Mutex
	cur *epoch
}

type epoch struct {
	pending int
	sealed  bool
	prev    *epoch // older epoch still pending, nil once all older drained
	next    *epoch
	done    chan struct{} // closed once sealed, drained and prev == nil
}

var closedChan = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

func newFlushBarrier() *flushBarrier {
	return &flushBarrier{cur: &epoch{}}
}

// begin registers a write; pass the result to end when it completes.
func (b *flushBarrier) begin() *epoch {
	b.mu.Lock()
	e := b.cur
	e.pending++
	b.mu.Unlock()
	return e
}

// end marks a write from begin as completed.
func (b *flushBarrier) end(e *epoch) {
	b.mu.Lock()
	e.pending--
	b.settle(e)
	b.mu.Unlock()
}

// seal returns a channel closed once every write begun so far has ended.
func (b *flushBarrier) seal() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.cur
	if e.pending == 0 && e.prev == nil {
		return closedChan
	}
	e.sealed = true
	e.done = make(chan struct{})
	n := &epoch{prev: e}
	e.next = n
	b.cur = n
	return e.done
}

// settle closes e's channel when e is complete and cascades to newer epochs.
// Called with b.mu held.
func (b *flushBarrier) settle(e *epoch) {
	for e != nil && e.sealed && e.pending == 0 && e.prev == nil {
		close(e.done)
		n := e.next
		e.next = nil
		if n == nil {
			return
		}
		n.prev = nil
		e = n
	}
}
