//go:build unix

package bitmap

import (
	"syscall"
	"testing"
	"time"
)

// cpuMeter reports process CPU time (user+system, all threads, GC included)
// per operation as "cpu-ns/op". On a shared machine wall-clock ns/op includes
// time the benchmark was not scheduled; CPU time does not.
type cpuMeter struct{ start time.Duration }

func startCPU() cpuMeter { return cpuMeter{start: processCPU()} }

func (m cpuMeter) report(b *testing.B) {
	b.ReportMetric(float64((processCPU()-m.start).Nanoseconds())/float64(b.N), "cpu-ns/op")
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
