package bus

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// producerMetrics are the producer's counters; a nil *producerMetrics
// records nothing.
type producerMetrics struct {
	produced prometheus.Counter
	errors   *prometheus.CounterVec
	latency  prometheus.Histogram
}

func newProducerMetrics(reg prometheus.Registerer) (*producerMetrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &producerMetrics{
		produced: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "imd", Subsystem: "bus",
			Name: "produced_total", Help: "Records the broker acknowledged."}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "bus",
			Name: "produce_errors_total", Help: "Failed Produce calls, by kind (unavailable, too_large, unknown_topic, closed, other)."},
			[]string{"kind"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "imd", Subsystem: "bus",
			Name: "produce_seconds", Help: "Time from Produce to the broker's acknowledgment, successful calls only.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}), // 0.5ms .. 16s
	}
	for _, c := range []prometheus.Collector{m.produced, m.errors, m.latency} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("bus: metrics: %w", err)
		}
	}
	for _, k := range []string{kindUnavailable, kindTooLarge, kindUnknownTopic, kindClosed, kindOther} {
		m.errors.WithLabelValues(k) // export zeros, so rates work from the start
	}
	return m, nil
}

func (m *producerMetrics) ok(d time.Duration) {
	if m == nil {
		return
	}
	m.produced.Inc()
	m.latency.Observe(d.Seconds())
}

func (m *producerMetrics) fail(kind string) {
	if m == nil {
		return
	}
	m.errors.WithLabelValues(kind).Inc()
}
