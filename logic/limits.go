package logic

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/schema"
	"github.com/prometheus/client_golang/prometheus"
)

// Limits are logic's rate limits (token buckets), each kept per logic
// node: a cluster of N nodes lets through up to N times as much. Both are
// off (0) by default, because load tests send thousands of messages a
// second from few users. What is over a limit is refused with
// StatusRateLimited (3001), HTTP 429 on the HTTP API, and counted in
// imd_logic_rate_limited_total{limit}.
type Limits struct {
	// C2CSendsPerUser bounds the stored messages (one-to-one and group
	// sends; transient ones have their own limit, Transient) one user
	// sends, over all its terminals.
	C2CSendsPerUser ratelimit.Rate `yaml:"c2c_sends_per_user"`
	// PushesPerApp bounds the s2c pushes (POST /v1/push) of one app,
	// whichever of its API keys signs them: a key is the app's.
	PushesPerApp ratelimit.Rate `yaml:"pushes_per_app"`
	// DiscoveryPerIP bounds the gateway lists (GET /v1/gateways, which
	// takes no API key) one source address asks for, an IPv6 one by its
	// /64; addresses of acl.ip_allow bypass it. Over it: HTTP 429.
	DiscoveryPerIP ratelimit.Rate `yaml:"discovery_per_ip"`
}

// Labels of imd_logic_rate_limited_total.
const (
	limC2CSend   = "c2c_send"
	limPush      = "push"
	limTransient = "transient"
	limDiscovery = "discovery"
)

// limits holds logic's buckets; a nil bucket is a limit that is off.
type limits struct {
	sends     *ratelimit.Keyed[das.User]
	pushes    *ratelimit.Keyed[uint32]
	discovery *ratelimit.Keyed[netip.Addr] // by ratelimit.Source
	m         *prometheus.CounterVec
}

func newLimits(l Limits, reg prometheus.Registerer) (*limits, error) {
	if err := l.C2CSendsPerUser.Validate("limits.c2c_sends_per_user"); err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	if err := l.PushesPerApp.Validate("limits.pushes_per_app"); err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	if err := l.DiscoveryPerIP.Validate("limits.discovery_per_ip"); err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	lim := &limits{
		sends:     ratelimit.NewKeyed[das.User](l.C2CSendsPerUser),
		pushes:    ratelimit.NewKeyed[uint32](l.PushesPerApp),
		discovery: ratelimit.NewKeyed[netip.Addr](l.DiscoveryPerIP),
		m: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "imd", Subsystem: "logic", Name: "rate_limited_total",
			Help: "Requests refused for a rate limit (status 3001), by limit: c2c_send (per user), push (per app), transient (per user), discovery (GET /v1/gateways, per source address).",
		}, []string{"limit"}),
	}
	if reg != nil {
		if err := reg.Register(lim.m); err != nil {
			return nil, fmt.Errorf("logic: metrics: %w", err)
		}
	}
	return lim, nil
}

// allowSend takes a token of u's send bucket, or returns the 3001 error.
func (l *limits) allowSend(u das.User) error {
	if l.sends.Allow(u, time.Now()) {
		return nil
	}
	l.m.WithLabelValues(limC2CSend).Inc()
	return schema.Errorf(schema.StatusRateLimited, "over %g messages a second for this user; retry later", l.sends.Rate().Rate)
}

// allowPush takes a token of app's push bucket, or returns the 3001 error.
func (l *limits) allowPush(app uint32) error {
	if l.pushes.Allow(app, time.Now()) {
		return nil
	}
	l.m.WithLabelValues(limPush).Inc()
	return schema.Errorf(schema.StatusRateLimited, "over %g pushes a second for this app; retry later", l.pushes.Rate().Rate)
}
