package router_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/router/routertest"
)

// newTestRedis returns a router on the test Redis under a random prefix of
// its own, and a raw client on the same Redis; both are closed, and the
// prefix's keys deleted, when tb ends. Without Redis the test skips, or
// fails under CI=true. The Redis is a Redis Cluster with
// IMD_TEST_REDIS_MODE=cluster (testRedisAddrs).
func newTestRedis(tb testing.TB) (*router.Redis, rueidis.Client, string) {
	tb.Helper()
	addr := testRedisAddrs(tb)
	prefix := fmt.Sprintf("imdtest:%016x:", rand.Uint64())
	r, err := router.NewRedis(router.RedisOptions{Addrs: addr, Prefix: prefix, DialTimeout: 2 * time.Second})
	if err != nil {
		tb.Fatalf("router on the Redis at %s: %v", addr, err)
	}
	raw, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: addr, DisableCache: true})
	if err != nil {
		r.Close()
		tb.Fatalf("raw client: %v", err)
	}
	tb.Cleanup(func() {
		r.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		keys := prefixKeys(tb, raw, prefix)
		cmds := make(rueidis.Commands, len(keys))
		for i, k := range keys {
			cmds[i] = raw.B().Unlink().Key(k).Build()
		}
		for i, res := range raw.DoMulti(ctx, cmds...) {
			if err := res.Error(); err != nil {
				tb.Errorf("cleanup %s: %v", keys[i], err)
			}
		}
		raw.Close()
	})
	return r, raw, prefix
}

// prefixKeys lists the keys under prefix, sorted (of every node of a
// cluster).
func prefixKeys(tb testing.TB, c rueidis.Client, prefix string) []string {
	tb.Helper()
	ctx := context.Background()
	var keys []string
	for _, c := range c.Nodes() {
		keys = append(keys, nodeKeys(tb, ctx, c, prefix)...)
	}
	slices.Sort(keys)
	return keys
}

func nodeKeys(tb testing.TB, ctx context.Context, c rueidis.Client, prefix string) []string {
	tb.Helper()
	var keys []string
	var cursor uint64
	for {
		e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			tb.Fatalf("scan %s*: %v", prefix, err)
		}
		keys = append(keys, e.Elements...)
		if cursor = e.Cursor; cursor == 0 {
			return keys
		}
	}
}

func do(t *testing.T, c rueidis.Client, args ...string) rueidis.RedisResult {
	t.Helper()
	res := c.Do(t.Context(), c.B().Arbitrary(args[0]).Args(args[1:]...).Build())
	if err := res.Error(); err != nil && !rueidis.IsRedisNil(err) {
		t.Fatalf("%v: %v", args, err)
	}
	return res
}

func TestRedisConformance(t *testing.T) {
	routertest.Run(t, func(t *testing.T) router.Router {
		r, _, _ := newTestRedis(t)
		return r
	})
}

func mkSession(app uint32, uid uint64, gate string, conn, epoch uint64) router.Session {
	return router.Session{Account: 7, AppCode: app, UID: uid, Gate: gate, Conn: conn, Epoch: epoch, DeviceID: "d", LoginMS: 1}
}

func mustRegister(t *testing.T, r router.Router, s router.Session, maxPerTerminal int) []router.Session {
	t.Helper()
	ev, err := r.Register(t.Context(), s, maxPerTerminal)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	return ev
}

// TestRedisKeyLayout pins the documented layout: a hash per user with the
// user as hash tag, and a set per gate.
func TestRedisKeyLayout(t *testing.T) {
	r, raw, p := newTestRedis(t)
	s := router.Session{Account: 3, AppCode: 12, UID: 42, Gate: "gw-1", Conn: 9, Epoch: 77, DeviceID: "dev:1", LoginMS: 1234}
	mustRegister(t, r, s, 1)
	if got, want := prefixKeys(t, raw, p), []string{p + "g:{gw-1}", p + "u:{3:42}", p + "v:{3:42}"}; !slices.Equal(got, want) {
		t.Fatalf("keys %v, want %v", got, want)
	}
	h, _ := do(t, raw, "HGETALL", p+"u:{3:42}").AsStrMap()
	if want := map[string]string{"12:00000000000000000077:9:gw-1": "1234:dev:1"}; fmt.Sprint(h) != fmt.Sprint(want) {
		t.Fatalf("user hash %v, want %v", h, want)
	}
	m, _ := do(t, raw, "SMEMBERS", p+"g:{gw-1}").AsStrSlice()
	if !slices.Equal(m, []string{"3:42"}) {
		t.Fatalf("gate set %v", m)
	}
}

// TestRedisReannounce: a gateway re-announcing a login the table already
// holds (after a router restart) replaces it and evicts nothing, not even
// with maxPerTerminal 1.
func TestRedisReannounce(t *testing.T) {
	r, _, _ := newTestRedis(t)
	s := mkSession(1, 6, "g", 1, 10)
	mustRegister(t, r, s, 1)
	s.DeviceID = "renamed"
	if ev := mustRegister(t, r, s, 1); len(ev) != 0 {
		t.Fatalf("re-announcing evicted %+v", ev)
	}
	if ss, err := r.Lookup(t.Context(), s.User()); err != nil || !slices.Equal(ss, []router.Session{s}) {
		t.Fatalf("Lookup = %+v, %v", ss, err)
	}
}

// TestRedisCorruptEntries: fields and values the router cannot read are
// skipped and counted, never a crash or an error.
func TestRedisCorruptEntries(t *testing.T) {
	r, raw, p := newTestRedis(t)
	good := mkSession(1, 5, "g", 1, 100)
	mustRegister(t, r, good, 5)
	key := p + "u:{7:5}"
	do(t, raw, "HSET", key,
		"garbage", "x",
		"1:123:1:g", "1:d", // epoch not 20 digits
		"1:00000000000000000050:1:g", "notanumber:d", // bad value
		"99999999999:00000000000000000050:1:g", "1:d", // appcode overflows uint32
		"\xff\x00", "\x00")
	before := r.Corrupt()
	ss, err := r.Lookup(t.Context(), good.User())
	if err != nil || !slices.Equal(ss, []router.Session{good}) {
		t.Fatalf("Lookup = %+v, %v; want only the good session", ss, err)
	}
	if got := r.Corrupt() - before; got != 5 {
		t.Fatalf("Corrupt grew by %d, want 5", got)
	}
	many, err := r.LookupMany(t.Context(), []router.User{good.User()})
	if err != nil || !slices.Equal(many[0], []router.Session{good}) {
		t.Fatalf("LookupMany = %+v, %v", many, err)
	}
	// The Lua scripts skip them too: a register evicts only real logins,
	// and the bad-value field of appcode 1 is evicted and reported as
	// corrupt rather than returned.
	next := mkSession(1, 5, "g", 2, 200)
	if ev := mustRegister(t, r, next, 1); !slices.Equal(ev, []router.Session{good}) {
		t.Fatalf("evicted %+v, want the good session only", ev)
	}
	// Purging a gate also drops the unreadable fields that still name it
	// (next, "1:123:1:g" and the overflowing appcode), and counts them.
	if n, err := r.PurgeGate(t.Context(), "g"); err != nil || n != 3 {
		t.Fatalf("PurgeGate = %d, %v; want 3", n, err)
	}

	// A heartbeat value that is not a node.
	if _, err := r.Heartbeat(t.Context(), router.Node{ID: "a", Role: "gateway"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	do(t, raw, "SET", p+"m:{gateway}:b", "{not json")
	do(t, raw, "SADD", p+"m:{gateway}", "b")
	before = r.Corrupt()
	live, err := r.Live(t.Context(), "gateway")
	if err != nil || len(live) != 1 || live[0].ID != "a" {
		t.Fatalf("Live = %+v, %v", live, err)
	}
	if r.Corrupt() != before+1 {
		t.Fatal("a corrupt heartbeat was not counted")
	}
}

// TestRedisGateIndex: PurgeGate is right when the gate's set has stale
// members, and the sets are emptied as sessions leave, so that nothing is
// left in Redis once every login is gone.
func TestRedisGateIndex(t *testing.T) {
	r, raw, p := newTestRedis(t)
	a := mkSession(1, 1, "g1", 1, 10)
	b := mkSession(1, 2, "g2", 2, 11) // user 2 only on g2
	mustRegister(t, r, a, 1)
	mustRegister(t, r, b, 1)
	do(t, raw, "SADD", p+"g:{g1}", "7:2", "7:999", "nonsense", "")
	if n, err := r.PurgeGate(t.Context(), "g1"); err != nil || n != 1 {
		t.Fatalf("PurgeGate(g1) = %d, %v; want 1", n, err)
	}
	if ss, _ := r.Lookup(t.Context(), b.User()); !slices.Equal(ss, []router.Session{b}) {
		t.Fatalf("a stale member of g1 lost its g2 session: %+v", ss)
	}
	if got := withoutVersions(t, raw, prefixKeys(t, raw, p)); !slices.Equal(got, []string{p + "g:{g2}", p + "u:{7:2}"}) {
		t.Fatalf("keys after purge: %v", got)
	}
	if ok, err := r.Unregister(t.Context(), b); !ok || err != nil {
		t.Fatalf("Unregister = %v, %v", ok, err)
	}

	// Logins, evictions across gates and logouts leave no key behind.
	var live []router.Session
	for i := range uint64(60) {
		s := mkSession(uint32(i%3), i%7, fmt.Sprintf("g%d", i%4), i, 1000+i)
		for _, e := range mustRegister(t, r, s, 2) {
			live = slices.DeleteFunc(live, func(o router.Session) bool { return o.Same(&e) && o.User() == e.User() })
		}
		live = append(live, s)
	}
	for _, s := range live {
		if ok, err := r.Unregister(t.Context(), s); !ok || err != nil {
			t.Fatalf("Unregister(%+v) = %v, %v", s, ok, err)
		}
	}
	if got := withoutVersions(t, raw, prefixKeys(t, raw, p)); len(got) != 0 {
		t.Fatalf("keys left after every login left: %v", got)
	}
}

// TestRedisRegisterAtomic: many clients (separate connections) log the
// same terminal in at once; the per-user script keeps exactly
// maxPerTerminal sessions and every other login is evicted exactly once.
func TestRedisRegisterAtomic(t *testing.T) {
	const (
		clients = 4
		workers = 24
		limit   = 2
	)
	first, _, p := newTestRedis(t)
	rs := []*router.Redis{first}
	for range clients - 1 {
		r, err := router.NewRedis(router.RedisOptions{Addrs: testRedisAddrs(t), Prefix: p})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(r.Close)
		rs = append(rs, r)
	}
	var (
		mu      sync.Mutex
		evicted = map[uint64]int{}
		wg      sync.WaitGroup
		start   = make(chan struct{})
	)
	for w := range workers {
		wg.Go(func() {
			<-start
			s := mkSession(1, 1, fmt.Sprintf("g%d", w%3), uint64(w), uint64(1)<<60+uint64(w))
			ev, err := rs[w%clients].Register(t.Context(), s, limit)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			for _, e := range ev {
				evicted[e.Conn]++
			}
			mu.Unlock()
		})
	}
	close(start)
	wg.Wait()
	ss, err := first.Lookup(t.Context(), router.User{Account: 7, UID: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(ss) != limit {
		t.Fatalf("%d sessions left, want %d: %+v", len(ss), limit, ss)
	}
	for conn, n := range evicted {
		if n != 1 {
			t.Fatalf("login %d evicted %d times", conn, n)
		}
	}
	for _, s := range ss {
		if evicted[s.Conn] != 0 {
			t.Fatalf("login %d is both evicted and registered", s.Conn)
		}
	}
	if len(evicted)+len(ss) != workers {
		t.Fatalf("%d evicted + %d left != %d logins", len(evicted), len(ss), workers)
	}
}

// holdProxy forwards TCP connections to a Redis. Once armed, it holds the
// first client write that contains marker until release is closed: a test
// can stop one client between two of its commands.
type holdProxy struct {
	addr    string
	marker  []byte
	armed   atomic.Bool
	held    chan struct{} // closed when a write is being held
	release chan struct{}
}

func newHoldProxy(t *testing.T, target, marker string) *holdProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &holdProxy{addr: ln.Addr().String(), marker: []byte(marker), held: make(chan struct{}), release: make(chan struct{})}
	var conns sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		conns.Wait()
	})
	conns.Go(func() { // tracked too, so no Go can follow the Wait
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			conns.Go(func() { _, _ = io.Copy(c, s); c.Close() })
			conns.Go(func() {
				defer s.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if bytes.Contains(buf[:n], p.marker) && p.armed.CompareAndSwap(true, false) {
						close(p.held)
						<-p.release
					}
					if _, err := s.Write(buf[:n]); err != nil {
						return
					}
				}
			})
		}
	})
	return p
}

// TestRedisGateIndexRace: the gate's index cannot change atomically with
// a user's hash. A logout that empties the user's sessions on gate g is
// held between its script and its SREM from g's index, while another
// login of that user on g completes; the login must stay indexed, or a
// purge of g would miss it.
func TestRedisGateIndexRace(t *testing.T) {
	skipOnCluster(t, "the proxy holds one connection, and a cluster client dials every node itself")
	r, raw, p := newTestRedis(t)
	proxy := newHoldProxy(t, testenv.Redis(t), "SREM")
	churner, err := router.NewRedis(router.RedisOptions{Addrs: []string{proxy.addr}, Prefix: p})
	if err != nil {
		t.Fatal(err)
	}
	defer churner.Close()
	ctx := t.Context()
	out := mkSession(1, 5, "g", 1, 1)
	stay := mkSession(2, 5, "g", 2, 2)
	if _, err := churner.Register(ctx, out, 1); err != nil {
		t.Fatal(err)
	}
	proxy.armed.Store(true)
	done := make(chan error, 1)
	go func() {
		ok, err := churner.Unregister(ctx, out)
		if err == nil && !ok {
			err = errors.New("Unregister = false")
		}
		done <- err
	}()
	select {
	case <-proxy.held:
	case <-time.After(5 * time.Second):
		t.Fatal("the logout never sent its SREM")
	}
	mustRegister(t, r, stay, 1)
	close(proxy.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if ok, _ := do(t, raw, "SISMEMBER", p+"g:{g}", "7:5").AsBool(); !ok {
		t.Fatal("the login that raced the logout is not in the gate's index")
	}
	if n, err := r.PurgeGate(ctx, "g"); err != nil || n != 1 {
		t.Fatalf("PurgeGate = %d, %v; want 1", n, err)
	}
}

func TestRedisMembership(t *testing.T) {
	r, raw, p := newTestRedis(t)
	ctx := t.Context()
	const ttl = 300 * time.Millisecond
	g1 := router.Node{ID: "gw-1", Role: "gateway", Addr: "10.0.0.1:7000", DC: "dc1"}
	g2 := router.Node{ID: "gw-2", Role: "gateway", Addr: "10.0.0.2:7000", DC: "dc2"}
	lg := router.Node{ID: "logic/10.0.0.3:7100", Role: "logic", Addr: "10.0.0.3:7100", DC: "dc1"}
	for _, n := range []router.Node{g2, g1, lg} {
		if _, err := r.Heartbeat(ctx, n, ttl); err != nil {
			t.Fatalf("Heartbeat(%+v): %v", n, err)
		}
	}
	live := func(role string) []router.Node {
		t.Helper()
		ns, err := r.Live(ctx, role)
		if err != nil {
			t.Fatalf("Live(%s): %v", role, err)
		}
		return ns
	}
	expired := func(role string) []string {
		t.Helper()
		ids, err := r.Expired(ctx, role)
		if err != nil {
			t.Fatalf("Expired(%s): %v", role, err)
		}
		return ids
	}
	if got := live("gateway"); !slices.Equal(got, []router.Node{g1, g2}) {
		t.Fatalf("Live(gateway) = %+v", got)
	}
	if got := live("logic"); !slices.Equal(got, []router.Node{lg}) {
		t.Fatalf("Live(logic) = %+v", got)
	}
	if got := live("router"); len(got) != 0 {
		t.Fatalf("Live(router) = %+v", got)
	}
	if pttl, _ := do(t, raw, "PTTL", p+"m:{gateway}:gw-1").AsInt64(); pttl <= 0 || pttl > ttl.Milliseconds() {
		t.Fatalf("heartbeat PTTL %dms, want (0, %d]", pttl, ttl.Milliseconds())
	}
	if got := expired("gateway"); len(got) != 0 {
		t.Fatalf("Expired while all heartbeat: %v", got)
	}

	// g2 leaves cleanly; g1 and the logic node keep heartbeating for
	// longer than the ttl; then g1 stops.
	if err := r.Leave(ctx, g2); err != nil {
		t.Fatal(err)
	}
	if got := live("gateway"); !slices.Equal(got, []router.Node{g1}) {
		t.Fatalf("Live(gateway) after Leave = %+v", got)
	}
	for range 6 {
		time.Sleep(ttl / 3)
		for _, n := range []router.Node{g1, lg} {
			if _, err := r.Heartbeat(ctx, n, ttl); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := live("gateway"); !slices.Equal(got, []router.Node{g1}) {
		t.Fatalf("Live(gateway) while heartbeating = %+v", got)
	}
	if got := expired("gateway"); len(got) != 0 {
		t.Fatalf("Expired while g1 heartbeats, after g2 left: %v", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(live("gateway"))+len(live("logic")) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("g1 still live 5s after its last heartbeat")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := expired("gateway"); !slices.Equal(got, []string{"gw-1"}) {
		t.Fatalf("Expired(gateway) = %v, want [gw-1]", got)
	}
	if got := expired("gateway"); len(got) != 0 {
		t.Fatalf("second Expired(gateway) = %v, want none", got)
	}
	if got := expired("logic"); !slices.Equal(got, []string{lg.ID}) {
		t.Fatalf("Expired(logic) = %v", got)
	}
	// A node that comes back is live again.
	if _, err := r.Heartbeat(ctx, g1, time.Minute); err != nil {
		t.Fatal(err)
	}
	if got := live("gateway"); !slices.Equal(got, []router.Node{g1}) {
		t.Fatalf("Live(gateway) after return = %+v", got)
	}
	if err := r.Leave(ctx, g1); err != nil {
		t.Fatal(err)
	}
	if got := prefixKeys(t, raw, p); len(got) != 0 {
		t.Fatalf("keys left after every node left: %v", got)
	}

	// Bad input is an error, not a key.
	for _, bad := range []struct {
		n   router.Node
		ttl time.Duration
	}{{router.Node{Role: "gateway"}, ttl}, {router.Node{ID: "x"}, ttl}, {g1, 0}, {g1, -time.Second}} {
		if _, err := r.Heartbeat(ctx, bad.n, bad.ttl); err == nil || !strings.HasPrefix(err.Error(), "router: redis heartbeat") {
			t.Fatalf("Heartbeat(%+v, %v) = %v, want an error", bad.n, bad.ttl, err)
		}
	}
	if err := r.Leave(ctx, router.Node{}); err == nil {
		t.Fatal("Leave of an empty node succeeded")
	}

	// A retired node is gone from Live at once and reported by the next
	// Expired, once; its next heartbeat says it joined anew.
	if joined, err := r.Heartbeat(ctx, g2, time.Minute); err != nil || !joined {
		t.Fatalf("first heartbeat: joined %v, %v", joined, err)
	}
	if joined, err := r.Heartbeat(ctx, g2, time.Minute); err != nil || joined {
		t.Fatalf("second heartbeat: joined %v, %v", joined, err)
	}
	if err := r.Retire(ctx, g2); err != nil {
		t.Fatal(err)
	}
	if got := live("gateway"); len(got) != 0 {
		t.Fatalf("Live(gateway) after Retire = %+v", got)
	}
	if got := expired("gateway"); !slices.Equal(got, []string{"gw-2"}) {
		t.Fatalf("Expired(gateway) after Retire = %v, want [gw-2]", got)
	}
	if got := expired("gateway"); len(got) != 0 {
		t.Fatalf("second Expired(gateway) after Retire = %v", got)
	}
	if joined, err := r.Heartbeat(ctx, g2, time.Minute); err != nil || !joined {
		t.Fatalf("heartbeat after being reported expired: joined %v, %v", joined, err)
	}
	if err := r.Leave(ctx, g2); err != nil {
		t.Fatal(err)
	}
	if err := r.Retire(ctx, router.Node{}); err == nil {
		t.Fatal("Retire of an empty node succeeded")
	}
}

func TestRedisUnreachable(t *testing.T) {
	start := time.Now()
	_, err := router.NewRedis(router.RedisOptions{Addrs: []string{"127.0.0.1:1"}, DialTimeout: time.Second})
	if err == nil || !strings.HasPrefix(err.Error(), "router: redis connect") {
		t.Fatalf("NewRedis on a closed port = %v, want a connect error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("NewRedis took %v to fail", d)
	}
	if _, err := router.NewRedis(router.RedisOptions{}); err == nil {
		t.Fatal("NewRedis without an address succeeded")
	}
}

// BenchmarkRedisRegisterLookup: one op is a Register of a fresh login of a
// random user out of 100k plus a Lookup of another random user, from
// several goroutines over one client.
func BenchmarkRedisRegisterLookup(b *testing.B) {
	r, _, _ := newTestRedis(b)
	b.SetParallelism(4)
	b.ResetTimer()
	var seq sync.Mutex
	var epoch uint64
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			seq.Lock()
			epoch++
			e := epoch
			seq.Unlock()
			s := mkSession(uint32(e%3), rand.Uint64N(100_000), fmt.Sprintf("g%d", e%8), e, e)
			if _, err := r.Register(ctx, s, 2); err != nil {
				b.Error(err)
				return
			}
			if _, err := r.Lookup(ctx, router.User{Account: 7, UID: rand.Uint64N(100_000)}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}
