package gateway

import (
	"net/http"
	"testing"

	"github.com/gobwas/ws"
	"github.com/imd-dev/imd/internal/ratelimit"
)

// A WebSocket upgrade over the new-connection rate is answered 429.
func TestWSUpgradeRateLimited(t *testing.T) {
	s := startWSServer(t, func(o *Options) { o.Limits.ConnsPerIP = ratelimit.Rate{Rate: 0.01, Burst: 1} })
	if _, err := dialWS(t, s, nil); err != nil {
		t.Fatalf("first upgrade: %v", err)
	}
	if _, err := dialWS(t, s, nil); err == nil {
		t.Fatal("an upgrade over the rate was let in")
	} else if hs, ok := err.(ws.StatusError); !ok || int(hs) != http.StatusTooManyRequests {
		t.Fatalf("got %v, want 429", err)
	}
	if got := counter(s.m.rateLimited.WithLabelValues(limConnsPerIP)); got != 1 {
		t.Fatalf("rate_limited{conns_per_ip} %v, want 1", got)
	}
}
