package config

import (
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/ratelimit"
)

// TestLimits: the rate limits are off by default and read from the
// `limits:` section, IMD_LIMIT_* variables and --limit-* flags.
func TestLimits(t *testing.T) {
	c, err := load(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Limits != (Limits{}) {
		t.Fatalf("limits on by default: %+v", c.Limits)
	}
	file := writeFile(t, `
limits:
  conns_per_ip: {rate: 20, burst: 50}
  login_failures: 10
  login_lockout: 10m
  frames: {rate: 100}
  c2c_sends_per_user: {rate: 30, burst: 60}
`)
	env := map[string]string{"IMD_LIMIT_PUSHES_PER_APP": "500:1000", "IMD_LIMIT_FRAMES": "200"}
	c, err = load(t, []string{"--config", file, "--limit-logins-per-ip=5:10"}, env)
	if err != nil {
		t.Fatal(err)
	}
	g, l := c.Limits.Gateway, c.Limits.Logic
	switch {
	case g.ConnsPerIP != ratelimit.Rate{Rate: 20, Burst: 50},
		g.LoginFailures != 10 || g.LoginLockout != 10*time.Minute,
		g.Frames != ratelimit.Rate{Rate: 200},
		g.LoginsPerIP != ratelimit.Rate{Rate: 5, Burst: 10},
		l.C2CSendsPerUser != ratelimit.Rate{Rate: 30, Burst: 60},
		l.PushesPerApp != ratelimit.Rate{Rate: 500, Burst: 1000}:
		t.Fatalf("limits %+v", c.Limits)
	}
	if _, err := load(t, []string{"--limit-frames=fast"}, nil); err == nil {
		t.Fatal("a rate that is not a number was accepted")
	}
}
