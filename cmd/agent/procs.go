package main

import (
	"os"
	"runtime"
)

// agentProcs is the number of Go processors (GOMAXPROCS) the agent runs
// with, given the CPUs it may run on (numCPU: its affinity) and the Go
// runtime's default (current: the same, or a CPU limit on its container if
// lower): half of the CPUs, at least one, and never more than the default.
//
// The agent shares its node with the workloads it serves, and with a
// processor per CPU Go's scheduler wakes an idle thread for every goroutine
// a request readies (the NBD reader hands a request to a worker, the worker
// a frame to the link's sender), which then steals it from the busy one:
// a futex wakeup and a context switch per hand-off, on CPUs the client and
// the other member want too. With fewer processors than CPUs more of a
// request's goroutines run one after another on the thread that readied
// them; its system calls still run in parallel (a processor blocked in a
// system call is handed to another thread). Measured side by side on two
// shared CPUs (docs/benchmarks.md, analysis item 14): CPU per GiB written
// or read 6–22 % lower for the standalone agent and both pairs, and 1 MiB
// writes of a pair 7–17 % faster.
func agentProcs(numCPU, current int) int {
	n := max(numCPU/2, 1)
	return min(n, current)
}

// setAgentProcs applies agentProcs unless GOMAXPROCS is set in the
// environment (which then decides, as for any Go program). It returns the
// processors the agent runs with and whether it changed them. Once set,
// the Go runtime no longer follows later changes of the container's CPU
// limit; a restart does.
func setAgentProcs() (int, bool) {
	current := runtime.GOMAXPROCS(0)
	if os.Getenv("GOMAXPROCS") != "" {
		return current, false
	}
	n := agentProcs(runtime.NumCPU(), current)
	if n == current {
		return current, false
	}
	runtime.GOMAXPROCS(n)
	return n, true
}
