// Package routertest is the conformance suite of router.Router: every
// implementation runs the same assertions, so the in-process table and the
// Redis one cannot drift apart.
package routertest

import (
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"

	"github.com/imd-dev/imd/router"
)

// Run checks every documented behaviour of router.Router on routers made by
// newRouter. Each subtest gets a fresh, empty router; newRouter registers
// its own cleanup with t.
func Run(t *testing.T, newRouter func(t *testing.T) router.Router) {
	tests := []struct {
		name string
		fn   func(t *testing.T, r router.Router)
	}{
		{"RegisterLookupRoundTrip", testRoundTrip},
		{"UnknownUser", testUnknownUser},
		{"EvictOldestPerAppCode", testEvict},
		{"MaxPerTerminalBelowOne", testMaxBelowOne},
		{"EvictSeveralAtOnce", testEvictSeveral},
		{"EpochOrderWideNumbers", testEpochOrder},
		{"AccountsAreDistinctUsers", testAccounts},
		{"UnregisterExactLogin", testUnregisterExact},
		{"StaleUnregister", testStaleUnregister},
		{"LookupCallerOwned", testLookupOwned},
		{"LookupMany", testLookupMany},
		{"PurgeGate", testPurgeGate},
		{"Stats", testStats},
		{"ConcurrentSameUser", testConcurrent},
		{"ReannounceSameLogin", testReannounce},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newRouter(t)) })
	}
}

// epochBase is above 2^53, so neighbouring epochs are the same float64:
// an implementation that orders epochs as doubles fails the suite.
const epochBase = uint64(1)<<62 + 1

func sess(account, app uint32, uid uint64, gate string, conn, epoch uint64) router.Session {
	return router.Session{
		Account: account, AppCode: app, UID: uid, Gate: gate, Conn: conn, Epoch: epoch,
		DeviceID: fmt.Sprintf("dev-%d-%d", conn, epoch), LoginMS: 1_700_000_000_000 + int64(conn),
	}
}

func register(t *testing.T, r router.Router, s router.Session, maxPerTerminal int) []router.Session {
	t.Helper()
	ev, err := r.Register(t.Context(), s, maxPerTerminal)
	if err != nil {
		t.Fatalf("Register(%+v, %d): %v", s, maxPerTerminal, err)
	}
	return ev
}

func unregister(t *testing.T, r router.Router, s router.Session) bool {
	t.Helper()
	ok, err := r.Unregister(t.Context(), s)
	if err != nil {
		t.Fatalf("Unregister(%+v): %v", s, err)
	}
	return ok
}

func lookup(t *testing.T, r router.Router, u router.User) []router.Session {
	t.Helper()
	ss, err := r.Lookup(t.Context(), u)
	if err != nil {
		t.Fatalf("Lookup(%+v): %v", u, err)
	}
	return ss
}

func stats(t *testing.T, r router.Router) router.Stats {
	t.Helper()
	st, err := r.Stats(t.Context())
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	return st
}

func wantSessions(t *testing.T, what string, got []router.Session, want ...router.Session) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !slices.Equal(got, want) {
		t.Fatalf("%s:\n got  %+v\n want %+v", what, got, want)
	}
}

func wantStats(t *testing.T, r router.Router, users, sessions int) {
	t.Helper()
	if st := stats(t, r); st.Users != users || st.Sessions != sessions {
		t.Fatalf("Stats = %+v, want {Users:%d Sessions:%d}", st, users, sessions)
	}
}

func testRoundTrip(t *testing.T, r router.Router) {
	a := sess(1, 10, 42, "gate-a", 7, epochBase)
	a.DeviceID = "iPhone 15: \"x|y\" {z} 设备"
	a.LoginMS = 1_731_000_000_123
	b := sess(1, 20, 42, "gate:b{odd}", math.MaxUint64, epochBase+1)
	b.DeviceID = ""
	b.LoginMS = 0
	c := sess(1, 30, 42, "gate-c", 0, epochBase+2)
	c.LoginMS = -5
	for _, s := range []router.Session{a, b, c} {
		if ev := register(t, r, s, 1); len(ev) != 0 {
			t.Fatalf("Register(%+v) evicted %+v from other appcodes", s, ev)
		}
	}
	wantSessions(t, "Lookup", lookup(t, r, a.User()), a, b, c)
}

func testUnknownUser(t *testing.T, r router.Router) {
	register(t, r, sess(1, 1, 1, "g", 1, epochBase), 1)
	if ss := lookup(t, r, router.User{Account: 1, UID: 2}); len(ss) != 0 {
		t.Fatalf("Lookup of an unknown user = %+v, want none", ss)
	}
	if ok := unregister(t, r, sess(1, 1, 2, "g", 1, epochBase)); ok {
		t.Fatal("Unregister of an unknown user reported true")
	}
}

func testEvict(t *testing.T, r router.Router) {
	other := sess(1, 2, 5, "g1", 100, epochBase)
	register(t, r, other, 1)
	s1 := sess(1, 1, 5, "g1", 1, epochBase+1)
	s2 := sess(1, 1, 5, "g2", 2, epochBase+2)
	s3 := sess(1, 1, 5, "g1", 3, epochBase+3)
	s4 := sess(1, 1, 5, "g3", 4, epochBase+4)
	wantSessions(t, "evicted by s1", register(t, r, s1, 2))
	wantSessions(t, "evicted by s2", register(t, r, s2, 2))
	wantSessions(t, "evicted by s3", register(t, r, s3, 2), s1)
	wantSessions(t, "Lookup after s3", lookup(t, r, s1.User()), other, s2, s3)
	wantSessions(t, "evicted by s4", register(t, r, s4, 2), s2)
	wantSessions(t, "Lookup after s4", lookup(t, r, s1.User()), other, s3, s4)
	wantStats(t, r, 1, 3)
	if unregister(t, r, s1) || unregister(t, r, s2) {
		t.Fatal("Unregister of an evicted session reported true")
	}
}

func testMaxBelowOne(t *testing.T, r router.Router) {
	for i, limit := range []int{0, -1, math.MinInt} {
		uid := uint64(100 + i)
		s1 := sess(1, 1, uid, "g", 1, epochBase+1)
		s2 := sess(1, 1, uid, "g", 2, epochBase+2)
		wantSessions(t, fmt.Sprintf("max %d, first", limit), register(t, r, s1, limit))
		wantSessions(t, fmt.Sprintf("max %d, second", limit), register(t, r, s2, limit), s1)
		wantSessions(t, fmt.Sprintf("max %d, Lookup", limit), lookup(t, r, s1.User()), s2)
	}
}

func testEvictSeveral(t *testing.T, r router.Router) {
	var ss []router.Session
	for i := range uint64(4) {
		s := sess(1, 1, 9, fmt.Sprintf("g%d", i%2), i, epochBase+i)
		wantSessions(t, "evicted", register(t, r, s, 4))
		ss = append(ss, s)
	}
	web := sess(1, 3, 9, "g0", 50, epochBase+50)
	register(t, r, web, 1)
	last := sess(1, 1, 9, "g1", 60, epochBase+60)
	wantSessions(t, "evicted with max 2", register(t, r, last, 2), ss[0], ss[1], ss[2])
	wantSessions(t, "Lookup", lookup(t, r, last.User()), ss[3], web, last)
}

func testEpochOrder(t *testing.T, r router.Router) {
	// Different decimal widths, two epochs a float64 cannot tell apart,
	// and the largest uint64.
	epochs := []uint64{9, 10, 1<<53 + 1, 1<<53 + 2, 1<<63 - 1, math.MaxUint64 - 1}
	var ss []router.Session
	for i, e := range epochs {
		s := sess(2, 1, 77, "g", uint64(i), e)
		wantSessions(t, "evicted", register(t, r, s, 10))
		ss = append(ss, s)
	}
	wantSessions(t, "Lookup", lookup(t, r, ss[0].User()), ss...)
	last := sess(2, 1, 77, "g", 99, math.MaxUint64)
	wantSessions(t, "evicted with max 3", register(t, r, last, 3), ss[:4]...)
	wantSessions(t, "Lookup after evicting", lookup(t, r, last.User()), ss[4], ss[5], last)
}

func testAccounts(t *testing.T, r router.Router) {
	// The same uid and appcode in two account systems, on the same gate,
	// connection id and epoch: still two users.
	a := sess(1, 1, 500, "g", 1, epochBase)
	b := sess(2, 1, 500, "g", 1, epochBase)
	b.DeviceID = "other"
	wantSessions(t, "evicted by a", register(t, r, a, 1))
	wantSessions(t, "evicted by b", register(t, r, b, 1))
	wantSessions(t, "Lookup account 1", lookup(t, r, a.User()), a)
	wantSessions(t, "Lookup account 2", lookup(t, r, b.User()), b)
	wantStats(t, r, 2, 2)
	if !unregister(t, r, b) {
		t.Fatal("Unregister(b) = false")
	}
	wantSessions(t, "Lookup account 1 after unregistering account 2", lookup(t, r, a.User()), a)
	wantSessions(t, "Lookup account 2 after unregistering it", lookup(t, r, b.User()))
	wantStats(t, r, 1, 1)
}

func testUnregisterExact(t *testing.T, r router.Router) {
	s := sess(1, 1, 3, "g1", 10, epochBase+10)
	other := sess(1, 2, 3, "g1", 11, epochBase+11)
	register(t, r, s, 1)
	register(t, r, other, 1)
	near := []router.Session{s, s, s, s, s}
	near[0].Gate = "g2"
	near[1].Conn++
	near[2].Epoch++
	near[3].AppCode = 2
	near[4].UID++
	for _, n := range near {
		if unregister(t, r, n) {
			t.Fatalf("Unregister(%+v) removed a different login %+v", n, s)
		}
	}
	wantSessions(t, "Lookup after near misses", lookup(t, r, s.User()), s, other)
	// DeviceID and LoginMS are not part of the login's identity.
	ds := s
	ds.DeviceID, ds.LoginMS = "changed", 1
	if !unregister(t, r, ds) {
		t.Fatal("Unregister of the exact login = false")
	}
	if unregister(t, r, s) {
		t.Fatal("second Unregister of the same login = true")
	}
	wantSessions(t, "Lookup after Unregister", lookup(t, r, s.User()), other)
	if !unregister(t, r, other) {
		t.Fatal("Unregister(other) = false")
	}
	wantSessions(t, "Lookup after removing all", lookup(t, r, s.User()))
	wantStats(t, r, 0, 0)
}

func testStaleUnregister(t *testing.T, r router.Router) {
	old := sess(1, 1, 8, "g1", 1, epochBase+1)
	register(t, r, old, 1)
	// A re-login on the same gate and connection with a newer epoch.
	newer := old
	newer.Epoch = epochBase + 2
	wantSessions(t, "evicted by re-login", register(t, r, newer, 1), old)
	if unregister(t, r, old) {
		t.Fatal("stale Unregister (older epoch) removed the newer session")
	}
	wantSessions(t, "Lookup after stale Unregister", lookup(t, r, old.User()), newer)
	// A login elsewhere, then the first connection's late disconnect.
	moved := sess(1, 1, 8, "g2", 5, epochBase+3)
	wantSessions(t, "evicted by move", register(t, r, moved, 1), newer)
	if unregister(t, r, newer) {
		t.Fatal("stale Unregister of an evicted login = true")
	}
	wantSessions(t, "Lookup after move", lookup(t, r, old.User()), moved)
}

func testLookupOwned(t *testing.T, r router.Router) {
	a := sess(1, 1, 4, "g", 1, epochBase+1)
	b := sess(1, 2, 4, "g", 2, epochBase+2)
	register(t, r, a, 1)
	register(t, r, b, 1)
	got := lookup(t, r, a.User())
	got[0].Gate, got[0].DeviceID = "scribbled", "scribbled"
	grown := append(got[:1], sess(1, 3, 4, "x", 3, 3)) // writes into got's array
	if len(grown) != 2 {
		t.Fatal("append")
	}
	wantSessions(t, "Lookup after changing an earlier result", lookup(t, r, a.User()), a, b)
}

func testLookupMany(t *testing.T, r router.Router) {
	ctx := t.Context()
	out, err := r.LookupMany(ctx, nil)
	if err != nil || len(out) != 0 {
		t.Fatalf("LookupMany(nil) = %v, %v", out, err)
	}
	a1 := sess(1, 1, 1, "g1", 1, epochBase+1)
	a2 := sess(1, 2, 1, "g2", 2, epochBase+2)
	b := sess(1, 1, 2, "g1", 3, epochBase+3)
	c := sess(2, 1, 1, "g1", 4, epochBase+4) // same uid as a, other account
	for _, s := range []router.Session{a1, a2, b, c} {
		register(t, r, s, 1)
	}
	us := []router.User{a1.User(), {Account: 1, UID: 999}, b.User(), a1.User(), c.User(), {Account: 3, UID: 1}}
	out, err = r.LookupMany(ctx, us)
	if err != nil {
		t.Fatalf("LookupMany: %v", err)
	}
	if len(out) != len(us) {
		t.Fatalf("LookupMany returned %d lists for %d users", len(out), len(us))
	}
	wantSessions(t, "out[0]", out[0], a1, a2)
	wantSessions(t, "out[1] (unknown)", out[1])
	wantSessions(t, "out[2]", out[2], b)
	wantSessions(t, "out[3] (duplicate of 0)", out[3], a1, a2)
	wantSessions(t, "out[4] (other account)", out[4], c)
	wantSessions(t, "out[5] (unknown account)", out[5])
	out[0][0].Gate = "scribbled"
	wantSessions(t, "out[3] after changing out[0]", out[3], a1, a2)
	wantSessions(t, "Lookup after changing out[0]", lookup(t, r, a1.User()), a1, a2)
}

func testPurgeGate(t *testing.T, r router.Router) {
	ctx := t.Context()
	// Gate names that are prefixes of each other, and odd characters.
	const g1, g10, g2 = "g1", "g10", "g:2{x}"
	var keep []router.Session
	var n uint64
	for uid := uint64(1); uid <= 20; uid++ {
		for _, g := range []string{g1, g10, g2} {
			if (uid%3 == 0 && g != g1) || (uid%5 == 0 && g == g1) {
				continue // some users only on g1, some never on it
			}
			n++
			s := sess(1, uint32(n%4), uid, g, n, epochBase+n)
			register(t, r, s, 10)
			if g != g1 {
				keep = append(keep, s)
			}
		}
	}
	before := stats(t, r)
	purged, err := r.PurgeGate(ctx, g1)
	if err != nil {
		t.Fatalf("PurgeGate: %v", err)
	}
	if want := before.Sessions - len(keep); purged != want {
		t.Fatalf("PurgeGate(%q) = %d, want %d", g1, purged, want)
	}
	users := map[router.User]bool{}
	for _, s := range keep {
		users[s.User()] = true
	}
	wantStats(t, r, len(users), len(keep))
	for uid := uint64(1); uid <= 20; uid++ {
		u := router.User{Account: 1, UID: uid}
		var want []router.Session
		for _, s := range keep {
			if s.User() == u {
				want = append(want, s)
			}
		}
		wantSessions(t, fmt.Sprintf("Lookup(%d) after purge", uid), lookup(t, r, u), want...)
	}
	for _, g := range []string{g1, "nope", ""} {
		if n, err := r.PurgeGate(ctx, g); err != nil || n != 0 {
			t.Fatalf("PurgeGate(%q) = %d, %v; want 0, nil", g, n, err)
		}
	}
	if n, err := r.PurgeGate(ctx, g2); err != nil || n != len(keep)-countGate(keep, g10) {
		t.Fatalf("PurgeGate(%q) = %d, %v", g2, n, err)
	}
	if n, err := r.PurgeGate(ctx, g10); err != nil || n != countGate(keep, g10) {
		t.Fatalf("PurgeGate(%q) = %d, %v", g10, n, err)
	}
	wantStats(t, r, 0, 0)
	// A gate that is purged and comes back is indexed again.
	s := sess(1, 1, 1, g1, 1000, epochBase+1000)
	register(t, r, s, 1)
	if n, err := r.PurgeGate(ctx, g1); err != nil || n != 1 {
		t.Fatalf("PurgeGate(%q) after re-registering = %d, %v; want 1", g1, n, err)
	}
	wantStats(t, r, 0, 0)
}

func countGate(ss []router.Session, gate string) int {
	n := 0
	for _, s := range ss {
		if s.Gate == gate {
			n++
		}
	}
	return n
}

func testStats(t *testing.T, r router.Router) {
	wantStats(t, r, 0, 0)
	a := sess(1, 1, 1, "g", 1, epochBase+1)
	b := sess(1, 2, 1, "g", 2, epochBase+2)
	c := sess(1, 1, 2, "g", 3, epochBase+3)
	d := sess(1, 1, 2, "g", 4, epochBase+4)
	for _, s := range []router.Session{a, b, c} {
		register(t, r, s, 1)
	}
	wantStats(t, r, 2, 3)
	register(t, r, d, 1) // evicts c
	wantStats(t, r, 2, 3)
	unregister(t, r, d)
	wantStats(t, r, 1, 2)
	unregister(t, r, a)
	unregister(t, r, b)
	wantStats(t, r, 0, 0)
}

// testConcurrent has many goroutines log the same user in and out at once
// and checks that every login is accounted for exactly once: evicted,
// unregistered, or still in the table, and never more than maxPerTerminal
// per appcode.
func testConcurrent(t *testing.T, r router.Router) {
	const (
		workers = 16
		rounds  = 40
		limit   = 3
	)
	ctx := t.Context()
	var (
		mu         sync.Mutex
		registered = map[router.Session]bool{}
		gone       = map[router.Session]string{} // login -> how it left
		epoch      uint64
		wg         sync.WaitGroup
		errs       = make(chan error, workers)
	)
	nextEpoch := func() uint64 {
		mu.Lock()
		defer mu.Unlock()
		epoch++
		return epochBase + epoch
	}
	leave := func(s router.Session, how string) error {
		mu.Lock()
		defer mu.Unlock()
		if !registered[s] {
			return fmt.Errorf("%s a login that was never registered: %+v", how, s)
		}
		if prev, ok := gone[s]; ok {
			return fmt.Errorf("login %+v left twice: %s, then %s", s, prev, how)
		}
		gone[s] = how
		return nil
	}
	for w := range workers {
		wg.Go(func() {
			gate := fmt.Sprintf("gate-%d", w%4)
			for i := range rounds {
				s := sess(1, uint32(w%2), 4242, gate, uint64(w*rounds+i), nextEpoch())
				mu.Lock()
				registered[s] = true
				mu.Unlock()
				ev, err := r.Register(ctx, s, limit)
				if err != nil {
					errs <- err
					return
				}
				for _, e := range ev {
					if err := leave(e, "evicted"); err != nil {
						errs <- err
						return
					}
				}
				if i%3 != 0 {
					continue
				}
				ok, err := r.Unregister(ctx, s)
				if err != nil {
					errs <- err
					return
				}
				if ok {
					if err := leave(s, "unregistered"); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	left := lookup(t, r, router.User{Account: 1, UID: 4242})
	perApp := map[uint32]int{}
	for _, s := range left {
		perApp[s.AppCode]++
		if _, ok := gone[s]; ok {
			t.Fatalf("login %+v is in the table but was %s", s, gone[s])
		}
		if !registered[s] {
			t.Fatalf("login %+v is in the table but was never registered", s)
		}
	}
	for app, n := range perApp {
		if n > limit {
			t.Fatalf("appcode %d has %d sessions, max %d", app, n, limit)
		}
	}
	if len(left)+len(gone) != len(registered) {
		t.Fatalf("%d logins registered, %d left the table, %d remain: some are lost", len(registered), len(gone), len(left))
	}
	users := 1
	if len(left) == 0 { // every worker's last login (i = 39) logs out: the newest may all be gone
		users = 0
	}
	wantStats(t, r, users, len(left))
	t.Logf("%d logins: %d evicted or unregistered, %d remain", len(registered), len(gone), len(left))
}

// testReannounce: registering the same login again (a gateway announcing
// its sessions after a router restart) keeps one copy and evicts nothing,
// so nobody kicks a live connection.
func testReannounce(t *testing.T, r router.Router) {
	a := sess(1, 101, 7, "g1", 1, epochBase)
	register(t, r, a, 1)
	again := a
	again.DeviceID = "dev-renamed"
	if ev := register(t, r, again, 1); len(ev) != 0 {
		t.Fatalf("re-announcing a login evicted %+v", ev)
	}
	wantSessions(t, "after re-announce", lookup(t, r, router.User{Account: 1, UID: 7}), again)
}
