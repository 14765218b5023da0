package main

import "testing"

func TestAgentProcs(t *testing.T) {
	for _, tc := range []struct {
		name            string
		numCPU, current int
		want            int
	}{
		{"one CPU", 1, 1, 1},
		{"two CPUs, no limit", 2, 2, 1},
		{"three CPUs", 3, 3, 1},
		{"sixteen CPUs, no limit", 16, 16, 8},
		{"sixteen CPUs, a limit of two", 16, 2, 2},
		{"sixteen CPUs, a limit of one", 16, 1, 1},
		{"affinity of one CPU on a big node", 1, 1, 1},
		{"limit below half", 64, 4, 4},
	} {
		if got := agentProcs(tc.numCPU, tc.current); got != tc.want {
			t.Errorf("%s: agentProcs(%d, %d) = %d, want %d", tc.name, tc.numCPU, tc.current, got, tc.want)
		}
	}
}
