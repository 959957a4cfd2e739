package gateway

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	conns        prometheus.Gauge
	accepted     prometheus.Counter
	acceptErrors prometheus.Counter
	rejected     *prometheus.CounterVec
	closed       *prometheus.CounterVec
	kicked       prometheus.Counter
	framesIn     prometheus.Counter
	framesOut    prometheus.Counter
	writes       prometheus.Counter
	errorsOut    *prometheus.CounterVec
	rateLimited  *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	opts := func(name, help string) prometheus.CounterOpts {
		return prometheus.CounterOpts{Namespace: "imd", Subsystem: "gateway", Name: name, Help: help}
	}
	m := &metrics{
		conns: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "gateway",
			Name: "connections", Help: "Connections held now."}),
		accepted:     prometheus.NewCounter(opts("accepted_total", "Connections accepted by the listener.")),
		acceptErrors: prometheus.NewCounter(opts("accept_errors_total", "Transient accept failures (e.g. out of file descriptors).")),
		rejected:     prometheus.NewCounterVec(opts("rejected_total", "Connections refused at accept, by status."), []string{"status"}),
		closed:       prometheus.NewCounterVec(opts("closed_total", "Connections closed by the gateway, by reason."), []string{"reason"}),
		kicked:       prometheus.NewCounter(opts("kicked_total", "Connections kicked out.")),
		framesIn:     prometheus.NewCounter(opts("frames_in_total", "Frames read from clients.")),
		framesOut:    prometheus.NewCounter(opts("frames_out_total", "Frames written to clients.")),
		writes:       prometheus.NewCounter(opts("writes_total", "Write system calls; frames_out/writes is the batching factor.")),
		errorsOut:    prometheus.NewCounterVec(opts("error_responses_total", "Error responses sent, by status."), []string{"status"}),
		rateLimited: prometheus.NewCounterVec(opts("rate_limited_total",
			"Refusals for a rate limit (status 3001), by limit: conns_per_ip, conns, logins_per_ip, logins_per_uid, login_lockout, frames, bytes; closed counts connections closed for keeping on over their budget."), []string{"limit"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.conns, m.accepted, m.acceptErrors, m.rejected, m.closed, m.kicked, m.framesIn, m.framesOut, m.writes, m.errorsOut, m.rateLimited} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("gateway: metrics: %w", err)
			}
		}
	}
	return m, nil
}
