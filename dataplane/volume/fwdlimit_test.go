package volume_test

// Forwarded requests are bounded: the writer used
// to start one goroutine per request its peer forwarded, with a copy of the
// payload, without any bound.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// newBudgetMember is newMember with an in-flight budget.
func newBudgetMember(t testing.TB, node string, b *budget.Budget) *member {
	t.Helper()
	m := &member{st: store.NewMem(size), logs: &syncBuf{}}
	log := funcr.New(func(prefix, args string) { m.logs.add(prefix + " " + args) }, funcr.Options{})
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: node, Dir: t.TempDir(), Size: size, RegionSize: region,
		Store: m.st, CheckpointInterval: 100 * time.Millisecond, Budget: b, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	ln := serveReplication(t, v)
	m.addr = ln.Addr().String()
	t.Cleanup(func() {
		ln.Close()
		if err := v.Close(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("---- %s log ----\n%s", node, m.logs)
		}
	})
	return m
}

// TestForwardedRequestsBounded: clients of an ex-writer keep sending while
// the new writer holds every write (a failback hold). The ex-writer has at
// most 64 requests, or 64 MiB, outstanding on the stream; the writer holds
// no more than that, charged to its budget, and the stream is not dropped.
// Once the hold ends every request completes and the budget is given back.
func TestForwardedRequestsBounded(t *testing.T) {
	for _, tc := range []struct {
		name      string
		n, wsize  int
		wantHeld  int64
		wantBytes int64
	}{
		{"request count binds", 100, 64 << 10, 64, 64 * 64 << 10},
		{"bytes bind", 24, 4 << 20, 16, 64 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bud := budget.New(1 << 30)
			w, x := newBudgetMember(t, "w", bud), newMember(t, "x")
			// x was the writer and handed over: it forwards.
			if err := x.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
				t.Fatal(err)
			}
			if err := x.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "w"}); err != nil {
				t.Fatal(err)
			}
			held := volume.Spec{Role: volume.RolePrimary, Epoch: 2, Initialize: true, Mode: volume.ModeAsync, PeerNode: "x", PeerAddress: x.addr, Hold: true}
			if err := w.v.Apply(held); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "link up", func() bool { return w.v.Status().PeerConnected })

			errs := make(chan error, tc.n)
			var wg sync.WaitGroup
			for i := range tc.n {
				wg.Go(func() {
					buf := make([]byte, tc.wsize)
					off := int64(i*tc.wsize) % (size - int64(tc.wsize) + 1)
					off -= off % 4096
					ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
					defer cancel()
					errs <- x.v.WriteAt(ctx, buf, off, false)
				})
			}
			waitFor(t, "the writer holding forwarded writes", func() bool { return w.v.Status().HeldWrites >= tc.wantHeld })
			time.Sleep(200 * time.Millisecond) // no more arrive meanwhile
			st := w.v.Status()
			if st.HeldWrites != tc.wantHeld {
				t.Fatalf("the writer holds %d forwarded writes of %d bytes, want %d (the stream's bound)", st.HeldWrites, tc.wsize, tc.wantHeld)
			}
			if got := bud.Stats().InUse; got != tc.wantBytes {
				t.Fatalf("%d bytes charged to the writer's budget for %d held writes of %d bytes, want %d", got, st.HeldWrites, tc.wsize, tc.wantBytes)
			}
			if !st.PeerConnected || st.Counters.Reconnects != 0 {
				t.Fatalf("the stream was dropped: connected %v, %d reconnects", st.PeerConnected, st.Counters.Reconnects)
			}

			held.Hold = false
			if err := w.v.Apply(held); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatalf("forwarded write failed: %v", err)
				}
			}
			waitFor(t, "the budget given back", func() bool { return bud.Stats().InUse == 0 })
			if st := w.v.Status(); st.Counters.Reconnects != 0 || st.Counters.Writes != int64(tc.n) {
				t.Fatalf("after the hold: %d writes, %d reconnects; want %d and 0", st.Counters.Writes, st.Counters.Reconnects, tc.n)
			}
		})
	}
}

// TestForwardFloodDropsStream: a peer that forwards more requests than a
// stream allows (without waiting for answers) breaks the protocol: the
// writer drops the stream with a logged reason instead of holding them all,
// and gives back what it charged to its budget.
func TestForwardFloodDropsStream(t *testing.T) {
	bud := budget.New(1 << 30)
	w := newBudgetMember(t, "w", bud)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := w.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Initialize: true, Mode: volume.ModeAsync, PeerNode: "x", PeerAddress: ln.Addr().String(), Hold: true}); err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	rd := repl.NewReader(bufio.NewReader(c), 0)
	if f, err := rd.Next(); err != nil || f.Type != repl.TypeHello {
		t.Fatalf("first frame from the writer: %v, %v", f, err)
	}
	ack, _ := json.Marshal(volume.HelloAck{Node: "x", DataState: volume.UpToDate})
	bw := bufio.NewWriter(c)
	send := func(f repl.Frame) {
		f.Epoch = 2
		if err := repl.WriteFrame(bw, &f); err != nil {
			t.Fatal(err)
		}
	}
	send(repl.Frame{Type: repl.TypeHelloAck, Payload: ack})
	send(repl.Frame{Type: repl.TypeBitmap})
	for i := range 65 {
		send(repl.Frame{Type: repl.TypeFwdWrite, Seq: uint64(i + 1), Offset: uint64(i) * 4096, Length: 4096, Payload: make([]byte, 4096)})
	}
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
	// The writer answers nothing (it holds writes) and closes the stream,
	// well before a silent peer would time out (4 s).
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	for {
		f, err := rd.Next()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the writer kept a stream with 65 forwarded requests outstanding: %v", err)
			}
			if !errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "reset") {
				t.Logf("stream ended with %v", err)
			}
			break
		}
		if f.Type == repl.TypeFwdReply {
			t.Fatalf("the writer answered forwarded request %d while holding writes", f.Seq)
		}
	}
	waitFor(t, "the reason logged", func() bool {
		return strings.Contains(w.logs.String(), fmt.Sprintf("a stream allows %d requests", 64))
	})
	waitFor(t, "the budget given back", func() bool { return bud.Stats().InUse == 0 })
}
