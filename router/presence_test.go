package router_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/imd-dev/imd/router"
	"github.com/redis/rueidis"
)

// withoutVersions drops the presence version keys from keys, after checking
// that those of offline users expire (a user that went offline leaves only
// that key, for a week).
func withoutVersions(t *testing.T, raw rueidis.Client, keys []string) []string {
	t.Helper()
	all := slices.Clone(keys)
	return slices.DeleteFunc(keys, func(k string) bool {
		if !strings.Contains(k, "v:{") {
			return false
		}
		if slices.Contains(all, strings.Replace(k, "v:{", "u:{", 1)) {
			return true // online: its version lives as long as its sessions
		}
		if ttl, _ := do(t, raw, "TTL", k).AsInt64(); ttl <= 0 {
			t.Fatalf("version key %s of an offline user has TTL %d", k, ttl)
		}
		return true
	})
}

func presenceRouters(t *testing.T) map[string]func(t *testing.T) router.Presence {
	return map[string]func(t *testing.T) router.Presence{
		"memory": func(*testing.T) router.Presence { return router.NewMemory() },
		"redis": func(t *testing.T) router.Presence {
			r, _, _ := newTestRedis(t)
			return r
		},
	}
}

// TestPresenceChanges: a user's first session is one online change, its
// last one leaving (logout or a purged gate) one offline change, and
// nothing in between; each change has a greater version than the last,
// which States reports.
func TestPresenceChanges(t *testing.T) {
	for name, mk := range presenceRouters(t) {
		t.Run(name, func(t *testing.T) {
			r := mk(t)
			ctx := t.Context()
			phone := mkSession(1, 5, "g1", 1, 10)
			pc := mkSession(2, 5, "g2", 2, 11)
			var last uint64
			step := func(what string, ch router.Change, wantChange, online bool) {
				t.Helper()
				if ch.Changed() != wantChange {
					t.Fatalf("%s: change %+v, want changed=%v", what, ch, wantChange)
				}
				if !wantChange {
					return
				}
				if ch.Online != online || ch.Version <= last || ch.User != phone.User() || ch.AtMS == 0 {
					t.Fatalf("%s: change %+v (last version %d), want online=%v", what, ch, last, online)
				}
				last = ch.Version
				st, err := r.States(ctx, []router.User{phone.User()})
				if err != nil || st[0].Version != last {
					t.Fatalf("%s: States = %+v, %v; want version %d", what, st, err, last)
				}
			}
			_, ch, err := r.RegisterChange(ctx, phone, 1)
			if err != nil {
				t.Fatal(err)
			}
			step("first login", ch, true, true)
			if !slices.Equal(ch.Apps, []uint32{1}) {
				t.Fatalf("apps %v", ch.Apps)
			}
			_, ch, _ = r.RegisterChange(ctx, pc, 1)
			step("second terminal", ch, false, false)
			_, ch, _ = r.RegisterChange(ctx, phone, 1)
			step("re-announced", ch, false, false)
			newer := mkSession(1, 5, "g1", 3, 12)
			ev, ch, _ := r.RegisterChange(ctx, newer, 1)
			if len(ev) != 1 {
				t.Fatalf("evicted %v", ev)
			}
			step("replaced on its terminal", ch, false, false)
			ok, ch, _ := r.UnregisterChange(ctx, pc)
			if !ok {
				t.Fatal("pc not removed")
			}
			step("one of two leaves", ch, false, false)
			ok, ch, _ = r.UnregisterChange(ctx, newer)
			if !ok {
				t.Fatal("the last session not removed")
			}
			step("the last leaves", ch, true, false)
			ok, ch, _ = r.UnregisterChange(ctx, newer)
			if ok {
				t.Fatal("removed twice")
			}
			step("a stale logout", ch, false, false)

			// A dead gateway: users whose only sessions were there go
			// offline, one with a session elsewhere stays online.
			_, ch, _ = r.RegisterChange(ctx, newer, 1)
			step("online again", ch, true, true)
			other := mkSession(1, 6, "g1", 4, 13)
			otherPC := mkSession(2, 6, "g2", 5, 14)
			r.RegisterChange(ctx, other, 1)
			r.RegisterChange(ctx, otherPC, 1)
			purged, offline, err := r.PurgeGateChanges(ctx, "g1")
			if err != nil || len(purged) != 2 || len(offline) != 1 {
				t.Fatalf("PurgeGateChanges = %+v, %+v, %v; want 2 sessions and 1 user offline", purged, offline, err)
			}
			step("its gateway died", offline[0], true, false)
		})
	}
}

// TestPresenceFollow: a session's list is replaced by the next Follow and
// dropped by Unfollow; in Redis nothing of it is left then.
func TestPresenceFollow(t *testing.T) {
	for name, mk := range presenceRouters(t) {
		t.Run(name, func(t *testing.T) {
			r := mk(t)
			ctx := t.Context()
			sub := mkSession(1, 100, "g1", 1, 10)
			sub2 := mkSession(2, 100, "g2", 2, 11)
			a, b, c := router.User{Account: 7, UID: 1}, router.User{Account: 7, UID: 2}, router.User{Account: 7, UID: 3}
			followers := func(u router.User) []router.Session {
				t.Helper()
				ss, err := r.Followers(ctx, u)
				if err != nil {
					t.Fatal(err)
				}
				slices.SortFunc(ss, func(x, y router.Session) int { return int(x.AppCode) - int(y.AppCode) })
				for i := range ss {
					ss[i].DeviceID, ss[i].LoginMS = "d", 1
				}
				return ss
			}
			if err := r.Follow(ctx, sub, []router.User{a, b, a}); err != nil {
				t.Fatal(err)
			}
			if err := r.Follow(ctx, sub2, []router.User{b}); err != nil {
				t.Fatal(err)
			}
			if got := followers(a); !slices.Equal(got, []router.Session{sub}) {
				t.Fatalf("followers of a %+v", got)
			}
			if got := followers(b); !slices.Equal(got, []router.Session{sub, sub2}) {
				t.Fatalf("followers of b %+v", got)
			}
			if err := r.Follow(ctx, sub, []router.User{c}); err != nil {
				t.Fatal(err)
			}
			if got := followers(a); len(got) != 0 {
				t.Fatalf("a still followed by %+v after the list was replaced", got)
			}
			if got := followers(b); !slices.Equal(got, []router.Session{sub2}) {
				t.Fatalf("followers of b %+v", got)
			}
			if got := followers(c); !slices.Equal(got, []router.Session{sub}) {
				t.Fatalf("followers of c %+v", got)
			}
			for _, s := range []router.Session{sub, sub2} {
				if err := r.Unfollow(ctx, s); err != nil {
					t.Fatal(err)
				}
			}
			for _, u := range []router.User{a, b, c} {
				if got := followers(u); len(got) != 0 {
					t.Fatalf("%+v followed by %+v after Unfollow", u, got)
				}
			}
		})
	}
}

// TestRedisPresenceKeys: a session's subscriptions leave no key behind
// once it unfollows.
func TestRedisPresenceKeys(t *testing.T) {
	r, raw, p := newTestRedis(t)
	sub := mkSession(1, 100, "g1", 1, 10)
	if err := r.Follow(t.Context(), sub, []router.User{{Account: 7, UID: 1}, {Account: 7, UID: 2}}); err != nil {
		t.Fatal(err)
	}
	want := []string{p + "pf:{7:1}", p + "pf:{7:2}", p + "pl:{7:100}:1:00000000000000000010:1:g1"}
	if got := prefixKeys(t, raw, p); !slices.Equal(got, want) {
		t.Fatalf("keys %v, want %v", got, want)
	}
	if err := r.Unfollow(t.Context(), sub); err != nil {
		t.Fatal(err)
	}
	if got := prefixKeys(t, raw, p); len(got) != 0 {
		t.Fatalf("keys left after Unfollow: %v", got)
	}
}
