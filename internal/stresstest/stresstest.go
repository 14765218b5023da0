// Package stresstest holds what Tandem's reliability suites share: the knobs `make stress` turns (TANDEM_STRESS_TRIALS,
// TANDEM_STRESS_SEED) and the line every suite logs for hack/stress/report
// to collect into docs/reliability.md:
//
//	RELIABILITY suite=<suite> case=<case> trials=N faults=F violations=V
//
// It is imported by tests only.
package stresstest

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
)

// Trials is the number of trials per case: def in `go test`,
// TANDEM_STRESS_TRIALS under make stress, and at most one (min(def, 1))
// under go test -short whatever the environment says.
func Trials(def int) int {
	if testing.Short() {
		return min(def, 1)
	}
	if n, err := strconv.Atoi(os.Getenv("TANDEM_STRESS_TRIALS")); err == nil && n > 0 {
		return n
	}
	return def
}

// Seed is TANDEM_STRESS_SEED, or def when it is unset or malformed. Tests
// log the seed they use so a failing trial can be replayed.
func Seed(def uint64) uint64 {
	if n, err := strconv.ParseUint(os.Getenv("TANDEM_STRESS_SEED"), 10, 64); err == nil {
		return n
	}
	return def
}

// Line formats one RELIABILITY line.
func Line(suite, name string, trials, faults, violations int64) string {
	return fmt.Sprintf("RELIABILITY suite=%s case=%s trials=%d faults=%d violations=%d", suite, name, trials, faults, violations)
}

// Tally counts what a reliability test did. It logs its RELIABILITY line
// when the test ends; a failed test counts at least one violation.
type Tally struct {
	Suite, Name              string
	Trials, Faults, Violated atomic.Int64
}

// NewTally returns the tally of test t in suite.
func NewTally(t testing.TB, suite string) *Tally {
	r := &Tally{Suite: suite, Name: t.Name()}
	t.Cleanup(func() {
		v := r.Violated.Load()
		if t.Failed() && v == 0 {
			v = 1
		}
		t.Log(Line(r.Suite, r.Name, r.Trials.Load(), r.Faults.Load(), v))
	})
	return r
}
