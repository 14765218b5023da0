package nbd

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"testing"
)

// takingBackend keeps write buffers (as a replicating backend queues them)
// and gives them back later, from another goroutine.
type takingBackend struct {
	*MemBackend
	mu      sync.Mutex
	kept    []*[]byte
	dones   []func(*[]byte)
	taken   atomic.Int64
	writeAt atomic.Int64
}

func (b *takingBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	b.writeAt.Add(1)
	return b.MemBackend.WriteAt(ctx, p, off, fua)
}

func (b *takingBackend) WriteAtTake(ctx context.Context, buf *[]byte, done func(*[]byte), off int64, fua bool) error {
	b.taken.Add(1)
	err := b.MemBackend.WriteAt(ctx, *buf, off, fua)
	b.mu.Lock()
	b.kept = append(b.kept, buf)
	b.dones = append(b.dones, done)
	b.mu.Unlock()
	return err
}

// giveBack returns the kept buffers, after checking nobody wrote into them
// while the backend owned them.
func (b *takingBackend) giveBack(t *testing.T, want [][]byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, buf := range b.kept {
		if !bytes.Equal(*buf, want[i]) {
			t.Errorf("kept buffer %d changed while the backend owned it", i)
		}
		b.dones[i](buf)
	}
	b.kept, b.dones = nil, nil
}

// TestBufferTaker: a backend implementing BufferTaker gets the request's own
// payload buffer, which the server does not reuse until the backend gives
// it back.
func TestBufferTaker(t *testing.T) {
	tb := &takingBackend{MemBackend: NewMemBackend(1 << 20)}
	env := startServer(t, 1<<20, func(s *Server, e *StaticExports) {
		e.Add(testExport, &Export{Name: testExport, Backend: tb})
	})
	c := connect(t, env.addr, testExport)
	var want [][]byte
	for i := range 16 {
		p := bytes.Repeat([]byte{byte(i + 1)}, 8192)
		want = append(want, p)
		if e := c.writeAt(uint64(i)*8192, p, 0); e != 0 {
			t.Fatalf("write %d: errno %d", i, e)
		}
	}
	if tb.taken.Load() != 16 || tb.writeAt.Load() != 0 {
		t.Fatalf("WriteAtTake called %d times, WriteAt %d; want 16 and 0", tb.taken.Load(), tb.writeAt.Load())
	}
	// Reads of the same size draw buffers from the same pool: had the
	// server recycled a kept buffer, a read would overwrite it.
	for i := range 16 {
		got, e := c.readAt(uint64(15-i)*8192, 8192)
		if e != 0 || !bytes.Equal(got, want[15-i]) {
			t.Fatalf("read back %d: errno %d, data differs", 15-i, e)
		}
	}
	tb.giveBack(t, want)
}
