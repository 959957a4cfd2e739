package router_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/router/routertest"
)

func TestMemoryLister(t *testing.T) {
	routertest.RunLister(t, true, func(*testing.T) router.Router { return router.NewMemory() })
}

func TestRedisLister(t *testing.T) {
	routertest.RunLister(t, false, func(t *testing.T) router.Router {
		r, _, _ := newTestRedis(t)
		return r
	})
}

// benchList lists the 5,000 sessions of appcode 101 spread over two
// gateways (10,000 in the table, half of another appcode) and reports
// the cost per listed session: what a broadcast pays the router.
func benchList(b *testing.B, r router.Router, gates []string) {
	ctx := context.Background()
	for i := range 10_000 {
		s := router.Session{Account: 1, AppCode: uint32(101 + i%2), UID: uint64(1 + i/2), Gate: []string{"ga", "gb"}[i/2%2], Conn: uint64(1 + i), Epoch: uint64(1 + i)}
		if _, err := r.Register(ctx, s, 1); err != nil {
			b.Fatal(err)
		}
	}
	l := r.(router.SessionLister)
	b.ResetTimer()
	cpu0 := processCPU()
	for range b.N {
		n := 0
		if err := l.ListSessions(ctx, gates, 101, 1024, func(_ string, ss []router.Session) error { n += len(ss); return nil }); err != nil {
			b.Fatal(err)
		}
		if n != 5_000 {
			b.Fatalf("listed %d sessions, want 5000", n)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/5_000, "ns/session")
	b.ReportMetric(float64((processCPU()-cpu0).Nanoseconds())/float64(b.N)/5_000, "cpu-ns/session")
}

// processCPU is the CPU time (user and system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func BenchmarkMemoryListSessions(b *testing.B) { benchList(b, router.NewMemory(), nil) }

func BenchmarkRedisListSessions(b *testing.B) {
	r, _, _ := newTestRedis(b)
	benchList(b, r, []string{"ga", "gb"})
}
