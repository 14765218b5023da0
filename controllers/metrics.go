package controllers

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

var (
	phaseGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "tandem_volumepair_phase", Help: "1 for the pair's current phase.",
	}, []string{"namespace", "name", "phase"})
	failoversTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tandem_volumepair_failovers_total", Help: "Failovers (backup promoted) per pair.",
	}, []string{"namespace", "name"})
	failoverSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tandem_failover_duration_seconds", Help: "From a writer becoming suspect to the backup's promotion.",
		Buckets: []float64{0.5, 1, 2, 4, 6, 8, 10, 15, 30, 60},
	})
	outOfSyncGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "tandem_volumepair_out_of_sync_bytes", Help: "Bytes a copy would transfer now.",
	}, []string{"namespace", "name"})
	copyDoneGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "tandem_volumepair_copy_done_bytes", Help: "Bytes copied by the running resync.",
	}, []string{"namespace", "name"})
)

func init() {
	metrics.Registry.MustRegister(MetricsCollectors()...)
}

// MetricsCollectors returns the collectors of the manager's own metrics, the
// ones init registers with controller-runtime's registry (served on the
// manager's /metrics next to controller-runtime's). The chart's alerts and
// dashboard are checked against them (test/monitoring).
func MetricsCollectors() []prometheus.Collector {
	return []prometheus.Collector{phaseGauge, failoversTotal, failoverSeconds, outOfSyncGauge, copyDoneGauge}
}

func recordMetrics(vp *v1.VolumePair) {
	for _, p := range []v1.Phase{v1.PhasePending, v1.PhasePair, v1.PhaseSwap, v1.PhaseCopy, v1.PhaseNormal} {
		val := 0.0
		if vp.Status.Phase == p {
			val = 1
		}
		phaseGauge.WithLabelValues(vp.Namespace, vp.Name, string(p)).Set(val)
	}
	outOfSyncGauge.WithLabelValues(vp.Namespace, vp.Name).Set(float64(vp.Status.OutOfSyncBytes))
	done := 0.0
	if vp.Status.Copy != nil {
		done = float64(vp.Status.Copy.DoneBytes)
	}
	copyDoneGauge.WithLabelValues(vp.Namespace, vp.Name).Set(done)
}

func forgetMetrics(vp *v1.VolumePair) {
	for _, p := range []v1.Phase{v1.PhasePending, v1.PhasePair, v1.PhaseSwap, v1.PhaseCopy, v1.PhaseNormal} {
		phaseGauge.DeleteLabelValues(vp.Namespace, vp.Name, string(p))
	}
	outOfSyncGauge.DeleteLabelValues(vp.Namespace, vp.Name)
	copyDoneGauge.DeleteLabelValues(vp.Namespace, vp.Name)
	failoversTotal.DeleteLabelValues(vp.Namespace, vp.Name)
}
