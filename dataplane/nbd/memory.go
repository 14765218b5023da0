package nbd

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
)

// Op names a Backend operation, for MemBackend's hook and call counts.
type Op int

// Backend operations.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpTrim
	OpWriteZeroes
	OpPunchZeroes
	numOps
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpTrim:
		return "trim"
	case OpWriteZeroes:
		return "writeZeroes"
	case OpPunchZeroes:
		return "punchZeroes"
	default:
		return fmt.Sprintf("op%d", int(o))
	}
}

// Hook is called by MemBackend before each operation (n is 0 for flushes).
// A non-nil error fails the operation; a hook may also block, e.g. until ctx
// is done, to hold a request.
type Hook func(ctx context.Context, op Op, off, n int64) error

// memPage is the granularity of MemBackend's write-back cache model.
const memPage = 4096

// MemBackend is an in-memory Backend (and ZeroPuncher) for tests. It models
// a volatile write cache: writes are visible to reads at once, but they
// become durable (visible in Durable, surviving Crash) only through Flush or
// FUA. Trim zeroes the range. It is safe for concurrent use.
type MemBackend struct {
	mu      sync.RWMutex
	data    []byte
	durable []byte
	dirty   []uint64 // one bit per memPage written since the last flush

	hook  atomic.Pointer[Hook]
	calls [numOps]atomic.Uint64
	fua   atomic.Uint64
}

var (
	_ Backend     = (*MemBackend)(nil)
	_ ZeroPuncher = (*MemBackend)(nil)
)

// NewMemBackend returns a zeroed MemBackend of size bytes.
func NewMemBackend(size int64) *MemBackend {
	pages := (size + memPage - 1) / memPage
	return &MemBackend{
		data:    make([]byte, size),
		durable: make([]byte, size),
		dirty:   make([]uint64, (pages+63)/64),
	}
}

// SetHook installs h (nil removes it). It may be called at any time.
func (m *MemBackend) SetHook(h Hook) {
	if h == nil {
		m.hook.Store(nil)
		return
	}
	m.hook.Store(&h)
}

// Calls returns how many times op has been called (including failed calls).
func (m *MemBackend) Calls(op Op) uint64 { return m.calls[op].Load() }

// FUAWrites returns how many writes, trims and zeroings asked for FUA.
func (m *MemBackend) FUAWrites() uint64 { return m.fua.Load() }

// Bytes returns a copy of the current contents.
func (m *MemBackend) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

// Durable returns a copy of the contents that would survive a crash.
func (m *MemBackend) Durable() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.durable...)
}

// Crash simulates a power loss: writes not yet flushed are lost.
func (m *MemBackend) Crash() {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data, m.durable)
	clear(m.dirty)
}

func (m *MemBackend) before(ctx context.Context, op Op, off, n int64) error {
	m.calls[op].Add(1)
	if h := m.hook.Load(); h != nil {
		if err := (*h)(ctx, op, off, n); err != nil {
			return fmt.Errorf("mem backend %s at %d+%d: %w", op, off, n, err)
		}
	}
	if off < 0 || n < 0 || off > int64(len(m.data)) || n > int64(len(m.data))-off {
		return fmt.Errorf("mem backend %s at %d+%d beyond size %d: %w", op, off, n, len(m.data), errOutOfRange)
	}
	return nil
}

var errOutOfRange = fmt.Errorf("out of range: %w", syscall.EINVAL)

// Size implements Backend.
func (m *MemBackend) Size() int64 { return int64(len(m.data)) }

// ReadAt implements Backend.
func (m *MemBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := m.before(ctx, OpRead, off, int64(len(p))); err != nil {
		return err
	}
	m.mu.RLock()
	copy(p, m.data[off:])
	m.mu.RUnlock()
	return nil
}

// WriteAt implements Backend.
func (m *MemBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := m.before(ctx, OpWrite, off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	copy(m.data[off:], p)
	m.settle(off, int64(len(p)), fua)
	m.mu.Unlock()
	return nil
}

// Flush implements Backend.
func (m *MemBackend) Flush(ctx context.Context) error {
	if err := m.before(ctx, OpFlush, 0, 0); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for w, bitsw := range m.dirty {
		if bitsw == 0 {
			continue
		}
		for b := range 64 {
			if bitsw&(1<<b) == 0 {
				continue
			}
			start := int64(w*64+b) * memPage
			end := min(start+memPage, int64(len(m.data)))
			copy(m.durable[start:end], m.data[start:end])
		}
		m.dirty[w] = 0
	}
	return nil
}

// Trim implements Backend; the range reads as zeroes afterwards.
func (m *MemBackend) Trim(ctx context.Context, off, n int64, fua bool) error {
	return m.zero(ctx, OpTrim, off, n, fua)
}

// WriteZeroes implements Backend.
func (m *MemBackend) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	return m.zero(ctx, OpWriteZeroes, off, n, fua)
}

// PunchZeroes implements ZeroPuncher.
func (m *MemBackend) PunchZeroes(ctx context.Context, off, n int64, fua bool) error {
	return m.zero(ctx, OpPunchZeroes, off, n, fua)
}

func (m *MemBackend) zero(ctx context.Context, op Op, off, n int64, fua bool) error {
	if err := m.before(ctx, op, off, n); err != nil {
		return err
	}
	m.mu.Lock()
	clear(m.data[off : off+n])
	m.settle(off, n, fua)
	m.mu.Unlock()
	return nil
}

// settle records [off, off+n) as written: durable at once with fua, else
// dirty until the next flush. Called with m.mu held.
func (m *MemBackend) settle(off, n int64, fua bool) {
	if n == 0 {
		return
	}
	if fua {
		m.fua.Add(1)
		copy(m.durable[off:off+n], m.data[off:off+n])
		// The pages may hold other unflushed writes: leave them dirty.
		return
	}
	for p := off / memPage; p <= (off+n-1)/memPage; p++ {
		m.dirty[p/64] |= 1 << (p % 64)
	}
}
