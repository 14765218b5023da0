package main

import (
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
			want: procStat{comm: "kworker/u8:2-flush-254:0", ppid: 2, ticks: 59}},
		{name: "spaces and parentheses in the name", in: "77 (a b) c)) S 1 77 77 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 0 0",
			want: procStat{comm: "a b) c)", ppid: 1, ticks: 11}},
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
	wb, err := writebackSeconds()
	if err != nil || wb < 0 {
		t.Fatalf("writebackSeconds = %v, %v", wb, err)
	}
}
