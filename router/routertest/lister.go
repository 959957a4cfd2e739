package routertest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/imd-dev/imd/router"
)

// RunLister runs the conformance tests of router.SessionLister against
// routers made by newRouter, which must implement it. allGates says
// whether the router lists every gateway when none is named (the
// in-process one does; the Redis one needs them named).
func RunLister(t *testing.T, allGates bool, newRouter func(t *testing.T) router.Router) {
	t.Run("Pages", func(t *testing.T) { testListPages(t, lister(t, newRouter)) })
	t.Run("Many", func(t *testing.T) { testListMany(t, lister(t, newRouter)) })
	t.Run("Stop", func(t *testing.T) { testListStop(t, lister(t, newRouter)) })
	t.Run("AllGates", func(t *testing.T) {
		r := lister(t, newRouter)
		register(t, r, sess(1, 101, 1, "ga", 1, 1), 1)
		err := r.(router.SessionLister).ListSessions(context.Background(), nil, 0, 0, func(string, []router.Session) error { return nil })
		if allGates != (err == nil) {
			t.Fatalf("listing every gateway: %v (expected to work: %v)", err, allGates)
		}
	})
}

func lister(t *testing.T, newRouter func(t *testing.T) router.Router) router.Router {
	r := newRouter(t)
	if _, ok := r.(router.SessionLister); !ok {
		t.Fatalf("%T is not a router.SessionLister", r)
	}
	return r
}

// listed lists gates and checks the pages: at most page sessions each, all
// of one gateway, of appcode (0: any), no session twice.
func listed(t *testing.T, r router.Router, gates []string, appcode uint32, page int) map[string][]router.Session {
	t.Helper()
	out := map[string][]router.Session{}
	seen := map[string]bool{}
	err := r.(router.SessionLister).ListSessions(context.Background(), gates, appcode, page, func(gate string, ss []router.Session) error {
		if len(ss) == 0 || len(ss) > page {
			return fmt.Errorf("a page of %d sessions (page %d)", len(ss), page)
		}
		for _, s := range ss {
			key := fmt.Sprint(s.Gate, "/", s.Conn)
			switch {
			case s.Gate != gate:
				return fmt.Errorf("a session of gate %q in a page of %q", s.Gate, gate)
			case appcode != 0 && s.AppCode != appcode:
				return fmt.Errorf("a session of appcode %d listed for %d", s.AppCode, appcode)
			case seen[key]:
				return fmt.Errorf("session %s listed twice", key)
			}
			seen[key] = true
		}
		out[gate] = append(out[gate], ss...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func conns(ss []router.Session) []uint64 {
	out := make([]uint64, len(ss))
	for i, s := range ss {
		out[i] = s.Conn
	}
	slices.Sort(out)
	return out
}

func testListPages(t *testing.T, r router.Router) {
	// uid 1: two sessions of 101 on ga; uid 2: 101 on ga and 102 on gb;
	// uid 3: 101 on xga (a gate id ending like ga); uid 4: 101 on another
	// DC's mirrored gate; uid 5: 101 on gb.
	all := []router.Session{
		sess(1, 101, 1, "ga", 11, 1), sess(1, 101, 1, "ga", 12, 2),
		sess(1, 101, 2, "ga", 21, 3), sess(1, 102, 2, "gb", 22, 4),
		sess(1, 101, 3, "xga", 31, 5), sess(1, 101, 4, "@dc2/ga", 41, 6),
		sess(1, 101, 5, "gb", 51, 7),
	}
	for _, s := range all {
		register(t, r, s, 2)
	}
	got := listed(t, r, []string{"ga", "gb"}, 101, 2)
	if len(got) != 2 || !slices.Equal(conns(got["ga"]), []uint64{11, 12, 21}) || !slices.Equal(conns(got["gb"]), []uint64{51}) {
		t.Fatalf("appcode 101 on ga and gb: %v", got)
	}
	for _, s := range got["ga"] {
		if s.Account != 1 || s.UID == 0 || s.Epoch == 0 {
			t.Fatalf("listed session %+v", s)
		}
		// A listed session is the login itself: Unregister takes it.
		found := slices.ContainsFunc(lookup(t, r, s.User()), func(o router.Session) bool { return o.Same(&s) })
		if !found {
			t.Fatalf("listed session %+v is not a login of its user", s)
		}
	}
	got = listed(t, r, []string{"gb", "xga", "@dc2/ga", "nowhere"}, 0, 10)
	if len(got) != 3 || !slices.Equal(conns(got["gb"]), []uint64{22, 51}) || !slices.Equal(conns(got["xga"]), []uint64{31}) || !slices.Equal(conns(got["@dc2/ga"]), []uint64{41}) {
		t.Fatalf("every appcode on gb, xga, a mirror and an unknown gate: %v", got)
	}
	// Ended sessions are not listed.
	unregister(t, r, all[0])
	if got = listed(t, r, []string{"ga"}, 101, 1); !slices.Equal(conns(got["ga"]), []uint64{12, 21}) {
		t.Fatalf("after a logout: %v", got)
	}
}

func testListMany(t *testing.T, r router.Router) {
	const n = 1500
	for i := range n {
		gate := "ga"
		if i%3 == 0 {
			gate = "gb"
		}
		app := uint32(101)
		if i%5 == 0 {
			app = 102
		}
		register(t, r, sess(1, app, uint64(1+i), gate, uint64(1+i), uint64(1+i)), 1)
	}
	got := listed(t, r, []string{"ga", "gb"}, 101, 128)
	want := map[string]int{}
	for i := range n {
		if i%5 != 0 {
			if i%3 == 0 {
				want["gb"]++
			} else {
				want["ga"]++
			}
		}
	}
	if len(got["ga"]) != want["ga"] || len(got["gb"]) != want["gb"] {
		t.Fatalf("listed %d on ga and %d on gb, want %v", len(got["ga"]), len(got["gb"]), want)
	}
}

func testListStop(t *testing.T, r router.Router) {
	for i := range 10 {
		register(t, r, sess(1, 101, uint64(1+i), "ga", uint64(1+i), uint64(1+i)), 1)
	}
	stop := errors.New("stop")
	calls := 0
	err := r.(router.SessionLister).ListSessions(context.Background(), []string{"ga"}, 101, 2, func(string, []router.Session) error {
		calls++
		return stop
	})
	if !errors.Is(err, stop) || calls != 1 {
		t.Fatalf("fn's error: %v after %d calls", err, calls)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.(router.SessionLister).ListSessions(ctx, []string{"ga"}, 101, 2, func(string, []router.Session) error { return nil }); err == nil {
		t.Fatal("a cancelled listing succeeded")
	}
}
