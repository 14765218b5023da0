package volume_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestFailbackBackAndForthForwarded: a client stays connected to member a
// through two failbacks in a row (a → b, then b → a). During the second one
// a's writes are forwarded to b, held there, and b steps down: they must not
// fail (invariant 6) and must not be forwarded back to a by b (a issues them
// again itself), and everything acknowledged is on both members at the end.
func TestFailbackBackAndForthForwarded(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	ctx := context.Background()
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := a.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link up", func() bool { return a.v.Status().PeerConnected })

	// The client: 4 writers on a, each on its own 4 KiB blocks, until told
	// to stop; every acknowledged write is remembered.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	acked := map[int64]byte{}
	var errs []error
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64(w*64+i%64) * 4096
				val := byte(i)
				wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				err := a.v.WriteAt(wctx, bytes.Repeat([]byte{val}, 4096), off, false)
				cancel()
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					acked[off] = val
				}
				mu.Unlock()
				time.Sleep(time.Millisecond)
			}
		}()
	}
	failback := func(from, to *member, fromNode, toNode string, epoch uint64) {
		t.Helper()
		if err := from.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: epoch, Mode: volume.ModeAsync, PeerNode: toNode, PeerAddress: to.addr, Hold: true}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "drained", func() bool { return from.v.Status().Drained })
		if err := from.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: epoch + 1, Mode: volume.ModeAsync, PeerNode: toNode}); err != nil {
			t.Fatal(err)
		}
		if err := to.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: epoch + 1, Mode: volume.ModeAsync, PeerNode: fromNode, PeerAddress: from.addr}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "new writer streaming", func() bool { return to.v.Status().PeerConnected })
	}
	time.Sleep(50 * time.Millisecond)
	failback(a, b, "a", "b", 1) // a forwards to b
	time.Sleep(100 * time.Millisecond)
	failback(b, a, "b", "a", 2) // b holds a's forwarded writes, then a writes again
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d client writes failed across the failbacks, first: %v", len(errs), errs[0])
	}
	waitFor(t, "in sync", inSync(a, b))
	same(t, a, b)
	got := make([]byte, 4096)
	for off, val := range acked {
		if _, err := a.st.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if got[0] != val || got[4095] != val {
			t.Fatalf("block at %d holds %#x, the last acknowledged write was %#x", off, got[0], val)
		}
	}
	if st := a.v.Status(); st.ForwardedWrites == 0 {
		t.Fatal("no write was forwarded: the test did not exercise forwarding")
	}
}
