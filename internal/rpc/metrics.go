package rpc

import (
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the internal RPC's Prometheus metrics. One set serves every
// link of a process (a node that runs both sides shares it); a nil
// *Metrics records nothing.
type Metrics struct {
	links   *prometheus.GaugeVec
	calls   *prometheus.CounterVec
	latency *prometheus.HistogramVec
	served  *prometheus.CounterVec
}

// NewMetrics registers the metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		links: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "rpc", Name: "links",
			Help: "Internal RPC links open, by this end's side: gateway (dialled to logic) or logic (accepted from gateways)."}, []string{"side"}),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "rpc", Name: "calls_total",
			Help: "Internal RPC requests this process sent, by command and resulting status."}, []string{"cmd", "status"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "imd", Subsystem: "rpc", Name: "call_seconds",
			Help:    "Internal RPC request to response, by command.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}, []string{"cmd"}),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "rpc", Name: "served_total",
			Help: "Internal RPC requests and notifies this process served, by command and status."}, []string{"cmd", "status"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.links, m.calls, m.latency, m.served} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (m *Metrics) link(side string, delta float64) {
	if m != nil {
		m.links.WithLabelValues(side).Add(delta)
	}
}

func (m *Metrics) call(cmd schema.Cmd, err error, d time.Duration) {
	if m == nil {
		return
	}
	m.calls.WithLabelValues(cmd.String(), statusLabel(err)).Inc()
	m.latency.WithLabelValues(cmd.String()).Observe(d.Seconds())
}

func (m *Metrics) serve(cmd schema.Cmd, err error) {
	if m != nil {
		m.served.WithLabelValues(cmd.String(), statusLabel(err)).Inc()
	}
}

// watchGone publishes how many disconnects wait for a logic node.
func (m *Metrics) watchGone(reg prometheus.Registerer, c *Client) error {
	if m == nil || reg == nil {
		return nil
	}
	return reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "rpc", Name: "disconnects_waiting",
		Help: "Disconnects kept because no logic node was reachable; sent when one is."}, func() float64 { return float64(c.Gone()) }))
}

func statusLabel(err error) string {
	if err == nil {
		return schema.StatusOK.String()
	}
	if se, ok := err.(*schema.Error); ok {
		return se.Status.String()
	}
	return schema.StatusInternal.String()
}
