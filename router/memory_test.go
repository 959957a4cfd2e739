package router_test

import (
	"context"
	"testing"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/router/routertest"
)

func TestMemoryConformance(t *testing.T) {
	routertest.Run(t, func(*testing.T) router.Router { return router.NewMemory() })
}

// BenchmarkMemoryLookupMany looks up a dispatch's 50 recipients among 5,000
// online users with one session each.
func BenchmarkMemoryLookupMany(b *testing.B) {
	m := router.NewMemory()
	ctx := context.Background()
	for uid := range uint64(5000) {
		s := router.Session{Account: 1, AppCode: 101, UID: uid + 1, Gate: "gw-1", Conn: uid + 1, Epoch: 1}
		if _, err := m.Register(ctx, s, 1); err != nil {
			b.Fatal(err)
		}
	}
	us := make([]router.User, 50)
	for i := range us {
		us[i] = router.User{Account: 1, UID: uint64(i*97%5000) + 1}
	}
	b.ReportAllocs()
	for b.Loop() {
		out, _ := m.LookupMany(ctx, us)
		if len(out[0]) != 1 {
			b.Fatal("missing session")
		}
	}
}
