package platform

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/internal/testcert"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"github.com/klauspost/compress/s2"
	"google.golang.org/protobuf/proto"
)

// The attack harness (issue 15, "bad input and attacks"): each subtest of
// TestAttacks starts a platform with the gateway's limits on, runs a
// well-behaved workload from 127.0.0.1 (SDK clients logging in again and
// again and sending c2c messages, every operation timed) while an attack
// runs from 127.0.0.2 and up, then checks the attack was contained (its
// connections refused or closed with the documented statuses) and the
// good workload's every operation succeeded with its p99 bounded.

// attackLimits are the limits the harness runs with: loose enough for the
// good workload from 127.0.0.1 (a few new connections and logins a
// second, a few frames a second per connection), tight enough that every
// attack runs into them.
func attackLimits(c *config.Config) {
	g := &c.Limits.Gateway
	g.ConnsPerIP = ratelimit.Rate{Rate: 20, Burst: 20}
	g.LoginsPerIP = ratelimit.Rate{Rate: 20, Burst: 20}
	g.LoginFailures = 5
	g.LoginFailureWindow = time.Minute
	g.LoginLockout = time.Minute
	g.Frames = ratelimit.Rate{Rate: 100, Burst: 100}
	// long enough for a good login on a loaded machine under -race, short
	// enough that the connection floods and slow clients are cut in the test
	c.Gateway.LoginTimeout = 2 * time.Second
	c.Admin.APIKey = testAdminKey
}

// attackP99 bounds the good workload's p99 during an attack.
func attackP99() time.Duration {
	if raceEnabled {
		return 2 * time.Second
	}
	return 500 * time.Millisecond
}

// attackSize scales an attack's count down under the race detector.
func attackSize(n int) int {
	if raceEnabled {
		return max(1, n/4)
	}
	return n
}

// attackerIP is the i-th attacking source address: 127.0.0.2 and up
// (all of 127/8 is loopback), so that the attacks that come from many
// addresses each stay within the per-address buckets.
func attackerIP(i int) string {
	v := 127<<24 + 2 + i
	return fmt.Sprintf("%d.%d.%d.%d", v>>24, v>>16&0xff, v>>8&0xff, v&0xff)
}

// dialFrom opens a TCP connection from src to addr, or returns the error.
func dialFrom(src, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	return d.Dial("tcp", addr)
}

// goodLoad is the well-behaved workload: workers on 127.0.0.1, each
// logging in as its own uid (a fresh SDK client every round), sending
// c2c messages to the next worker's uid, and closing.
type goodLoad struct {
	mu   sync.Mutex
	ops  map[string]*bench.Histogram // by operation: login, send
	errs []error
	// during counts the operations that ended while the attack ran
	during    int
	attacking bool
	stop      chan struct{}
	done      sync.WaitGroup
	start     time.Time
}

const goodWorkers = 3

func startGoodLoad(t *testing.T, p *Platform) *goodLoad {
	t.Helper()
	g := &goodLoad{ops: map[string]*bench.Histogram{"login": {}, "send": {}}, stop: make(chan struct{}), start: time.Now()}
	for w := range goodWorkers {
		g.done.Add(1)
		go g.worker(p, w)
	}
	t.Cleanup(g.halt)
	return g
}

func (g *goodLoad) record(op string, d time.Duration, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		g.errs = append(g.errs, fmt.Errorf("%s: %w", op, err))
		return
	}
	g.ops[op].Record(d)
	if g.attacking {
		g.during++
	}
}

// attack runs f as the attack, noting which good operations overlap it.
func (g *goodLoad) attack(t *testing.T, p *Platform, f func(t *testing.T, p *Platform)) {
	g.mu.Lock()
	g.attacking = true
	g.mu.Unlock()
	began := time.Now()
	f(t, p)
	g.mu.Lock()
	g.attacking = false
	during := g.during
	g.mu.Unlock()
	t.Logf("the attack ran %s; %d good operations ended during it", time.Since(began).Round(time.Millisecond), during)
	if during == 0 {
		t.Error("no good operation ended while the attack ran")
	}
}

func (g *goodLoad) stopped() bool {
	select {
	case <-g.stop:
		return true
	default:
		return false
	}
}

func (g *goodLoad) worker(p *Platform, w int) {
	defer g.done.Done()
	uid := uint64(90001 + w)
	to := acct1(uint64(90001 + (w+1)%goodWorkers))
	dialer := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
	for round := 0; !g.stopped(); round++ {
		began := time.Now()
		c, err := sdk.Dial(ctxb, sdk.Options{Addrs: []string{p.GatewayAddr()}, NoReconnect: true, RequestTimeout: 10 * time.Second,
			SendAttempts: 1, Dialer: dialer.DialContext, OnC2C: func(*pb.C2CMessage) {}})
		if err == nil {
			ctx, cancel := context.WithTimeout(ctxb, 10*time.Second)
			_, err = c.Login(ctx, creds(101, uid))
			cancel()
		}
		g.record("login", time.Since(began), err)
		if err != nil {
			if c != nil {
				_ = c.Close()
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		for i := range 5 {
			if g.stopped() {
				break
			}
			began := time.Now()
			ctx, cancel := context.WithTimeout(ctxb, 10*time.Second)
			_, err := c.SendC2C(ctx, to, 1, fmt.Appendf(nil, "round %d message %d", round, i))
			cancel()
			g.record("send", time.Since(began), err)
			time.Sleep(60 * time.Millisecond)
		}
		_ = c.Close()
	}
}

func (g *goodLoad) halt() {
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	g.done.Wait()
}

// check stops the workload once it has run at least minRun, then fails
// the test on any failed operation or a p99 over the bound, and logs
// each operation's p99.
func (g *goodLoad) check(t *testing.T, minRun time.Duration) {
	t.Helper()
	if rest := minRun - time.Since(g.start); rest > 0 {
		time.Sleep(rest)
	}
	g.halt()
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.errs) > 0 {
		t.Errorf("%d good operations failed during the attack, the first: %v", len(g.errs), g.errs[0])
	}
	var all bench.Histogram
	for _, op := range []string{"login", "send"} {
		h := g.ops[op]
		if h.Count() == 0 {
			t.Errorf("no good %s completed during the attack", op)
			continue
		}
		all.Merge(h)
		t.Logf("good %s: %d ops, p50 %s, p99 %s, max %s", op, h.Count(), h.Quantile(0.5), h.Quantile(0.99), h.Max())
		if p99 := h.Quantile(0.99); p99 > attackP99() {
			t.Errorf("good %s p99 %s during the attack, over %s", op, p99, attackP99())
		}
	}
	t.Logf("good ops: %d, p99 %s (bound %s)", all.Count(), all.Quantile(0.99), attackP99())
}

// firstFrame reads one frame from nc within d; it returns the frame's
// status, or ok false if the connection ended (or d passed) first.
func firstFrame(nc net.Conn, d time.Duration) (st schema.Status, ok bool) {
	_ = nc.SetReadDeadline(time.Now().Add(d))
	var f schema.Frame
	if err := schema.NewDecoder(nc, 1<<20).ReadFrame(&f); err != nil {
		return 0, false
	}
	defer f.Release()
	return f.Status, true
}

// closedWithin reports whether the server closes nc within d (whatever
// it sends before).
func closedWithin(nc net.Conn, d time.Duration) bool {
	_ = nc.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, nc)
	return err == nil || isReset(err)
}

// tally counts attack outcomes by name from many goroutines.
type tally struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *tally) add(what string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[what]++
}

func (c *tally) get(what string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[what]
}

// The attacks that are over in a moment run on a few goroutines at a
// time: on the two cores a test gets, an attacker with more would starve
// the good clients of CPU in the test process itself, whatever the
// gateway does.

// attackFor is how long the attacks that are over in a moment are kept
// up, round after round, so the good workload runs beside them.
const attackFor = time.Second

// sustain runs round(0), round(1), ... until attackFor has passed; it
// returns the number of rounds.
func sustain(round func(r int)) int {
	began := time.Now()
	r := 0
	for ; r == 0 || time.Since(began) < attackFor; r++ {
		round(r)
		time.Sleep(10 * time.Millisecond)
	}
	return r
}

// parallel runs f(0..n-1) on width goroutines.
func parallel(n, width int, f func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range width {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				f(i)
			}
		}()
	}
	wg.Wait()
}

// connFlood opens per connections from each of addrs, all at once (as
// far as width dialers go), and never logs in. Every connection must get
// either 3001 at accept (over conns_per_ip) or 3003 at the login
// deadline, then be closed.
func connFlood(t *testing.T, p *Platform, addrs []string, per int) {
	var out tally
	held := make(chan net.Conn, len(addrs)*per)
	parallel(len(addrs)*per, 16, func(i int) {
		nc, err := dialFrom(addrs[i%len(addrs)], p.GatewayAddr())
		if err != nil {
			out.add("dial error")
			t.Errorf("dial: %v", err)
			return
		}
		held <- nc
	})
	close(held)
	var conns []net.Conn
	for nc := range held {
		conns = append(conns, nc)
	}
	parallel(len(conns), 64, func(i int) {
		nc := conns[i]
		defer nc.Close()
		st, ok := firstFrame(nc, 10*time.Second)
		switch {
		case !ok:
			out.add("no frame")
		case st == schema.StatusRateLimited, st == schema.StatusLoginTimeout:
			out.add(st.String())
		default:
			out.add("other")
			t.Errorf("a flooding connection got status %s", st)
		}
		if !closedWithin(nc, 5*time.Second) {
			t.Errorf("a flooding connection was not closed")
		}
	})
	limited, timedOut := out.get(schema.StatusRateLimited.String()), out.get(schema.StatusLoginTimeout.String())
	t.Logf("%d flooding connections from %d addresses: %d refused 3001, %d closed 3003 at the login deadline", len(conns), len(addrs), limited, timedOut)
	if n := out.get("no frame"); n > 0 {
		t.Errorf("%d flooding connections closed without a status", n)
	}
	if limited == 0 || limited+timedOut != len(addrs)*per {
		t.Errorf("%d refused and %d timed out of %d: want every one of them either, and some refused", limited, timedOut, len(addrs)*per)
	}
	if n := metricValue(t, p.Registry, "imd_gateway_rate_limited_total", "limit", "conns_per_ip"); int(n) != limited {
		t.Errorf("imd_gateway_rate_limited_total{conns_per_ip} = %v, want %d", n, limited)
	}
	if n := metricValue(t, p.Registry, "imd_gateway_closed_total", "reason", "login_timeout"); int(n) != timedOut {
		t.Errorf("imd_gateway_closed_total{login_timeout} = %v, want %d", n, timedOut)
	}
}

// rawLoginFrom logs uid in over a raw connection from src, offering
// compression if s2; it fails the test unless the login succeeds.
func rawLoginFrom(t *testing.T, p *Platform, src string, uid uint64, s2on bool) *raw {
	t.Helper()
	nc, err := dialFrom(src, p.GatewayAddr())
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	r := &raw{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
	req := &pb.LoginRequest{Token: token(101, uid), DeviceId: "attacker"}
	if s2on {
		req.AcceptCompression = []string{schema.CompressionS2}
	}
	r.send(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: 1}, req)
	h, body := r.read()
	if h.Cmd != schema.CmdLogin || h.Status != schema.StatusOK {
		t.Fatalf("attacker login from %s: %s status %s", src, h.Cmd, h.Status)
	}
	var resp pb.LoginResponse
	if err := proto.Unmarshal(body, &resp); err != nil {
		t.Fatal(err)
	}
	if s2on && resp.Compression != schema.CompressionS2 {
		t.Fatalf("attacker login negotiated %q, want s2", resp.Compression)
	}
	return r
}

// TestAttacks runs each attack of issue 15 beside the good workload.
func TestAttacks(t *testing.T) {
	ca := testcert.NewCA(t, "imd attack CA")
	run := func(name string, attack func(t *testing.T, p *Platform)) {
		t.Run(name, func(t *testing.T) {
			p := startTLS(t, ca, t.TempDir(), attackLimits)
			good := startGoodLoad(t, p)
			good.attack(t, p, attack)
			good.check(t, 1500*time.Millisecond)
		})
	}

	run("ConnFloodManyAddrs", func(t *testing.T, p *Platform) {
		var addrs []string
		for i := range attackSize(40) {
			addrs = append(addrs, attackerIP(i))
		}
		connFlood(t, p, addrs, 30)
	})

	run("ConnFloodOneAddr", func(t *testing.T, p *Platform) {
		connFlood(t, p, []string{attackerIP(0)}, attackSize(400))
	})

	// Slowloris: connections that send a login a byte at a time are cut at
	// the login deadline with 3003.
	run("SlowClients", func(t *testing.T, p *Platform) {
		n := attackSize(60)
		frame := schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 7001, Seq: 1},
			mustMarshal(t, &pb.LoginRequest{Token: token(101, 7001), DeviceId: "slow"}))
		var out tally
		began := time.Now()
		parallel(n, n, func(i int) {
			nc, err := dialFrom(attackerIP(i), p.GatewayAddr())
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			defer nc.Close()
			go func() { // a byte every 100ms: the frame would take seconds
				for _, b := range frame {
					_ = nc.SetWriteDeadline(time.Now().Add(time.Second))
					if _, err := nc.Write([]byte{b}); err != nil {
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
			}()
			st, ok := firstFrame(nc, 10*time.Second)
			switch {
			case ok && st == schema.StatusLoginTimeout:
				out.add("timeout")
			case !ok:
				out.add("closed")
			default:
				t.Errorf("a slow client got status %s", st)
			}
			if !closedWithin(nc, 5*time.Second) {
				t.Error("a slow client was not closed")
			}
		})
		t.Logf("%d slow clients: %d cut with 3003 at the login deadline, %d closed without a frame, in %s", n, out.get("timeout"), out.get("closed"), time.Since(began))
		if out.get("timeout") != n {
			t.Errorf("%d of %d slow clients got 3003", out.get("timeout"), n)
		}
	})

	// A login storm with bad tokens: each address gets a few 2001s, then
	// is shut out (3001) for the lockout.
	run("BadTokenLoginStorm", func(t *testing.T, p *Platform) {
		addrs, per := 5, attackSize(80)
		var out tally
		rounds := sustain(func(r int) {
			parallel(addrs, addrs, func(a int) {
				for i := range per {
					nc, err := dialFrom(attackerIP(a), p.GatewayAddr())
					if err != nil {
						t.Errorf("dial: %v", err)
						return
					}
					uid := uint64(8000 + a*100000 + r*1000 + i)
					f := schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: 1},
						mustMarshal(t, &pb.LoginRequest{Token: logic.MintToken("not-the-secret-0123456789", 101, uid, time.Now().Add(time.Hour)), DeviceId: "storm"}))
					_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
					_, _ = nc.Write(f)
					st, ok := firstFrame(nc, 10*time.Second)
					switch {
					case !ok:
						t.Error("a bad login got no answer")
					case st == schema.StatusTokenInvalid, st == schema.StatusRateLimited:
						out.add(fmt.Sprint(a, st))
					default:
						t.Errorf("a bad login got %s", st)
					}
					if !closedWithin(nc, 5*time.Second) {
						t.Error("a bad login's connection was not closed")
					}
					nc.Close()
				}
			})
		})
		for a := range addrs {
			invalid, limited := out.get(fmt.Sprint(a, schema.StatusTokenInvalid)), out.get(fmt.Sprint(a, schema.StatusRateLimited))
			// 5 failures, the 6th locks: at most 6 reach the token check
			if invalid < 1 || invalid > 6 || invalid+limited != per*rounds {
				t.Errorf("address %s: %d token refusals, %d rate limited of %d", attackerIP(a), invalid, limited, per*rounds)
			}
		}
		t.Logf("%d bad logins from %d addresses: %d token refusals (2001), the rest 3001", addrs*per*rounds, addrs, int(metricValue(t, p.Registry, "imd_logic_logins_total", "status", schema.StatusTokenInvalid.String())))
		if n := metricValue(t, p.Registry, "imd_gateway_rate_limited_total", "limit", "login_lockout"); n == 0 {
			t.Error("no login refused for the lockout")
		}
		if n := metricValue(t, p.Registry, "imd_logic_logins_total", "status", schema.StatusTokenInvalid.String()); n < float64(addrs) || n > float64(6*addrs) {
			t.Errorf("imd_logic_logins_total{token invalid} = %v, want %d to %d", n, addrs, 6*addrs)
		}
	})

	// A frame flood on logged-in connections: frames over the budget get
	// 3001, then the connection is closed.
	run("FrameFlood", func(t *testing.T, p *Platform) {
		n := attackSize(8)
		var flood []byte
		for i := range 2000 {
			flood = schema.AppendFrame(flood, &schema.Header{Cmd: schema.CmdKeepalive, Seq: uint32(i + 2)}, mustMarshal(t, &pb.KeepaliveRequest{}))
		}
		var limitedTotal atomic.Int64
		rounds := sustain(func(round int) { floodRound(t, p, round, n, flood, &limitedTotal) })
		t.Logf("%d flooding connections got %d refusals (3001) before they were closed", n*rounds, limitedTotal.Load())
		if c := metricValue(t, p.Registry, "imd_gateway_closed_total", "reason", "rate_limited"); int(c) != n*rounds {
			t.Errorf("imd_gateway_closed_total{rate_limited} = %v, want %d", c, n*rounds)
		}
	})

	// A decompression bomb: 1 MiB of zeros in a few KiB of s2, on
	// connections that negotiated compression: 1003 and closed, before
	// it is inflated past max_body.
	run("DecompressionBomb", func(t *testing.T, p *Platform) {
		n := attackSize(20)
		block := s2.Encode(nil, make([]byte, 1<<20))
		bomb := schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdKeepalive, Seq: 2, Flags: schema.FlagCompressed}, block)
		rounds := sustain(func(round int) {
			var rs []*raw
			for i := range n {
				rs = append(rs, rawLoginFrom(t, p, attackerIP(round*n+i), uint64(200000+round*n+i), true))
			}
			parallel(n, 4, func(i int) {
				r := rs[i]
				_ = r.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
				if _, err := r.nc.Write(bomb); err != nil {
					t.Errorf("write a bomb: %v", err)
					return
				}
				if st, ok := firstFrame(r.nc, 10*time.Second); !ok || st != schema.StatusBodyTooLarge {
					t.Errorf("a bomb got status %s (a frame: %v), want %s", st, ok, schema.StatusBodyTooLarge)
				}
				if !closedWithin(r.nc, 5*time.Second) {
					t.Error("a bomber was not closed")
				}
			})
		})
		t.Logf("%d bombs of %d bytes (1 MiB inflated) refused with 1003", n*rounds, len(block))
		if c := metricValue(t, p.Registry, "imd_gateway_closed_total", "reason", "bad_frame"); int(c) != n*rounds {
			t.Errorf("imd_gateway_closed_total{bad_frame} = %v, want %d", c, n*rounds)
		}
	})

	// Garbage in place of a TLS handshake: closed, and the TLS listener
	// goes on serving.
	run("GarbageTLS", func(t *testing.T, p *Platform) {
		n := attackSize(200)
		garbage := []byte("IMD\x01 this is no client hello\r\n\r\n\x16\x03\x01\xff\xff")
		rounds := sustain(func(round int) {
			parallel(n, 4, func(i int) {
				nc, err := dialFrom(attackerIP(round*n+i), p.TLSAddr())
				if err != nil {
					t.Errorf("dial: %v", err)
					return
				}
				defer nc.Close()
				_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
				_, _ = nc.Write(garbage)
				if !closedWithin(nc, 10*time.Second) {
					t.Error("a connection that sent garbage for a handshake was not closed")
				}
			})
		})
		c := login(t, p, 101, 7300, overTLS(p, ca))
		if _, err := c.OfflineCount(ctxb); err != nil {
			t.Fatalf("a TLS client after the garbage: %v", err)
		}
		t.Logf("%d connections sent garbage for a handshake and were closed", n*rounds)
	})

	// A blacklisted uid logging in: 2006 and closed, from any address.
	run("BlacklistedUIDLogin", func(t *testing.T, p *Platform) {
		put := acl.Lists{UIDBlock: []acl.UIDBlock{{Account: 1, UIDs: []uint64{7400}}}}
		if code := api(t, p, "PUT", "/v1/admin/acl", testAdminKey, put, nil); code != 200 {
			t.Fatalf("PUT /v1/admin/acl: %d", code)
		}
		n := attackSize(40)
		rounds := sustain(func(round int) {
			parallel(n, 4, func(i int) {
				nc, err := dialFrom(attackerIP(round*n+i), p.GatewayAddr())
				if err != nil {
					t.Errorf("dial: %v", err)
					return
				}
				defer nc.Close()
				_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
				_, _ = nc.Write(schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 7400, Seq: 1},
					mustMarshal(t, &pb.LoginRequest{Token: token(101, 7400), DeviceId: "blocked"})))
				if st, ok := firstFrame(nc, 10*time.Second); !ok || st != schema.StatusForbidden {
					t.Errorf("a blacklisted uid's login got %s (a frame: %v), want %s", st, ok, schema.StatusForbidden)
				}
				if !closedWithin(nc, 5*time.Second) {
					t.Error("a blacklisted uid's connection was not closed")
				}
			})
		})
		if c := metricValue(t, p.Registry, "imd_logic_logins_total", "status", schema.StatusForbidden.String()); int(c) != n*rounds {
			t.Errorf("imd_logic_logins_total{forbidden} = %v, want %d", c, n*rounds)
		}
		t.Logf("%d logins of a blacklisted uid refused with 2006", n*rounds)
	})

	// Uids blacklisted while online: each is kicked (KICK_REASON_ADMIN)
	// and closed; the good workload's uids are untouched.
	run("UIDBlacklistedWhileOnline", func(t *testing.T, p *Platform) {
		n := attackSize(20)
		var blocked []uint64
		rounds := sustain(func(round int) {
			var victims []*raw
			var uids []uint64
			for i := range n {
				uid := uint64(300000 + round*n + i)
				victims = append(victims, rawLoginFrom(t, p, attackerIP(round*n+i), uid, false))
				uids = append(uids, uid)
			}
			blocked = append(blocked, uids...)
			put := acl.Lists{UIDBlock: []acl.UIDBlock{{Account: 1, UIDs: blocked}}}
			if code := api(t, p, "PUT", "/v1/admin/acl", testAdminKey, put, nil); code != 200 {
				t.Fatalf("PUT /v1/admin/acl: %d", code)
			}
			parallel(n, n, func(i int) {
				r := victims[i]
				_ = r.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
				for {
					var f schema.Frame
					if err := r.dec.ReadFrame(&f); err != nil {
						t.Errorf("uid %d: no kickout: %v", uids[i], err)
						return
					}
					if f.Cmd != schema.CmdKickout {
						f.Release()
						continue
					}
					var k pb.Kickout
					err := proto.Unmarshal(f.Body, &k)
					f.Release()
					if err != nil || k.Reason != pb.KickReason_KICK_REASON_ADMIN {
						t.Errorf("uid %d kicked with %s (%v), want KICK_REASON_ADMIN", uids[i], k.Reason, err)
					}
					break
				}
				if !closedWithin(r.nc, 5*time.Second) {
					t.Errorf("uid %d was not closed after its kickout", uids[i])
				}
			})
		})
		t.Logf("%d online uids blacklisted through the admin API, kicked and closed", n*rounds)
	})
}

// floodRound logs n connections in and has each send a flood of
// keepalives at once: each must get some 3001s, then be closed.
func floodRound(t *testing.T, p *Platform, round, n int, flood []byte, limitedTotal *atomic.Int64) {
	var rs []*raw
	for i := range n {
		rs = append(rs, rawLoginFrom(t, p, attackerIP(round*n+i), uint64(100000+round*n+i), false))
	}
	parallel(n, n, func(i int) {
		r := rs[i]
		go func() {
			_ = r.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
			_, _ = r.nc.Write(flood)
		}()
		limited := 0
		_ = r.nc.SetReadDeadline(time.Now().Add(15 * time.Second))
		for {
			var f schema.Frame
			if err := r.dec.ReadFrame(&f); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Error("a flooding connection was not closed")
				}
				break
			}
			switch f.Status {
			case schema.StatusOK:
			case schema.StatusRateLimited:
				limited++
			default:
				t.Errorf("a flooding frame got %s", f.Status)
			}
			f.Release()
		}
		if limited == 0 {
			t.Error("a flooding connection got no 3001")
		}
		limitedTotal.Add(int64(limited))
	})
}
