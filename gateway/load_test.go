package gateway

import (
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
)

// TestLoggedInCount: LoggedIn counts the connections that logged in, not
// those still before their login, and drops one at its logout and at its
// close, once each.
func TestLoggedInCount(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		a, b, c := dialClient(t, s), dialClient(t, s), dialClient(t, s)
		eventually(t, 5*time.Second, "three connections held", func() bool { return s.Conns() == 3 })
		if n := s.LoggedIn(); n != 0 {
			t.Fatalf("LoggedIn %d before any login", n)
		}
		a.login(1)
		b.login(2)
		if n := s.LoggedIn(); n != 2 {
			t.Fatalf("LoggedIn %d after two logins (a third connection not logged in)", n)
		}
		a.write(logoutFrame(2))
		a.expect(2, schema.StatusOK)
		eventually(t, 5*time.Second, "the logout counted", func() bool { return s.LoggedIn() == 1 })
		_ = b.nc.Close()
		_ = c.nc.Close()
		eventually(t, 5*time.Second, "the closes counted", func() bool { return s.Conns() == 0 && s.LoggedIn() == 0 })
		time.Sleep(50 * time.Millisecond) // nothing counted twice
		if n := s.LoggedIn(); n != 0 {
			t.Fatalf("LoggedIn %d with no connection left", n)
		}
	})
}
