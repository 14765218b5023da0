package fsutil

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// TestPollReload: each tick reloads; a run of failures is reported once,
// a change every time.
func TestPollReload(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	results := []error{nil, errors.New("a"), errors.New("b"), nil, errors.New("c")}
	changes := []bool{true, false, false, false, false}
	var mu sync.Mutex
	var got []string
	calls := 0
	done := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		defer close(done)
		PollReload(ctx, clk, time.Second, func() (bool, error) {
			mu.Lock()
			defer mu.Unlock()
			i := calls
			calls++
			if i >= len(results) {
				return false, nil
			}
			return changes[i], results[i]
		}, func(err error) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, "failed "+err.Error())
		}, func() {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, "changed")
		})
	}()
	for i := range len(results) {
		for !clk.HasWaiters() {
			time.Sleep(time.Millisecond)
		}
		clk.Step(time.Second)
		for {
			mu.Lock()
			n := calls
			mu.Unlock()
			if n > i {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	cancel()
	<-done
	if want := []string{"changed", "failed a", "failed c"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("reported %q, want %q", got, want)
	}
}
