package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// verifyNotes points out states in which the members differ by design.
func verifyNotes(vp *storagev1alpha1.VolumePair, reps []*replica) []string {
	var notes []string
	switch vp.Status.Phase {
	case storagev1alpha1.PhaseSwap, storagev1alpha1.PhaseCopy:
		notes = append(notes, fmt.Sprintf("the pair is in %s: its members differ in the regions of the diff, which are in a dirty bitmap and not reported", vp.Status.Phase))
	}
	for _, r := range reps {
		switch {
		case r.st.BitmapsLost:
			notes = append(notes, fmt.Sprintf("node %s lost its bitmaps: every region counts as dirty, so no difference can be reported until a full resync", r.node))
		case r.st.DataState == agentapi.Inconsistent:
			notes = append(notes, fmt.Sprintf("node %s is Inconsistent: a copy towards it has not finished", r.node))
		}
		if r.st.OutOfSyncRegions > 0 {
			notes = append(notes, fmt.Sprintf("node %s's dirty bitmap holds %s (%s) its peer may lack", r.node, countRegions(int(r.st.OutOfSyncRegions)), humanBytes(r.st.OutOfSyncBytes)))
		}
	}
	return notes
}

// renderVerify writes the readable report.
func renderVerify(w io.Writer, rep *verifyReport) error {
	var b strings.Builder
	fmt.Fprintf(&b, "Verified %s on %s: %s in %d regions of %s (%s), %s.\n", rep.Volume, andList(rep.Nodes),
		humanBytes(rep.SizeBytes), rep.Regions, humanBytes(rep.RegionSize), rep.Algorithm, elapsed(rep.Seconds))
	if rep.DifferingRegions == 0 {
		b.WriteString("No differing regions: the replicas match.\n")
	} else {
		noun := "runs"
		if len(rep.Runs) == 1 {
			noun = "run"
		}
		fmt.Fprintf(&b, "DIFFERING REGIONS: %d (%s) in %d %s:\n", rep.DifferingRegions, humanBytes(rep.DifferingBytes), len(rep.Runs), noun)
		for i, r := range rep.Runs {
			if i == maxTextRuns {
				fmt.Fprintf(&b, "  ... and %d more runs (-o json lists them all)\n", len(rep.Runs)-maxTextRuns)
				break
			}
			fmt.Fprintf(&b, "  %s\n", r)
		}
	}
	if rep.SettledRegions > 0 {
		fmt.Fprintf(&b, "%s differed while being written and matched when checked again.\n", countRegions(rep.SettledRegions))
	}
	if rep.DirtyRegions > 0 {
		fmt.Fprintf(&b, "%s in a dirty bitmap (not yet replicated, as expected) also differed; not counted.\n", countRegions(rep.DirtyRegions))
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(&b, "Note: %s.\n", n)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// elapsed renders a run time: "0.4s" under a minute, else "3m12s".
func elapsed(seconds float64) string {
	if seconds < 60 {
		return fmt.Sprintf("%.1fs", seconds)
	}
	return humanDuration(time.Duration(seconds * float64(time.Second)))
}

// countRegions renders "1 region" or "n regions".
func countRegions(n int) string {
	if n == 1 {
		return "1 region"
	}
	return fmt.Sprintf("%d regions", n)
}

// progress reports a long first pass on stderr every few seconds.
type progress struct {
	w           io.Writer
	on          bool
	total, done int64
	start, last time.Time
	printed     bool
}

func newProgress(w io.Writer, on bool, total int64) *progress {
	now := time.Now()
	return &progress{w: w, on: on, total: total, start: now, last: now}
}

func (p *progress) add(n int64) {
	p.done += n
	if !p.on || time.Since(p.last) < 5*time.Second {
		return
	}
	p.last = time.Now()
	rate := int64(float64(p.done) / time.Since(p.start).Seconds())
	fmt.Fprintf(p.w, "verify: compared %s of %s (%.0f%%), %s\n", humanBytes(p.done), humanBytes(p.total), float64(p.done)*100/float64(max(p.total, 1)), humanRate(rate))
	p.printed = true
}

func (p *progress) finish() {
	if p.on && p.printed {
		fmt.Fprintf(p.w, "verify: compared %s\n", humanBytes(p.done))
	}
}

// andList is "a and b", "a, b and c".
func andList(xs []string) string {
	switch len(xs) {
	case 0:
		return ""
	case 1:
		return xs[0]
	}
	return strings.Join(xs[:len(xs)-1], ", ") + " and " + xs[len(xs)-1]
}
