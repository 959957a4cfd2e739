// Package testenv finds the real servers that integration tests use, the
// ones `scripts/services.sh up` starts on 127.0.0.1. A test that needs one
// and cannot reach it fails under CI=true (CI starts them all) and skips
// otherwise, saying how to start it.
package testenv

import (
	"net"
	"os"
	"testing"
	"time"
)

// Redis returns the address of the test Redis: IMD_TEST_REDIS, else
// 127.0.0.1:6379, once it accepts a connection.
func Redis(tb testing.TB) string {
	tb.Helper()
	addr := os.Getenv("IMD_TEST_REDIS")
	if addr == "" {
		addr = "127.0.0.1:6379"
	}
	need(tb, "Redis", "redis", "IMD_TEST_REDIS", addr)
	return addr
}

func need(tb testing.TB, what, service, env, addr string) {
	tb.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		_ = c.Close()
		return
	}
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true and no %s at %s (%s): %v", what, addr, env, err)
	}
	tb.Skipf("no %s at %s (%v): run `scripts/services.sh up %s` (or set %s)", what, addr, err, service, env)
}
