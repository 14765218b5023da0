package agent

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// serveNBD serves a's exports on a loopback port.
func serveNBD(t *testing.T, a *Agent) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = (&nbd.Server{Exports: a}).Serve(ctx, ln)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ln.Addr().String()
}

// TestControlAPIGrow: a PUT with a larger size grows the replica while an
// NBD client writes, durably before it answers, and reports the new size; a
// connection made before keeps its size, a new one sees the new size. A
// smaller size and another region size are refused with 409 naming the
// sizes; a restarted agent opens the replica at its new size.
func TestControlAPIGrow(t *testing.T) {
	a, srv := newTestAgent(t)
	c := NewClient(srv.URL, "s3cret")
	ctx := context.Background()
	const small, grown = 8 << 20, 24<<20 + 4096
	spec := volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}
	if _, err := c.Put(ctx, "ns", "vol", VolumeRequest{Size: small, RegionSize: 64 << 10, Spec: spec}); err != nil {
		t.Fatal(err)
	}
	addr := serveNBD(t, a)
	old, err := nbd.Dial(ctx, addr, "ns/vol")
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if old.Size() != small {
		t.Fatalf("NBD size %d, want %d", old.Size(), small)
	}

	// A client writes within the old size the whole time.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		buf := bytes.Repeat([]byte{0x42}, 64<<10)
		for i := int64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := old.WriteAt(ctx, buf, (i*(64<<10))%small, i%7 == 0); err != nil {
				werr = err
				return
			}
		}
	})
	st, err := c.Put(ctx, "ns", "vol", VolumeRequest{Size: grown, RegionSize: 64 << 10, Spec: spec})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("PUT with a larger size: %v", err)
	}
	if werr != nil {
		t.Fatalf("a client write failed during the grow: %v", werr)
	}
	if st.Size != grown || !st.Writable {
		t.Fatalf("status after the grow: size %d writable %v, want %d and writable", st.Size, st.Writable, grown)
	}
	if m, err := meta.Read(a.dir("ns", "vol")); err != nil || m.Size != grown {
		t.Fatalf("metadata after the grow: %+v, %v", m, err)
	}
	if fi, err := os.Stat(filepath.Join(a.dir("ns", "vol"), "data")); err != nil || fi.Size() != grown {
		t.Fatalf("data file after the grow: %v", err)
	}
	if got, err := c.Get(ctx, "ns", "vol"); err != nil || got.Size != grown {
		t.Fatalf("GET after the grow: size %d, %v", got.Size, err)
	}

	nc, err := nbd.Dial(ctx, addr, "ns/vol")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if nc.Size() != grown {
		t.Fatalf("a new NBD connection sees %d bytes, want %d", nc.Size(), grown)
	}
	p := bytes.Repeat([]byte{0x99}, 4096)
	if err := nc.WriteAt(ctx, p, grown-4096, true); err != nil {
		t.Fatalf("write past the old end: %v", err)
	}
	got := make([]byte, 4096)
	if err := nc.ReadAt(ctx, got, grown-4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back past the old end: %v", err)
	}
	if err := nc.ReadAt(ctx, got, small); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("the grown space does not read as zeros: %v", err)
	}
	if old.Size() != small {
		t.Fatalf("the old connection's size changed to %d", old.Size())
	}
	if err := old.WriteAt(ctx, p, small-4096, false); err != nil {
		t.Fatalf("the old connection stopped working within its size: %v", err)
	}

	var apiErr *APIError
	for _, tc := range []struct {
		name     string
		size, rs int64
		msg      string
	}{
		{"shrink", small, 64 << 10, "volume ns/vol has size 25169920; 8388608 asked is smaller, and a volume never shrinks"},
		{"region size", grown, 128 << 10, "exists with size 25169920 and region size 65536"},
	} {
		_, err := c.Put(ctx, "ns", "vol", VolumeRequest{Size: tc.size, RegionSize: tc.rs, Spec: spec})
		if !errors.As(err, &apiErr) || apiErr.Code != 409 || !strings.Contains(apiErr.Message, tc.msg) {
			t.Fatalf("%s: %v, want 409 with %q", tc.name, err, tc.msg)
		}
	}
	if got, _ := c.Get(ctx, "ns", "vol"); got.Size != grown {
		t.Fatalf("a refused PUT changed the size to %d", got.Size)
	}

	// An agent restarted opens the replica at its new size, and a PUT
	// with it is a no-op.
	old.Close()
	nc.Close()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := New(Config{Node: "node-a", DataDir: a.cfg.DataDir, Token: "s3cret", Log: a.cfg.Log})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	v := b.get("ns/vol")
	if v == nil || v.Size() != grown {
		t.Fatalf("restarted agent: %v", v)
	}
	if _, err := b.open("ns", "vol", grown, 64<<10); err != nil {
		t.Fatal(err)
	}
}

// TestControlAPIGrowBeyondFileSystem: a grow larger than the node's file
// system can hold a file (EFBIG) is refused with 400, and the replica stays
// open, usable, at its old size. (On a file system that holds it, the grow
// succeeds: both outcomes are checked.)
func TestControlAPIGrowBeyondFileSystem(t *testing.T) {
	a, srv := newTestAgent(t)
	c := NewClient(srv.URL, "s3cret")
	ctx := context.Background()
	const rs, small, huge = 64 << 20, 128 << 20, 1 << 50
	spec := volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}
	if _, err := c.Put(ctx, "ns", "big", VolumeRequest{Size: small, RegionSize: rs, Spec: spec}); err != nil {
		t.Fatal(err)
	}
	probe := filepath.Join(a.cfg.DataDir, "probe")
	f, err := os.Create(probe)
	if err != nil {
		t.Fatal(err)
	}
	perr := f.Truncate(huge)
	f.Close()
	os.Remove(probe)

	st, err := c.Put(ctx, "ns", "big", VolumeRequest{Size: huge, RegionSize: rs, Spec: spec})
	if !errors.Is(perr, syscall.EFBIG) {
		t.Logf("this file system holds a %d-byte file (%v): the grow must succeed", int64(huge), perr)
		if err != nil || st.Size != huge {
			t.Fatalf("grow to %d bytes: %+v, %v", int64(huge), st, err)
		}
		return
	}
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Code != 400 || !strings.Contains(apiErr.Message, "growing from 134217728 to 1125899906842624 bytes") {
		t.Fatalf("grow beyond the file system: %v, want 400 naming both sizes", err)
	}
	v := a.get("ns/big")
	if v.Size() != small {
		t.Fatalf("size %d after a refused grow", v.Size())
	}
	if err := v.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), small-4096, true); err != nil {
		t.Fatalf("the replica is not usable after a refused grow: %v", err)
	}
	if st, err := c.Put(ctx, "ns", "big", VolumeRequest{Size: small, RegionSize: rs, Spec: spec}); err != nil || st.Size != small {
		t.Fatalf("PUT at the old size after a refused grow: %+v, %v", st, err)
	}
}
