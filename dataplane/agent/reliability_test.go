package agent_test

import (
	"os"
	"strconv"
	"sync/atomic"
	"testing"
)

// stressTrials is the number of trials per case: def in `go test`,
// TANDEM_STRESS_TRIALS under make stress.
func stressTrials(def int) int {
	if n, err := strconv.Atoi(os.Getenv("TANDEM_STRESS_TRIALS")); err == nil && n > 0 {
		return n
	}
	return def
}

// tally counts what a reliability test did and logs, when the test ends,
//
//	RELIABILITY suite=... case=... trials=N faults=F violations=V
//
// for hack/stress to collect into docs/reliability.md. A failed test counts
// at least one violation.
type tally struct {
	suite, name              string
	trials, faults, violated atomic.Int64
}

func newTally(t *testing.T, suite string) *tally {
	r := &tally{suite: suite, name: t.Name()}
	t.Cleanup(func() {
		v := r.violated.Load()
		if t.Failed() && v == 0 {
			v = 1
		}
		t.Logf("RELIABILITY suite=%s case=%s trials=%d faults=%d violations=%d", r.suite, r.name, r.trials.Load(), r.faults.Load(), v)
	})
	return r
}
