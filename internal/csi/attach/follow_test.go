package attach

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	"github.com/tandem-storage/tandem/dataplane/nbd"
)

// member is an NBD server standing in for one member's agent; the two
// members of a test share one backend, as replication would make them.
type member struct {
	uri     string
	exports *nbd.StaticExports
	be      nbd.Backend
}

func startMember(t *testing.T, be nbd.Backend) *member {
	t.Helper()
	return startMemberWith(t, be, &nbd.Server{})
}

// startMemberWith is startMember with the server srv (its Exports set here).
func startMemberWith(t *testing.T, be nbd.Backend, srv *nbd.Server) *member {
	t.Helper()
	m := &member{exports: &nbd.StaticExports{}, be: be}
	m.exports.Add("ns/vol", &nbd.Export{Name: "ns/vol", Backend: be})
	srv.Exports = m.exports
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m.uri = "nbd://" + ln.Addr().String() + "/ns/vol"
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return m
}

// switchable is a Resolver the test points at a member, or at none.
type switchable struct {
	mu  sync.Mutex
	uri string
}

func (s *switchable) set(uri string) { s.mu.Lock(); s.uri = uri; s.mu.Unlock() }
func (s *switchable) resolve(context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.uri == "" {
		return "", errors.New("no member accepts writes")
	}
	return s.uri, nil
}

// writerGate makes a backend refuse client I/O as a member that is not the
// writer does (EPERM), or fail every write with a chosen errno.
type writerGate struct {
	mu  sync.Mutex
	err error
}

func (g *writerGate) set(err error) { g.mu.Lock(); g.err = err; g.mu.Unlock() }
func (g *writerGate) hook(_ context.Context, op nbd.Op, _, _ int64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if op == nbd.OpWrite || op == nbd.OpRead {
		return g.err
	}
	return nil
}

func TestFollowerFollowsTheWriter(t *testing.T) {
	shared := nbd.NewMemBackend(1 << 20)
	a := startMember(t, shared)
	r := &switchable{uri: a.uri}
	f := &Follower{Resolve: r.resolve, IOTimeout: 10 * time.Second, Log: testr.New(t)}
	defer f.Close()
	ctx := context.Background()
	if size, err := f.Connect(ctx); err != nil || size != 1<<20 {
		t.Fatalf("Connect: %d, %v", size, err)
	}
	if err := f.WriteAt(ctx, []byte("one"), 0, false); err != nil {
		t.Fatal(err)
	}

	// a stops being the writer (it refuses with EPERM); for a while no member
	// is named; then b is. The write in between waits and lands on b.
	gate := &writerGate{}
	shared.SetHook(gate.hook)
	b := startMember(t, nbd.NewMemBackend(1<<20))
	gate.set(syscall.EPERM)
	r.set("")
	go func() {
		time.Sleep(300 * time.Millisecond)
		r.set(b.uri)
	}()
	start := time.Now()
	if err := f.WriteAt(ctx, []byte("two"), 4096, true); err != nil {
		t.Fatalf("write across the change of writer: %v", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("the write returned after %s, before any writer was named", d)
	}
	if f.Endpoint() != b.uri || f.Reconnects() != 1 {
		t.Fatalf("endpoint %s after %d reconnects, want %s after 1", f.Endpoint(), f.Reconnects(), b.uri)
	}
	got := make([]byte, 3)
	if err := f.ReadAt(ctx, got, 4096); err != nil || string(got) != "two" {
		t.Fatalf("read back %q, %v", got, err)
	}
	if !bytes.Equal(b.be.(*nbd.MemBackend).Bytes()[4096:4099], []byte("two")) {
		t.Fatal("the write did not reach the new writer")
	}
}

func TestFollowerGivesUp(t *testing.T) {
	r := &switchable{}
	f := &Follower{Resolve: r.resolve, IOTimeout: 300 * time.Millisecond, Log: testr.New(t)}
	defer f.Close()
	start := time.Now()
	err := f.WriteAt(context.Background(), []byte{1}, 0, false)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write with no writer: %v, want EIO", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("gave up after %s, the timeout is 300ms", d)
	}
}

func TestFollowerDoesNotRetryWhatCannotSucceed(t *testing.T) {
	be := nbd.NewMemBackend(1 << 20)
	a := startMember(t, be)
	r := &switchable{uri: a.uri}
	f := &Follower{Resolve: r.resolve, IOTimeout: 10 * time.Second, Log: testr.New(t)}
	defer f.Close()
	gate := &writerGate{}
	be.SetHook(gate.hook)
	gate.set(syscall.ENOSPC)
	start := time.Now()
	err := f.WriteAt(context.Background(), []byte{1}, 0, false)
	if !errors.Is(err, syscall.ENOSPC) || time.Since(start) > time.Second {
		t.Fatalf("ENOSPC write: %v after %s, want ENOSPC at once", err, time.Since(start))
	}
	start = time.Now()
	if err := f.ReadAt(context.Background(), make([]byte, 2), 1<<20-1); !errors.Is(err, syscall.EINVAL) || time.Since(start) > time.Second {
		t.Fatalf("read past the end: %v after %s, want EINVAL at once", err, time.Since(start))
	}
	f.Close()
	if err := f.WriteAt(context.Background(), []byte{1}, 0, false); !errors.Is(err, errFollowerClosed) {
		t.Fatalf("write after Close: %v", err)
	}
}

func TestParseURI(t *testing.T) {
	for _, tc := range []struct{ uri, addr, name string }{
		{"nbd://198.18.0.11:10809/team/db", "198.18.0.11:10809", "team/db"},
		{"nbd://host/ns/v", "host:10809", "ns/v"},
		{"http://x/y", "", ""},
		{"nbd:///x", "", ""},
	} {
		addr, name, err := ParseURI(tc.uri)
		if tc.addr == "" {
			if err == nil {
				t.Errorf("%s: no error", tc.uri)
			}
			continue
		}
		if err != nil || addr != tc.addr || name != tc.name {
			t.Errorf("%s: %s %s %v", tc.uri, addr, name, err)
		}
	}
}

// growable is a backend that grows, as a replica does when its volume is
// expanded: a connection keeps the size it negotiated (the server checks
// requests against it), a new connection sees the new size.
type growable struct {
	mu sync.RWMutex
	be *nbd.MemBackend
}

func newGrowable(size int64) *growable { return &growable{be: nbd.NewMemBackend(size)} }

// grow copies the contents into a larger backend (requests wait).
func (g *growable) grow(t *testing.T, size int64) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	nb := nbd.NewMemBackend(size)
	if err := nb.WriteAt(context.Background(), g.be.Bytes(), 0, true); err != nil {
		t.Fatal(err)
	}
	g.be = nb
}

func (g *growable) Size() int64 { g.mu.RLock(); defer g.mu.RUnlock(); return g.be.Size() }
func (g *growable) ReadAt(ctx context.Context, p []byte, off int64) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.be.ReadAt(ctx, p, off)
}
func (g *growable) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.be.WriteAt(ctx, p, off, fua)
}
func (g *growable) Flush(ctx context.Context) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.be.Flush(ctx)
}
func (g *growable) Trim(ctx context.Context, off, n int64, fua bool) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.be.Trim(ctx, off, n, fua)
}
func (g *growable) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.be.WriteZeroes(ctx, off, n, fua)
}

// TestFollowerRefreshLearnsTheNewSize: after the export grows, the
// follower's connection still has the old size (NBD has no in-band
// resize); Refresh connects anew, returns the new size, and requests
// beyond the old end then succeed, with the old data intact. A refresh
// while no writer answers fails and keeps the old connection.
func TestFollowerRefreshLearnsTheNewSize(t *testing.T) {
	be := newGrowable(1 << 20)
	a := startMember(t, be)
	r := &switchable{uri: a.uri}
	f := &Follower{Resolve: r.resolve, IOTimeout: 5 * time.Second, Log: testr.New(t)}
	defer f.Close()
	ctx := context.Background()
	if size, err := f.Connect(ctx); err != nil || size != 1<<20 || f.Size() != 1<<20 {
		t.Fatalf("Connect: %d (Size %d), %v", size, f.Size(), err)
	}
	if err := f.WriteAt(ctx, []byte("old"), 1<<20-3, true); err != nil {
		t.Fatal(err)
	}
	be.grow(t, 2<<20)
	if f.Size() != 1<<20 {
		t.Fatalf("Size %d before Refresh: the connection negotiated 1 MiB", f.Size())
	}
	if err := f.WriteAt(ctx, []byte("new"), 1<<20+4096, false); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("write beyond the size the connection negotiated: %v, want EINVAL", err)
	}
	size, err := f.Refresh(ctx)
	if err != nil || size != 2<<20 || f.Size() != 2<<20 {
		t.Fatalf("Refresh: %d (Size %d), %v; want 2 MiB", size, f.Size(), err)
	}
	if f.Reconnects() != 1 || f.Endpoint() != a.uri {
		t.Fatalf("%d reconnects to %s after Refresh", f.Reconnects(), f.Endpoint())
	}
	if err := f.WriteAt(ctx, []byte("new"), 1<<20+4096, true); err != nil {
		t.Fatalf("write beyond the old end after Refresh: %v", err)
	}
	got := make([]byte, 3)
	if err := f.ReadAt(ctx, got, 1<<20-3); err != nil || string(got) != "old" {
		t.Fatalf("old data after the growth: %q, %v", got, err)
	}
	if size, err := f.Refresh(ctx); err != nil || size != 2<<20 {
		t.Fatalf("second Refresh: %d, %v", size, err)
	}

	// No writer named: Refresh gives up with its context, the old
	// connection stays in use.
	r.set("")
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = f.Refresh(cctx)
	cancel()
	if err == nil {
		t.Fatal("Refresh succeeded with no writer named")
	}
	if err := f.ReadAt(ctx, got, 1<<20+4096); err != nil || string(got) != "new" {
		t.Fatalf("read on the kept connection after a failed Refresh: %q, %v", got, err)
	}
}
