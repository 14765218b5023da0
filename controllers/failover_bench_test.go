package controllers

import (
	"context"
	"slices"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// BenchmarkFailover measures the time from killing the writer's agent to the
// first write the other member accepts, with the default failover settings
// (probe every 2 s, 3 failed probes, 6 s authority Lease) and with tight ones
// (probe every 1 s, 2 failed probes, 3 s Lease: the agent renews its Leases
// every second, so 3 s is the shortest Lease that survives one missed
// renewal). Each iteration is one failover; the killed member is then
// restored and resynced (untimed) and becomes the backup for the next one.
// It reports min/median/max.
//
//	go test -run '^$' -bench Failover -benchtime 10x ./controllers/
func BenchmarkFailover(b *testing.B) {
	for _, tc := range []struct {
		name                    string
		probe, threshold, lease int32
	}{
		{"default", 2, 3, 6},
		{"tight", 1, 2, 3},
	} {
		b.Run(tc.name, func(b *testing.B) {
			benchmarkFailover(b, v1.FailoverSpec{Policy: v1.PolicyAutomatic, ProbePeriodSeconds: tc.probe,
				FailureThreshold: tc.threshold, LeaseDurationSeconds: tc.lease})
		})
	}
}

func benchmarkFailover(b *testing.B, fo v1.FailoverSpec) {
	s := newStory(b, v1.ModeAsync, func(vp *v1.VolumePair) {
		vp.Spec.Failover = fo
		vp.Spec.Failback.Policy = v1.PolicyManual
	})
	startManager(b, s.log, nil)
	if err := k8s.Create(context.Background(), s.vp); err != nil {
		b.Fatal(err)
	}
	writer, other := s.a, s.b
	s.waitFor(30*time.Second, "PAIR in sync", pairInSync(writer.name))
	var times []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if err := s.write(writer, 0, pattern(byte(i), 4096)); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		writer.kill()
		start := time.Now()
		for s.write(other, 4096, pattern(byte(i), 4096)) != nil {
			if time.Since(start) > 30*time.Second {
				b.Fatal("no failover within 30 s")
			}
			time.Sleep(10 * time.Millisecond)
		}
		d := time.Since(start)
		b.StopTimer()
		times = append(times, d)
		writer.start()
		s.waitFor(60*time.Second, "resynced after failover", pairInSync(other.name))
		writer, other = other, writer
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(times)
	b.ReportMetric(times[0].Seconds(), "min-s")
	b.ReportMetric(times[len(times)/2].Seconds(), "median-s")
	b.ReportMetric(times[len(times)-1].Seconds(), "max-s")
	b.Logf("failover times (primary killed → first write accepted on the backup): %v", times)
}
