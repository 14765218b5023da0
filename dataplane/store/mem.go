package store

import (
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"
	"syscall"
)

// memPage is Mem's allocation unit; pages never written (or punched whole)
// take no memory.
const memPage = 64 << 10

// Mem is a sparse in-memory Store for tests. It is safe for concurrent use.
//
// Mem models a disk with a volatile write cache: DropUnsynced discards every
// write, punch and zero since the last successful Sync, as a power loss would.
type Mem struct {
	mu     sync.RWMutex
	size   atomic.Int64     // only grows (Grow)
	pages  map[int64][]byte // page index -> memPage bytes; absent = zeros
	undo   map[int64][]byte // page index -> contents at the last Sync (nil = absent)
	closed bool
}

var _ Store = (*Mem)(nil)

// NewMem returns an all-zero in-memory store of size bytes. It panics if size
// is negative.
func NewMem(size int64) *Mem {
	if size < 0 {
		panic(fmt.Sprintf("store: NewMem(%d): negative size", size))
	}
	m := &Mem{pages: map[int64][]byte{}, undo: map[int64][]byte{}}
	m.size.Store(size)
	return m
}

// Size is the store's size.
func (m *Mem) Size() int64 { return m.size.Load() }

// AllZero reports whether no byte was ever written (every page is absent).
func (m *Mem) AllZero() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.pages) == 0
}

// ReadAt reads len(p) bytes at off; the range must lie inside the store.
func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	if err := checkRead("read", off, len(p), m.size.Load()); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return 0, fmt.Errorf("store: mem read: %w", fs.ErrClosed)
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/memPage, pos%memPage
		chunk := min(len(p)-done, int(memPage-in))
		if pg, ok := m.pages[idx]; ok {
			copy(p[done:done+chunk], pg[in:])
		} else {
			clear(p[done : done+chunk])
		}
		done += chunk
	}
	return len(p), nil
}

// WriteAt writes p at off; a range past the end wraps syscall.ENOSPC.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	if err := checkWrite("write", off, int64(len(p)), m.size.Load()); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, fmt.Errorf("store: mem write: %w", fs.ErrClosed)
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/memPage, pos%memPage
		chunk := min(len(p)-done, int(memPage-in))
		m.saveUndo(idx)
		pg, ok := m.pages[idx]
		if !ok {
			pg = make([]byte, memPage)
			m.pages[idx] = pg
		}
		copy(pg[in:], p[done:done+chunk])
		done += chunk
	}
	return len(p), nil
}

// Punch makes [off, off+n) read as zeros and frees whole pages in it.
func (m *Mem) Punch(off, n int64) error { return m.zero("punch", off, n) }

// Zero makes [off, off+n) read as zeros.
func (m *Mem) Zero(off, n int64) error { return m.zero("zero", off, n) }

func (m *Mem) zero(op string, off, n int64) error {
	if err := checkWrite(op, off, n, m.size.Load()); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("store: mem %s: %w", op, fs.ErrClosed)
	}
	for end := off + n; off < end; {
		idx, in := off/memPage, off%memPage
		chunk := min(end-off, memPage-in)
		if pg, ok := m.pages[idx]; ok {
			m.saveUndo(idx)
			if chunk == memPage {
				delete(m.pages, idx)
			} else {
				clear(pg[in : in+chunk])
			}
		}
		off += chunk
	}
	return nil
}

// saveUndo records page idx's durable contents before its first change after
// a Sync. m.mu must be held for writing.
func (m *Mem) saveUndo(idx int64) {
	if _, ok := m.undo[idx]; ok {
		return
	}
	if pg, ok := m.pages[idx]; ok {
		m.undo[idx] = append([]byte(nil), pg...)
	} else {
		m.undo[idx] = nil
	}
}

// Sync makes every completed change durable (survive DropUnsynced).
func (m *Mem) Sync() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("store: mem sync: %w", fs.ErrClosed)
	}
	clear(m.undo)
	return nil
}

// DropUnsynced reverts every change made since the last Sync, simulating a
// power loss that empties the disk's volatile cache. It also works on a
// closed store, so a test can close, drop and Reopen to model a node crash.
func (m *Mem) DropUnsynced() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for idx, old := range m.undo {
		if old == nil {
			delete(m.pages, idx)
		} else {
			m.pages[idx] = old
		}
	}
	clear(m.undo)
}

// Reopen marks a closed store open again, keeping its contents, as a process
// restart reopening the same disk would.
func (m *Mem) Reopen() {
	m.mu.Lock()
	m.closed = false
	m.mu.Unlock()
}

// Allocated is the number of bytes of memory holding data (whole pages).
func (m *Mem) Allocated() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.pages)) * memPage
}

// Close marks the store closed; later calls fail with fs.ErrClosed.
func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("store: mem close: %w", fs.ErrClosed)
	}
	m.closed = true
	return nil
}

// Grow makes the store size bytes long (Grower); the new bytes read as
// zeros. A smaller size wraps syscall.EINVAL. The growth is durable at
// once: DropUnsynced does not undo it.
func (m *Mem) Grow(size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur := m.size.Load(); size < cur {
		return fmt.Errorf("store: mem grow to %d bytes: it holds %d, a store never shrinks: %w", size, cur, syscall.EINVAL)
	}
	m.size.Store(size)
	return nil
}
