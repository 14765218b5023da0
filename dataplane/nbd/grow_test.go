package nbd

import (
	"sync/atomic"
	"testing"
)

// growBackend is a MemBackend whose export size can grow up to the
// MemBackend's, as a volume's does (online expansion).
type growBackend struct {
	*MemBackend
	size atomic.Int64
}

func (g *growBackend) Size() int64 { return g.size.Load() }

// TestExportGrowsForNewConnections: after the export grows, a new
// connection is told the new size and may use it; a connection negotiated
// before keeps its size (NBD has no in-band resize) and a request past it
// is refused as past any end (ENOSPC for a write, EINVAL for a read).
func TestExportGrowsForNewConnections(t *testing.T) {
	const size, grown = 1 << 20, 3<<20 + 4096
	gb := &growBackend{MemBackend: NewMemBackend(grown)}
	gb.size.Store(size)
	env := startServer(t, size, func(_ *Server, ex *StaticExports) {
		ex.Add(testExport, &Export{Name: testExport, Backend: gb})
	})
	old := connect(t, env.addr, testExport)
	if old.size != size {
		t.Fatalf("first connection told %d bytes, want %d", old.size, size)
	}
	gb.size.Store(grown)

	c := connect(t, env.addr, testExport)
	if c.size != grown {
		t.Fatalf("connection after the grow told %d bytes, want %d", c.size, grown)
	}
	p := pattern(4096, 9)
	if errno := c.writeAt(grown-4096, p, 0); errno != 0 {
		t.Fatalf("write past the old end on a new connection: errno %d", errno)
	}
	got, errno := c.readAt(grown-4096, 4096)
	if errno != 0 {
		t.Fatalf("read past the old end: errno %d", errno)
	}
	assertBytes(t, "grown space", got, p)

	if errno := old.writeAt(size, p, 0); errno != errnoENOSPC {
		t.Fatalf("write past its negotiated size on the old connection: errno %d, want ENOSPC", errno)
	}
	if _, errno := old.readAt(size-4096, 8192); errno != errnoEINVAL {
		t.Fatalf("read across its negotiated end on the old connection: errno %d, want EINVAL", errno)
	}
	if errno := old.writeAt(size-4096, p, 0); errno != 0 {
		t.Fatalf("the old connection stopped working within its size: errno %d", errno)
	}
}

// raceBackend grows right after its Size was read a given number of times:
// between the size a connection's negotiation told the client and the
// start of its transmission.
type raceBackend struct {
	growBackend
	grown     int64
	growAfter atomic.Int32
}

func (r *raceBackend) Size() int64 {
	v := r.size.Load()
	if r.growAfter.Add(-1) == 0 {
		r.size.Store(r.grown)
	}
	return v
}

// TestGrowDuringNegotiationKeepsToldSize: an export that grows after the
// size was sent in NBD_OPT_GO's reply but before transmission starts: the
// connection keeps to the size the client was told.
func TestGrowDuringNegotiationKeepsToldSize(t *testing.T) {
	const size, grown = 1 << 20, 2 << 20
	rb := &raceBackend{grown: grown}
	rb.MemBackend = NewMemBackend(grown)
	rb.size.Store(size)
	rb.growAfter.Store(2) // resolve, then the NBD_INFO_EXPORT reply
	env := startServer(t, size, func(_ *Server, ex *StaticExports) {
		ex.Add(testExport, &Export{Name: testExport, Backend: rb})
	})
	c := connect(t, env.addr, testExport)
	if c.size != size {
		t.Fatalf("told %d bytes, want %d (the backend grew too early)", c.size, size)
	}
	if rb.size.Load() != grown {
		t.Fatal("the backend did not grow during the negotiation")
	}
	if errno := c.writeAt(size, pattern(4096, 1), 0); errno != errnoENOSPC {
		t.Fatalf("write past the told size: errno %d, want ENOSPC", errno)
	}
}
