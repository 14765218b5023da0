package volume

import (
	"testing"
	"time"
)

// TestSyncDue: the backup syncs at once for FUA writes and flushes, within
// a tick for copies and quiet streams, and under a steady stream of plain
// writes only once the oldest has waited lazySyncAfter.
func TestSyncDue(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		kicked, quiet, asked bool
		pending              time.Duration
		want                 bool
	}{
		{"steady plain writes, fresh", false, false, false, 0, false},
		{"steady plain writes, a second old", false, false, false, time.Second, false},
		{"steady plain writes, just under the bound", false, false, false, lazySyncAfter - time.Millisecond, false},
		{"steady plain writes, at the bound", false, false, false, lazySyncAfter, true},
		{"FUA write or flush", true, false, false, 0, true},
		{"a copy asks for a durable ack", false, false, true, 0, true},
		{"the stream went quiet", false, true, false, 0, true},
	} {
		if got := syncDue(tc.kicked, tc.quiet, tc.asked, tc.pending); got != tc.want {
			t.Errorf("%s: syncDue = %v, want %v", tc.name, got, tc.want)
		}
	}
}
