package fsutil

import (
	"context"
	"time"

	"k8s.io/utils/clock"
)

// PollReload calls reload every interval on clk until ctx is done: the
// loop that keeps files read while running (the agents' token file, TLS
// material) current. failed is called with the first error of a run of
// failures (the caller keeps what it loaded before), changed after each
// reload that changed something.
func PollReload(ctx context.Context, clk clock.WithTicker, interval time.Duration, reload func() (bool, error), failed func(error), changed func()) {
	t := clk.NewTicker(interval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		ok, err := reload()
		switch {
		case err != nil && !failing:
			failed(err)
			failing = true
		case err == nil:
			failing = false
			if ok {
				changed()
			}
		}
	}
}
