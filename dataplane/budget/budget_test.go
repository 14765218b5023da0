package budget

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
)

// acquireAsync runs Acquire in a goroutine and reports its error.
func acquireAsync(b *Budget, ctx context.Context, n int64) <-chan error {
	ch := make(chan error, 1)
	go func() {
		_, err := b.Acquire(ctx, n)
		ch <- err
	}()
	return ch
}

func waitWaiting(t *testing.T, b *Budget, n int) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, fmt.Sprintf("%d waiting", n), func() (bool, string) {
		w := b.Stats().Waiting
		return w == n, fmt.Sprintf("waiting = %d", w)
	}, testkit.Every(time.Millisecond))
}

// done reports whether the Acquire behind ch finished within a short while.
func done(ch <-chan error) bool {
	select {
	case err := <-ch:
		if err != nil {
			panic(err)
		}
		return true
	case <-time.After(20 * time.Millisecond):
		return false
	}
}

func TestAcquireRelease(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		size       int64
		first, ask int64 // held, then asked for
		wantCharge int64
		wantWait   bool
	}{
		{"fits", 100, 40, 60, 60, false},
		{"does not fit", 100, 41, 60, 60, true},
		{"zero", 100, 100, 0, 0, false},
		{"negative", 100, 100, -5, 0, false},
		{"larger than the budget, budget free", 100, 0, 1000, 100, false},
		{"larger than the budget, budget in use", 100, 1, 1000, 100, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := New(tc.size)
			held, err := b.Acquire(ctx, tc.first)
			if err != nil {
				t.Fatal(err)
			}
			var charge int64
			got := make(chan struct{})
			go func() {
				charge, err = b.Acquire(ctx, tc.ask)
				close(got)
			}()
			if tc.wantWait {
				waitWaiting(t, b, 1)
				select {
				case <-got:
					t.Fatal("Acquire did not wait")
				case <-time.After(20 * time.Millisecond):
				}
				b.Release(held)
				held = 0
			}
			<-got
			if err != nil || charge != tc.wantCharge {
				t.Fatalf("Acquire(%d) = %d, %v; want %d", tc.ask, charge, err, tc.wantCharge)
			}
			b.Release(charge)
			b.Release(held)
			if s := b.Stats(); s.InUse != 0 || s.Waiting != 0 {
				t.Fatalf("after releasing everything: %+v", s)
			}
		})
	}
}

// TestFIFO: a large waiter is not overtaken by small requests that would fit.
func TestFIFO(t *testing.T) {
	ctx := context.Background()
	b := New(100)
	held, _ := b.Acquire(ctx, 50)
	big := acquireAsync(b, ctx, 80)
	waitWaiting(t, b, 1)
	small := acquireAsync(b, ctx, 10)
	waitWaiting(t, b, 2)
	if done(small) {
		t.Fatal("a small request overtook a waiting large one")
	}
	if _, ok := b.TryAcquire(10); ok {
		t.Fatal("TryAcquire overtook waiting requests")
	}
	b.Release(held)
	if !done(big) || !done(small) {
		t.Fatal("waiters not granted in order after the release")
	}
	if s := b.Stats(); s.InUse != 90 || s.Waits != 2 || s.Peak != 90 {
		t.Fatalf("stats %+v, want 90 in use, 2 waits, peak 90", s)
	}
}

// TestCancel: a cancelled waiter charges nothing and unblocks the ones
// behind it.
func TestCancel(t *testing.T) {
	b := New(100)
	held, _ := b.Acquire(context.Background(), 30)
	ctx, cancel := context.WithCancel(context.Background())
	big := acquireAsync(b, ctx, 100)
	waitWaiting(t, b, 1)
	small := acquireAsync(b, context.Background(), 20)
	waitWaiting(t, b, 2)
	cancel()
	if err := <-big; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Acquire: %v", err)
	}
	if !done(small) {
		t.Fatal("the waiter behind a cancelled one was not granted")
	}
	if s := b.Stats(); s.InUse != 50 || s.Waiting != 0 {
		t.Fatalf("stats %+v, want 50 in use and nobody waiting", s)
	}
	b.Release(held)
	b.Release(20)
}

// TestForce: Force never waits and may overdraw; Acquires wait until the
// budget is back under its size.
func TestForce(t *testing.T) {
	ctx := context.Background()
	b := New(100)
	held, _ := b.Acquire(ctx, 90)
	f := b.Force(50)
	if s := b.Stats(); s.InUse != 140 || s.Peak != 140 {
		t.Fatalf("after Force: %+v", s)
	}
	w := acquireAsync(b, ctx, 10)
	waitWaiting(t, b, 1)
	b.Release(held) // 50 in use: 10 fits
	if !done(w) {
		t.Fatal("Acquire not granted once the overdraft was repaid")
	}
	b.Release(f)
	b.Release(10)
	if s := b.Stats(); s.InUse != 0 {
		t.Fatalf("after releasing everything: %+v", s)
	}
}

func TestNil(t *testing.T) {
	var b *Budget
	if c, err := b.Acquire(context.Background(), 1<<40); c != 0 || err != nil {
		t.Fatalf("nil Acquire = %d, %v", c, err)
	}
	if c, ok := b.TryAcquire(1 << 40); c != 0 || !ok {
		t.Fatalf("nil TryAcquire = %d, %v", c, ok)
	}
	b.Release(b.Force(5))
	if s := b.Stats(); s != (Stats{}) {
		t.Fatalf("nil Stats = %+v", s)
	}
}

// TestConcurrent: many goroutines acquire random amounts (some above the
// size), hold them, release; the budget is never exceeded, everyone is
// served, and everything is given back.
func TestConcurrent(t *testing.T) {
	const size = 1 << 20
	b := New(size)
	var inUse, maxSeen atomic.Int64
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for range 200 {
				n := rng.Int64N(size/4) + 1
				if rng.IntN(50) == 0 {
					n = 2 * size
				}
				c, err := b.Acquire(context.Background(), n)
				if err != nil {
					t.Error(err)
					return
				}
				cur := inUse.Add(c)
				for {
					m := maxSeen.Load()
					if cur <= m || maxSeen.CompareAndSwap(m, cur) {
						break
					}
				}
				if rng.IntN(4) == 0 {
					time.Sleep(time.Duration(rng.IntN(100)) * time.Microsecond)
				}
				inUse.Add(-c)
				b.Release(c)
			}
		})
	}
	wg.Wait()
	if m := maxSeen.Load(); m > size {
		t.Fatalf("%d bytes held at once, budget %d", m, size)
	}
	if s := b.Stats(); s.InUse != 0 || s.Waiting != 0 || s.Peak > size {
		t.Fatalf("at the end: %+v", s)
	}
}

func TestReleaseTooMuchPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("releasing more than charged did not panic")
		}
	}()
	b := New(10)
	b.Release(1)
}
