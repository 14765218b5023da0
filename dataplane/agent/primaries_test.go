package agent

import (
	"context"
	"errors"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// TestAuthorityNotRenewedWhileJournalFails: a primary
// whose write-intent journal fails (ENOSPC) is left out of Primaries, so the
// agent stops renewing its authority Lease and the grant lapses (the
// controller may then fail over); once the journal's disk has space again,
// writes succeed and renewal resumes.
func TestAuthorityNotRenewedWhileJournalFails(t *testing.T) {
	const vol = "ns/vol"
	cs := fake.NewClientset(authorityLease(vol, "node-a", 1)) // 3 s Lease
	var patches atomic.Int64
	cs.PrependReactor("patch", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		patches.Add(1)
		return false, nil, nil
	})
	k := NewKubeAuthority(cs.CoordinationV1(), "tandem-system", "node-a")
	a, err := New(Config{Node: "node-a", DataDir: t.TempDir(), Authority: k, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	v, err := a.open("ns", "vol", 16<<20, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Apply(volume.Spec{PairUID: string(pairOf(vol).UID), Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	var full atomic.Bool
	v.SetJournalFaultHook(func(bitmap.FaultOp) error {
		if full.Load() {
			return syscall.ENOSPC
		}
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); k.Run(ctx, a.Primaries, nopLog{}) }()
	defer func() { cancel(); <-done }()

	waitUntil := func(d time.Duration, what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(d)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out after %v waiting for %s", d, what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitUntil(5*time.Second, "authority granted", func() bool { return k.Authorized(vol, 1) == nil })
	if got := a.Primaries(); got[vol].Epoch != 1 {
		t.Fatalf("Primaries() = %v with a healthy primary", got)
	}

	full.Store(true)
	buf := make([]byte, 4096)
	if err := v.WriteAt(context.Background(), buf, 8<<20, false); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write to a new extent with the journal's disk full: %v, want EIO", err)
	}
	if got := a.Primaries(); len(got) != 0 {
		t.Fatalf("Primaries() = %v while the volume's journal fails; want it left out", got)
	}
	if st := v.Status(); st.Writable {
		t.Fatalf("status writable while the journal fails: %+v", st)
	}
	time.Sleep(1500 * time.Millisecond) // a renewal in flight at the fault may finish
	p0 := patches.Load()
	time.Sleep(2 * time.Second) // two renewal rounds
	if p := patches.Load() - p0; p != 0 {
		t.Fatalf("%d authority renewals while the volume's journal fails; want none", p)
	}
	waitUntil(5*time.Second, "the grant to lapse", func() bool { return k.Authorized(vol, 1) != nil })

	full.Store(false)
	waitUntil(15*time.Second, "a write to a new extent once the disk has space", func() bool {
		return v.WriteAt(context.Background(), buf, 12<<20, false) == nil || v.Fault() == nil
	})
	waitUntil(5*time.Second, "renewal to resume", func() bool { return k.Authorized(vol, 1) == nil })
	if got := a.Primaries(); got[vol].Epoch != 1 {
		t.Fatalf("Primaries() = %v after the journal recovered", got)
	}
	if err := v.WriteAt(context.Background(), buf, 12<<20, false); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
}
