package main

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestForget: a section run again with -update replaces its rows. Before
// forget, the rows of resync, scaling, rss and backups were appended to the
// last run's, and the report listed two sets (two "resync after 1 %" rows
// in the targets table, one of them stale).
func TestForget(t *testing.T) {
	full := func() *results {
		return &results{
			Resync:   []resyncRow{{Label: "1 % changed"}},
			FullCopy: resyncRow{Label: "full"},
			Scaling:  []scaleRow{{SizeGiB: 1}},
			RSS:      []rssRow{{Volumes: 1}},
			Backups:  []backupsRow{{Backups: 2}},
			Fio:      []fioRow{{Target: "async"}},
		}
	}
	for _, tc := range []struct {
		section string
		cleared func(r *results) bool
	}{
		{"resync", func(r *results) bool { return r.Resync == nil && r.FullCopy.Label == "" }},
		{"scaling", func(r *results) bool { return r.Scaling == nil }},
		{"rss", func(r *results) bool { return r.RSS == nil }},
		{"backups", func(r *results) bool { return r.Backups == nil }},
	} {
		r := full()
		r.forget(tc.section)
		if !tc.cleared(r) {
			t.Errorf("forget(%q) kept the section's rows", tc.section)
		}
		kept := 0
		for _, n := range []int{len(r.Resync), len(r.Scaling), len(r.RSS), len(r.Backups), len(r.Fio)} {
			kept += n
		}
		if kept != 4 {
			t.Errorf("forget(%q) left %d rows of the other sections, want 4", tc.section, kept)
		}
	}
}

// TestVariantSectionSaysHowItWasTaken: a variant section says whether it
// was taken in the same run as the main section (-variants) or on its own
// (-only fio -tmpfs ...), and with which flags.
func TestVariantSectionSaysHowItWasTaken(t *testing.T) {
	at := time.Date(2026, 12, 7, 17, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		set        fioEnv
		runStarted time.Time // the page's run
		want       string
	}{
		{fioEnv{Storage: storageDisk, Started: at}, at.Add(-7 * 24 * time.Hour), "Taken 2026-12-07 17:00 UTC by a later run with `-update` (`-only` naming fio), after the run the page's header dates"},
		{fioEnv{Storage: storageTmpfs, Variant: true, Started: at}, at, "Results key `fio-tmpfs` (taken 2026-12-07 17:00 UTC in the same run as the main fio section, `-variants tmpfs`), beside it."},
		{fioEnv{Storage: storageDisk, Network: networkNetns, Pinning: pinningSides, Variant: true, Started: at}, at, "`-variants netns+pin`"},
		{fioEnv{Storage: storageTmpfs, Started: at}, at, "Results key `fio-tmpfs` (taken 2026-12-07 17:00 UTC with `-only fio -tmpfs`), kept beside the main fio section."},
	} {
		s := &fioSet{fioEnv: tc.set}
		key := fioKeyOf(s.Storage == storageTmpfs, s.Network != networkLoopback, s.Pinning != "")
		var out strings.Builder
		reportFio(func(f string, a ...any) { fmt.Fprintf(&out, f, a...) }, &results{Started: tc.runStarted, Finished: tc.runStarted.Add(time.Hour)}, key, s)
		if !strings.Contains(out.String(), tc.want) {
			t.Errorf("%s: the section does not say %q:\n%s", key, tc.want, out.String()[:min(400, out.Len())])
		}
	}
}

// A failover run that printed a result for the tight settings but none for
// the default ones (the line split by a log line) dropped the scorecard's
// row for DESIGN §7's failover target instead of showing it failed.
func TestScorecardFailoverWithoutDefault(t *testing.T) {
	line := func(name string, med float64) benchLine {
		return benchLine{Name: name, Metrics: map[string]stat{"median-s": {N: 1, Med: med}, "min-s": {N: 1, Med: med}, "max-s": {N: 1, Med: med}}}
	}
	for _, tc := range []struct {
		name     string
		failover []benchLine
		sections []sectionTime
		want     string
	}{
		{"both", []benchLine{line("BenchmarkFailover/default", 6.5), line("BenchmarkFailover/tight", 3.4)}, nil, "| failover, default settings | ≤ 10 s | 6.50"},
		{"tight only", []benchLine{line("BenchmarkFailover/tight", 3.4)}, []sectionTime{{Name: "failover", Err: "go test printed no result for BenchmarkFailover/default"}}, "| failover, default settings | ≤ 10 s | failed: go test printed no result for BenchmarkFailover/default | n/a |"},
		{"not run", nil, nil, "| failover, default settings | ≤ 10 s | not run | n/a |"},
	} {
		b := &bench{res: results{Failover: tc.failover, Sections: tc.sections}}
		var w strings.Builder
		b.scorecard(&w)
		if !strings.Contains(w.String(), tc.want) {
			t.Errorf("%s: the scorecard does not say %q:\n%s", tc.name, tc.want, w.String())
		}
	}
}
