package nbd

import (
	"bytes"
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// gate holds backend operations until opened, and counts the payload bytes
// held in the backend at once.
type gate struct {
	open     chan struct{}
	inBytes  atomic.Int64
	maxBytes atomic.Int64
	entered  atomic.Int64
}

func newGate() *gate { return &gate{open: make(chan struct{})} }

func (g *gate) hook(ctx context.Context, op Op, off, n int64) error {
	if op != OpWrite && op != OpRead {
		return nil
	}
	cur := g.inBytes.Add(n)
	defer g.inBytes.Add(-n)
	for {
		m := g.maxBytes.Load()
		if cur <= m || g.maxBytes.CompareAndSwap(m, cur) {
			break
		}
	}
	g.entered.Add(1)
	select {
	case <-g.open:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitUntil is testkit.Eventually with this package's timeout, polling
// finely: the budget states it waits for can be brief.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testkit.Eventually(t, testTimeout, what, cond, testkit.Every(2*time.Millisecond))
}

// sendAsync sends requests from a goroutine: the server may not read them
// for a while (that is the point), and a blocked Write must not block the
// test.
func sendAsync(c *testClient, reqs [][]byte) <-chan error {
	ch := make(chan error, 1)
	go func() {
		for _, r := range reqs {
			if _, err := c.c.Write(r); err != nil {
				ch <- err
				return
			}
		}
		ch <- nil
	}()
	return ch
}

// TestBudgetSharedByConnections: with an agent-wide budget of 1 MiB, four
// connections pipelining 256 KiB writes hold at most 1 MiB of payload at
// once between them (the per-connection limit alone would allow 128 MiB
// each); the others wait, and all complete once the backend moves. A read
// larger than the whole budget is served too.
func TestBudgetSharedByConnections(t *testing.T) {
	const (
		bud   = 1 << 20
		wsize = 256 << 10
		conns = 4
		per   = 4
	)
	g := newGate()
	b := budget.New(bud)
	env := startServer(t, 8<<20, func(s *Server, _ *StaticExports) { s.Budget = b })
	env.mem.SetHook(g.hook)

	clients := make([]*testClient, conns)
	sent := make([]<-chan error, conns)
	for i := range clients {
		c := connect(t, env.addr, testExport)
		_ = c.c.SetDeadline(time.Now().Add(3 * testTimeout))
		clients[i] = c
		var reqs [][]byte
		for j := range per {
			off := uint64((i*per + j) * wsize)
			c.handle++
			reqs = append(reqs, append(encodeRequest(CmdWrite, 0, c.handle, off, wsize), pattern(wsize, byte(i*per+j))...))
		}
		sent[i] = sendAsync(c, reqs)
	}
	// The budget fills, and the rest wait for it.
	waitUntil(t, "the backend full", func() bool { return g.entered.Load() >= bud/wsize })
	time.Sleep(100 * time.Millisecond) // nothing more gets in meanwhile
	if got := g.maxBytes.Load(); got > bud {
		t.Fatalf("the backend held %d bytes of writes at once, budget %d", got, bud)
	}
	if got := g.entered.Load(); got != bud/wsize {
		t.Fatalf("%d writes reached the backend, the budget allows %d", got, bud/wsize)
	}
	if s := b.Stats(); s.InUse != bud || s.Waiting == 0 {
		t.Fatalf("budget %+v: want it full, with writers waiting", s)
	}
	close(g.open)
	for i, c := range clients {
		if err := <-sent[i]; err != nil {
			t.Fatalf("client %d: send: %v", i, err)
		}
		for range per {
			if r := c.mustRecv(); r.errno != 0 {
				t.Fatalf("client %d: write errno %d", i, r.errno)
			}
		}
	}
	data := env.mem.Bytes()
	for i := range conns * per {
		want := pattern(wsize, byte(i))
		if got := data[i*wsize : (i+1)*wsize]; !bytes.Equal(got, want) {
			t.Fatalf("write %d did not land", i)
		}
	}
	// A read of 2 MiB, twice the budget: served with the budget to itself.
	got, e := clients[0].readAt(0, 2*bud)
	if e != 0 || !bytes.Equal(got[:wsize], pattern(wsize, 0)) {
		t.Fatalf("read larger than the budget: errno %d", e)
	}
	waitUntil(t, "the budget given back", func() bool { return b.Stats().InUse == 0 })
	if s := b.Stats(); s.Peak > bud || s.Waits == 0 {
		t.Fatalf("budget stats %+v: want a peak within %d and some waits", s, bud)
	}
}

// TestBudgetFollowsTakenBuffers: a write buffer a BufferTaker keeps (a
// replicating backend queues it for its peer) stays charged to the budget
// until the taker gives it back.
func TestBudgetFollowsTakenBuffers(t *testing.T) {
	const bud = 64 << 10
	b := budget.New(bud)
	tb := &takingBackend{MemBackend: NewMemBackend(1 << 20)}
	env := startServer(t, 1<<20, func(s *Server, e *StaticExports) {
		s.Budget = b
		e.Add(testExport, &Export{Name: testExport, Backend: tb})
	})
	c := connect(t, env.addr, testExport)
	var want [][]byte
	for i := range bud / 8192 {
		p := bytes.Repeat([]byte{byte(i + 1)}, 8192)
		want = append(want, p)
		if e := c.writeAt(uint64(i)*8192, p, 0); e != 0 {
			t.Fatalf("write %d: errno %d", i, e)
		}
	}
	if s := b.Stats(); s.InUse != bud {
		t.Fatalf("%d bytes charged with %d bytes of writes kept by the backend", s.InUse, bud)
	}
	// The next write waits for the kept buffers...
	c.handle++
	h := c.handle
	sent := sendAsync(c, [][]byte{append(encodeRequest(CmdWrite, 0, h, 1<<19, 8192), make([]byte, 8192)...)})
	waitUntil(t, "a write waiting for the budget", func() bool { return b.Stats().Waiting == 1 })
	if tb.taken.Load() != bud/8192 {
		t.Fatalf("%d writes reached the backend while it kept the whole budget", tb.taken.Load())
	}
	// ...and runs once they are given back.
	tb.giveBack(t, want)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if r := c.mustRecv(); r.errno != 0 || r.handle != h {
		t.Fatalf("write after the give-back: handle %d errno %d", r.handle, r.errno)
	}
	tb.giveBack(t, [][]byte{make([]byte, 8192)})
	if s := b.Stats(); s.InUse != 0 {
		t.Fatalf("%d bytes still charged after every buffer was given back", s.InUse)
	}
}

// TestBudgetWaitEndsOnShutdown: a reader waiting for the budget does not
// hold up a shutdown; the requests in flight still finish and get their
// replies (drain), and the waiting ones end with the connection.
func TestBudgetWaitEndsOnShutdown(t *testing.T) {
	const bud = 128 << 10
	g := newGate()
	b := budget.New(bud)
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) {
		s.Budget = b
		s.DrainTimeout = 5 * time.Second
	})
	env.mem.SetHook(g.hook)
	c := connect(t, env.addr, testExport)
	var reqs [][]byte
	for i := range 4 {
		c.handle++
		reqs = append(reqs, append(encodeRequest(CmdWrite, 0, c.handle, uint64(i)*bud, bud), pattern(bud, byte(i))...))
	}
	sent := sendAsync(c, reqs)
	waitUntil(t, "one write in the backend, the next waiting for the budget", func() bool {
		return g.entered.Load() == 1 && b.Stats().Waiting == 1
	})
	stopped := make(chan error, 1)
	go func() { stopped <- env.stop() }()
	waitUntil(t, "the shutdown to start", func() bool {
		return strings.Contains(env.logs.String(), "Shutting down; finishing requests in flight")
	})
	close(g.open) // the write in flight finishes
	r, err := c.recv()
	if err != nil || r.errno != 0 || r.handle != 1 {
		t.Fatalf("the write in flight at shutdown: %+v, %v; want a successful reply to handle 1", r, err)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("shutdown hung on a reader waiting for the budget")
	}
	<-sent
	if s := b.Stats(); s.InUse != 0 || s.Waiting != 0 {
		t.Fatalf("after shutdown: %+v", s)
	}
	if strings.Contains(env.logs.String(), "Closing connection") {
		t.Fatalf("shutdown logged as a connection failure:\n%s", env.logs)
	}
}
