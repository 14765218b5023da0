package main

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseStat(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     procStat
		err      string
	}{
		{name: "kworker", in: "123 (kworker/u8:2-flush-254:0) I 2 0 0 0 -1 69238880 0 0 0 0 17 42 0 0 20 0 1 0 100 0 0",
			want: procStat{comm: "kworker/u8:2-flush-254:0", ppid: 2, ticks: 59, start: 100}},
		{name: "spaces and parentheses in the name", in: "77 (a b) c)) S 1 77 77 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 0 0",
			want: procStat{comm: "a b) c)", ppid: 1, ticks: 11, start: 1}},
		{name: "no name", in: "77 a S 1", err: "no command name"},
		{name: "short", in: "77 (a) S 1 2 3", err: "fields"},
		{name: "not a number", in: "77 (a) S 1 77 77 0 -1 0 0 0 0 0 x 6 0 0 20 0 1 0 1 0 0", err: "invalid syntax"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseStat(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("parseStat: %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("parseStat = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// TestSyncFiles: every regular file under the paths is synced (a missing
// one is an error, a socket or directory is skipped), and the kernel
// threads' CPU time reads.
func TestSyncFiles(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "vol")
	if err := os.MkdirAll(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{filepath.Join(dir, "a.img"), filepath.Join(sub, "data"), filepath.Join(sub, "journal")} {
		if err := os.WriteFile(f, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	secs, err := syncFiles([]string{filepath.Join(dir, "a.img"), sub})
	if err != nil || secs < 0 {
		t.Fatalf("syncFiles = %v, %v", secs, err)
	}
	if _, err := syncFiles([]string{filepath.Join(dir, "missing")}); err == nil {
		t.Fatal("syncFiles of a missing file: no error")
	}
	wb, err := readWritebackThreads()
	if err != nil || len(wb) == 0 {
		t.Fatalf("readWritebackThreads = %v, %v (this kernel has kworker threads)", wb, err)
	}
}

// TestWritebackSecondsSince: the kernel threads' CPU time over an interval
// is never negative. A kworker that exited during a fio run made the
// "until durable" figure negative (-43.27 s/GiB in a tmpfs run), because
// the sums of the two snapshots were subtracted.
func TestWritebackSecondsSince(t *testing.T) {
	tick := 1 / clkTck
	before := writebackThreads{
		10: {comm: "kworker/0:1", ticks: 500, start: 7},
		11: {comm: "kworker/u8:2", ticks: 4000, start: 8}, // exits
		12: {comm: "jbd2/vda-8", ticks: 30, start: 9},
		13: {comm: "kworker/1:0", ticks: 900, start: 10}, // exits, its PID reused
	}
	now := writebackThreads{
		10: {comm: "kworker/0:1", ticks: 520, start: 7},  // +20
		12: {comm: "jbd2/vda-8", ticks: 31, start: 9},    // +1
		13: {comm: "kworker/1:2", ticks: 5, start: 99},   // new thread: 5
		14: {comm: "kworker/u8:5", ticks: 3, start: 100}, // new: 3
	}
	if got, want := writebackSecondsSince(before, now), 29*tick; math.Abs(got-want) > 1e-9 {
		t.Errorf("writebackSecondsSince = %v, want %v", got, want)
	}
	if got := writebackSecondsSince(before, writebackThreads{}); got != 0 {
		t.Errorf("every thread exited: %v, want 0", got)
	}
}
