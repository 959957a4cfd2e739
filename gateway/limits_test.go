package gateway

import (
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// dialFrom connects to s from the loopback address local (127.0.0.2 is a
// second client machine as far as the gateway can tell).
func dialFrom(t testing.TB, s *Server, local string) *client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	nc, err := d.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Skipf("cannot dial from %s: %v", local, err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &client{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
}

func badLoginFrame(uid uint64, seq uint32) []byte {
	return encodeFrame(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: seq},
		&pb.LoginRequest{Token: logic.MintToken("not-the-secret-0123456789", 101, uid, time.Now().Add(time.Hour)), DeviceId: "d"})
}

// expectError reads a response with status st and returns its message.
func (c *client) expectError(seq uint32, st schema.Status) string {
	c.t.Helper()
	var e pb.Error
	_ = proto.Unmarshal(c.expect(seq, st), &e)
	return e.Message
}

// A flood of connections from one source address is refused with 3001
// beyond its bucket, and closed; another address goes on connecting.
func TestConnRateLimitPerSource(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) {
			o.Limits.ConnsPerIP = ratelimit.Rate{Rate: 0.01, Burst: 3}
		})
		for i := range 3 {
			dialFrom(t, s, "127.0.0.1").login(uint64(i + 1))
		}
		for range 5 {
			c := dialFrom(t, s, "127.0.0.1")
			c.expectError(0, schema.StatusRateLimited)
			c.expectClosed(2 * time.Second)
		}
		for i := range 3 {
			dialFrom(t, s, "127.0.0.2").login(uint64(10 + i))
		}
		if got := counter(s.m.rateLimited.WithLabelValues(limConnsPerIP)); got != 5 {
			t.Fatalf("rate_limited{conns_per_ip} %v, want 5", got)
		}
		if got := counter(s.m.rejected.WithLabelValues(schema.StatusRateLimited.String())); got != 5 {
			t.Fatalf("rejected{rate limited} %v, want 5", got)
		}
	})
}

// The total new-connection limit refuses whatever the address.
func TestConnRateLimitTotal(t *testing.T) {
	s := startServer(t, testEngines[0], func(o *Options) { o.Limits.Conns = ratelimit.Rate{Rate: 0.01, Burst: 2} })
	dialFrom(t, s, "127.0.0.1").login(1)
	dialFrom(t, s, "127.0.0.2").login(2)
	c := dialFrom(t, s, "127.0.0.3")
	c.expectError(0, schema.StatusRateLimited)
	c.expectClosed(2 * time.Second)
}

// A long-poll open over the limit is answered 429 with status 3001.
func TestLongPollOpenRateLimited(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.Limits.ConnsPerIP = ratelimit.Rate{Rate: 0.01, Burst: 1} })
	c := newLPClient(t, s)
	c.open()
	code, body := c.post("/lp/open", nil, nil)
	var r lpRefused
	if code != http.StatusTooManyRequests || json.Unmarshal(body, &r) != nil || r.Code != uint16(schema.StatusRateLimited) || !r.Retryable {
		t.Fatalf("open over the rate: %d %s, want 429 with code 3001", code, body)
	}
}

// A login storm with bad tokens from one address is slowed (3001), then
// shut out, good token or not; a client from another address still logs
// in.
func TestLoginStormShutOut(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) {
			o.Limits.LoginsPerIP = ratelimit.Rate{Rate: 10, Burst: 3}
			o.Limits.LoginFailures = 5
			o.Limits.LoginFailureWindow = time.Minute
			o.Limits.LoginLockout = time.Minute
		})
		var invalid, slowed int
		shutOut := false
		for i := 0; i < 400 && !shutOut; i++ {
			c := dialFrom(t, s, "127.0.0.1")
			c.write(badLoginFrame(7, 1))
			h, _ := c.read()
			switch h.Status {
			case schema.StatusTokenInvalid:
				invalid++
			case schema.StatusRateLimited:
				if counter(s.m.rateLimited.WithLabelValues(limLoginLockout)) > 0 {
					shutOut = true
				} else {
					slowed++
				}
			default:
				t.Fatalf("bad login answered %s", h.Status)
			}
			c.expectClosed(2 * time.Second)
			time.Sleep(5 * time.Millisecond) // a token every 100ms: some attempts reach logic, most are slowed
		}
		if !shutOut || slowed == 0 || invalid != 6 {
			t.Fatalf("%d token refusals, %d slowed, shut out %v: want 6 refusals (5 failures then the one that locks), some slowed, then shut out", invalid, slowed, shutOut)
		}
		good := dialFrom(t, s, "127.0.0.1")
		good.write(loginFrame(8, 1))
		if msg := good.expectError(1, schema.StatusRateLimited); !strings.Contains(msg, "failed logins") {
			t.Fatalf("a good token from the shut-out address: %q", msg)
		}
		dialFrom(t, s, "127.0.0.2").login(8)
	})
}

// Logins for one uid are bounded whatever the address.
func TestLoginRateLimitPerUID(t *testing.T) {
	s := startServer(t, testEngines[0], func(o *Options) { o.Limits.LoginsPerUID = ratelimit.Rate{Rate: 0.01, Burst: 2} })
	dialClient(t, s).login(5)
	dialClient(t, s).login(5)
	c := dialClient(t, s)
	c.write(loginFrame(5, 1))
	c.expectError(1, schema.StatusRateLimited)
	c.expectClosed(2 * time.Second)
	dialClient(t, s).login(6)
}

// A frame flood on one connection gets 3001 for the frames over the
// budget, then the connection is closed; another connection is served.
func TestFrameFlood(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		// A bucket that does not refill within the test: the counts are exact.
		s := startServer(t, engine, func(o *Options) { o.Limits.Frames = ratelimit.Rate{Rate: 0.001, Burst: 10} })
		other := dialClient(t, s)
		other.login(2)
		c := dialClient(t, s)
		c.login(1)
		var flood []byte
		for i := range 100 {
			flood = append(flood, keepaliveFrame(uint32(i+2))...)
		}
		c.write(flood)
		var ok, limited int
		_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			var f schema.Frame
			if err := c.dec.ReadFrame(&f); err != nil {
				break
			}
			switch f.Status {
			case schema.StatusOK:
				ok++
			case schema.StatusRateLimited:
				limited++
			default:
				t.Fatalf("flood answered %s", f.Status)
			}
			f.Release()
		}
		// The burst is served (the login is not counted); twice the burst
		// is refused, and the next refusal closes the connection.
		if ok != 10 || limited != 21 {
			t.Fatalf("%d served and %d refused before the close, want 10 and 21", ok, limited)
		}
		eventually(t, 2*time.Second, "the flooder gone", func() bool { return s.Conns() == 1 })
		if got := counter(s.m.rateLimited.WithLabelValues(limClosed)); got != 1 {
			t.Fatalf("rate_limited{closed} %v, want 1", got)
		}
		other.write(keepaliveFrame(2))
		other.expect(2, schema.StatusOK)
	})
}

// The bytes budget counts headers and bodies.
func TestByteBudget(t *testing.T) {
	s := startServer(t, testEngines[0], func(o *Options) {
		o.MaxBody = 1024
		o.Limits.Bytes = ratelimit.Rate{Rate: 1, Burst: 1}
	})
	if b := s.Options().Limits.Bytes.Burst; b != schema.HeaderLen+1024 {
		t.Fatalf("bytes burst %d, want one largest frame, %d", b, schema.HeaderLen+1024)
	}
	c := dialClient(t, s)
	c.login(1)
	n := 0
	for seq := uint32(2); ; seq++ {
		c.write(keepaliveFrame(seq))
		if h, _ := c.read(); h.Status == schema.StatusRateLimited {
			break
		}
		n++
		if n > 100 {
			t.Fatal("no 3001 after 100 keepalives over a one-frame byte budget")
		}
	}
}

// An idle connection's struct does not grow with the limits on.
func TestBudgetOnlyForBusyConns(t *testing.T) {
	s := startServer(t, testEngines[0], func(o *Options) { o.Limits.Frames = ratelimit.Rate{Rate: 100} })
	c := dialClient(t, s)
	c.login(1)
	budgets := func() int {
		n := 0
		for i := range s.shards {
			sh := &s.shards[i]
			sh.bmu.Lock()
			n += len(sh.budgets)
			sh.bmu.Unlock()
		}
		return n
	}
	if n := budgets(); n != 0 {
		t.Fatalf("%d budgets before any frame after login", n)
	}
	c.write(keepaliveFrame(2))
	c.expect(2, schema.StatusOK)
	if n := budgets(); n != 1 {
		t.Fatalf("%d budgets after a frame, want 1", n)
	}
	_ = c.nc.Close()
	eventually(t, 2*time.Second, "the budget dropped", func() bool { return budgets() == 0 })
}

// BenchmarkOverBudget measures the per-frame cost of the frames and bytes
// limits on a connection within its budget; it must not allocate.
func BenchmarkOverBudget(b *testing.B) {
	s := startServer(b, testEngines[0], func(o *Options) {
		o.Limits.Frames = ratelimit.Rate{Rate: 1e12}
		o.Limits.Bytes = ratelimit.Rate{Rate: 1e15}
	})
	c := &conn{srv: s, id: 1}
	sh := &s.shards[c.id%connShards]
	sh.mu.Lock()
	sh.m[c.id] = c // held, so that its budget is kept
	sh.mu.Unlock()
	b.Cleanup(func() { // before Shutdown, which would push to it
		sh.mu.Lock()
		delete(sh.m, c.id)
		sh.mu.Unlock()
	})
	f := &frame{}
	f.Header.Cmd = schema.CmdKeepalive
	b.ReportAllocs()
	for b.Loop() {
		if _, over := c.overBudget(f); over {
			b.Fatal("over a budget of a trillion frames a second")
		}
	}
}
