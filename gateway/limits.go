package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/schema"
	"golang.org/x/time/rate"
)

// Limits are the gateway's rate limits (token buckets). Every one is off
// (0) by default, because load tests and soaks open thousands of
// connections from one address in seconds; docs/operations.md suggests
// values for a public deployment. What is over a limit is answered with
// StatusRateLimited (3001) and counted in
// imd_gateway_rate_limited_total{limit}.
type Limits struct {
	// ConnsPerIP bounds new connections (TCP, WebSocket and long-poll
	// sessions alike) per source address, an IPv6 one by its /64. Over
	// it, a TCP connection gets one 3001 error frame and is closed; a
	// WebSocket upgrade or long-poll open is answered 429.
	ConnsPerIP ratelimit.Rate `yaml:"conns_per_ip"`
	// Conns bounds new connections to this gateway from everywhere, as
	// ConnsPerIP.
	Conns ratelimit.Rate `yaml:"conns"`
	// LoginsPerIP bounds login attempts per source address: one over it
	// is refused with 3001 and its connection closed, before logic (and
	// the token check) sees it.
	LoginsPerIP ratelimit.Rate `yaml:"logins_per_ip"`
	// LoginsPerUID bounds login attempts per uid (whatever the appcode),
	// as LoginsPerIP.
	LoginsPerUID ratelimit.Rate `yaml:"logins_per_uid"`
	// LoginFailures failed logins (a bad, expired or mismatched token, an
	// unknown appcode) from one source address within
	// LoginFailureWindow shut that address out of logging in for
	// LoginLockout: every login from it is refused with 3001 meanwhile.
	// 0: no lockout.
	LoginFailures int `yaml:"login_failures"`
	// LoginFailureWindow is the window LoginFailures counts in (the
	// bucket refills LoginFailures tokens over it). Default 1m.
	LoginFailureWindow time.Duration `yaml:"login_failure_window"`
	// LoginLockout is how long an address that failed too often is shut
	// out. Default 5m.
	LoginLockout time.Duration `yaml:"login_lockout"`
	// Frames bounds the frames a logged-in connection sends per second
	// (requests, acks and keepalives). A request over it is answered
	// 3001 (a notify over it is dropped); a connection refused more than
	// twice its burst, refilled at its rate, is closed.
	Frames ratelimit.Rate `yaml:"frames"`
	// Bytes bounds the bytes (headers and bodies) a logged-in connection
	// sends per second, as Frames. Its burst is at least one frame of
	// MaxBody.
	Bytes ratelimit.Rate `yaml:"bytes"`
}

func (l *Limits) setDefaults(maxBody uint32) error {
	if l.LoginFailureWindow == 0 {
		l.LoginFailureWindow = time.Minute
	}
	if l.LoginLockout == 0 {
		l.LoginLockout = 5 * time.Minute
	}
	if l.Bytes.On() {
		l.Bytes.Burst = max(l.Bytes.Size(), schema.HeaderLen+int(maxBody))
	}
	for name, r := range map[string]ratelimit.Rate{"conns_per_ip": l.ConnsPerIP, "conns": l.Conns,
		"logins_per_ip": l.LoginsPerIP, "logins_per_uid": l.LoginsPerUID, "frames": l.Frames, "bytes": l.Bytes} {
		if err := r.Validate("limits." + name); err != nil {
			return err
		}
	}
	if l.LoginFailures < 0 || l.LoginFailureWindow < 0 || l.LoginLockout < 0 {
		return fmt.Errorf("limits: login_failures, login_failure_window and login_lockout must be >= 0")
	}
	return nil
}

// Labels of imd_gateway_rate_limited_total.
const (
	limConnsPerIP   = "conns_per_ip"
	limConns        = "conns"
	limLoginsPerIP  = "logins_per_ip"
	limLoginsPerUID = "logins_per_uid"
	limLoginLockout = "login_lockout"
	limFrames       = "frames"
	limBytes        = "bytes"
	limClosed       = "closed" // a connection closed for keeping on over its budget
)

// limiter holds the gateway's buckets; a nil bucket is a limit that is off.
type limiter struct {
	connsPerIP   *ratelimit.Keyed[netip.Addr]
	conns        *rate.Limiter
	loginsPerIP  *ratelimit.Keyed[netip.Addr]
	loginsPerUID *ratelimit.Keyed[uint64]
	loginFails   *ratelimit.Keyed[netip.Addr]
	lockout      time.Duration
	frames       ratelimit.Rate
	bytes        ratelimit.Rate
	perConn      bool // frames or bytes is on
	byAddr       bool // a login limit needs the source address
}

func newLimiter(l Limits) *limiter {
	lim := &limiter{
		connsPerIP:   ratelimit.NewKeyed[netip.Addr](l.ConnsPerIP),
		conns:        l.Conns.Limiter(),
		loginsPerIP:  ratelimit.NewKeyed[netip.Addr](l.LoginsPerIP),
		loginsPerUID: ratelimit.NewKeyed[uint64](l.LoginsPerUID),
		lockout:      l.LoginLockout,
		frames:       l.Frames,
		bytes:        l.Bytes,
		perConn:      l.Frames.On() || l.Bytes.On(),
	}
	if l.LoginFailures > 0 && l.LoginFailureWindow > 0 {
		lim.loginFails = ratelimit.NewKeyed[netip.Addr](ratelimit.Rate{
			Rate: float64(l.LoginFailures) / l.LoginFailureWindow.Seconds(), Burst: l.LoginFailures})
	}
	lim.byAddr = lim.loginsPerIP != nil || lim.loginFails != nil
	return lim
}

// addrOf returns the address of a net.Addr, or the zero Addr.
func addrOf(a net.Addr) netip.Addr {
	if a == nil {
		return netip.Addr{}
	}
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort().Addr()
	}
	return parseAddr(a.String())
}

// parseAddr reads the address of "host:port" (or a bare address); the zero
// Addr when it is neither (a unix socket).
func parseAddr(s string) netip.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr()
	}
	a, _ := netip.ParseAddr(s)
	return a
}

// admitRate applies the new-connection limits to a connection from src
// (the zero Addr when unknown, which only the total limit applies to).
func (s *Server) admitRate(src netip.Addr) bool {
	l := s.lim
	now := time.Now()
	if src.IsValid() && !l.connsPerIP.Allow(ratelimit.Source(src), now) {
		s.m.rateLimited.WithLabelValues(limConnsPerIP).Inc()
		return false
	}
	if l.conns != nil && !l.conns.AllowN(now, 1) {
		s.m.rateLimited.WithLabelValues(limConns).Inc()
		return false
	}
	return true
}

// loginRate applies the login limits to an attempt by uid from src and
// returns "" when it may go on, else why it is refused.
func (s *Server) loginRate(src netip.Addr, uid uint64) string {
	l := s.lim
	now := time.Now()
	if src.IsValid() {
		src = ratelimit.Source(src)
		if d := l.loginFails.ShutOut(src, now); d > 0 {
			s.m.rateLimited.WithLabelValues(limLoginLockout).Inc()
			return "too many failed logins from this address; retry in " + strconv.Itoa(int(d.Seconds()+1)) + "s"
		}
		if !l.loginsPerIP.Allow(src, now) {
			s.m.rateLimited.WithLabelValues(limLoginsPerIP).Inc()
			return "too many logins from this address; retry later"
		}
	}
	if !l.loginsPerUID.Allow(uid, now) {
		s.m.rateLimited.WithLabelValues(limLoginsPerUID).Inc()
		return "too many logins for this uid; retry later"
	}
	return ""
}

// loginFailed counts a login that logic refused with st against src.
// Only the refusals a token guesser earns count: not the platform's own
// trouble (unavailable, timeouts).
func (s *Server) loginFailed(src netip.Addr, st schema.Status) {
	switch st {
	case schema.StatusTokenInvalid, schema.StatusTokenExpired, schema.StatusTokenMalformed,
		schema.StatusUnknownAppCode, schema.StatusTokenMismatch:
	default:
		return
	}
	if !src.IsValid() || s.lim.loginFails == nil {
		return
	}
	if s.lim.loginFails.Fail(ratelimit.Source(src), time.Now(), s.lim.lockout) {
		s.log.Warn("login lockout: too many failed logins", "remote", src.String(), "for", s.lim.lockout)
	}
}

// budget is the frames and bytes budget of one busy connection. It is kept
// beside the connection, in its shard, and made at the connection's first
// frame after login: an idle connection's struct stays as small as before.
type budget struct {
	frames  *rate.Limiter // nil when off
	bytes   *rate.Limiter // nil when off
	refusal *rate.Limiter // the frames it may have refused before it is closed
}

func (l *limiter) newBudget() *budget {
	fr := l.frames
	if !fr.On() { // bytes only: the refusals still need a shape
		fr = ratelimit.Rate{Rate: 16, Burst: 32}
	}
	return &budget{frames: l.frames.Limiter(), bytes: l.bytes.Limiter(),
		refusal: rate.NewLimiter(rate.Limit(fr.Rate), 2*fr.Size())}
}

// budgetOf returns c's budget, making it on first use. A budget is kept
// only while the connection is held: removeConn drops it after taking the
// connection out of the shard, so one made for a frame that raced with the
// close is not stored.
func (s *Server) budgetOf(c *conn) *budget {
	sh := &s.shards[c.id%connShards]
	sh.bmu.Lock()
	b := sh.budgets[c.id]
	sh.bmu.Unlock()
	if b != nil {
		return b
	}
	if s.opts.ACL.HasAllow() && s.opts.ACL.AllowedIP(parseAddr(c.io.remoteAddr())) {
		b = &budget{} // an allowed range bypasses the frames and bytes limits
	} else {
		b = s.lim.newBudget()
	}
	sh.mu.Lock() // then bmu: the one order both are taken in
	if sh.m[c.id] == c {
		sh.bmu.Lock()
		if old := sh.budgets[c.id]; old != nil {
			b = old
		} else {
			if sh.budgets == nil {
				sh.budgets = make(map[uint64]*budget)
			}
			sh.budgets[c.id] = b
		}
		sh.bmu.Unlock()
	}
	sh.mu.Unlock()
	return b
}

// dropBudget forgets a closed connection's budget.
func (sh *connShard) dropBudget(id uint64) {
	sh.bmu.Lock()
	delete(sh.budgets, id)
	sh.bmu.Unlock()
}

// overBudget applies the frames and bytes limits to a logged-in
// connection's frame. It reports false when the frame may be served; else
// it has released the frame, answered it (a request) with 3001 or closed
// the connection, and returns what the engine does next.
func (c *conn) overBudget(f *frame) (action, bool) {
	s := c.srv
	b := s.budgetOf(c)
	now := time.Now()
	label := ""
	if b.frames != nil && !b.frames.AllowN(now, 1) {
		label = limFrames
	} else if b.bytes != nil && !b.bytes.AllowN(now, schema.HeaderLen+len(f.Body)) {
		label = limBytes
	}
	if label == "" {
		return actNext, false
	}
	s.m.rateLimited.WithLabelValues(label).Inc()
	h := f.Header
	f.release()
	if !b.refusal.AllowN(now, 1) {
		s.m.rateLimited.WithLabelValues(limClosed).Inc()
		s.m.closed.WithLabelValues("rate_limited").Inc()
		s.log.Info("over its frame budget; closing", "conn", c.id, "uid", c.sess.UID, "remote", c.io.remoteAddr(), "limit", label)
		c.fail(&h, schema.StatusRateLimited, "over this connection's "+label+" budget; closing")
		return actStop, true
	}
	if h.Kind() == schema.KindRequest {
		c.respondErr(&h, schema.StatusRateLimited, "over this connection's "+label+" budget; slow down")
	}
	return actNext, true
}
