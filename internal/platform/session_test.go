package platform

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

func sessions(t *testing.T, p *Platform, account uint32, uid uint64) []router.Session {
	t.Helper()
	s, err := p.Router.Lookup(context.Background(), router.User{Account: account, UID: uid})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLoginLogout(t *testing.T) {
	p := start(t, nil)
	c := login(t, p, 101, 42, func(o *sdk.Options) { o.DeviceID = "phone-1" })
	info := c.LoginInfo()
	if info.Account != 1 || info.GateId != p.Gateway.ID() || info.Epoch == 0 || info.KeepaliveMs == 0 || info.IdleTimeoutMs <= info.KeepaliveMs {
		t.Fatalf("login response %+v", info)
	}
	if c.State() != sdk.StateOnline {
		t.Fatalf("state %s, want online", c.State())
	}
	ss := sessions(t, p, 1, 42)
	if len(ss) != 1 || ss[0].AppCode != 101 || ss[0].DeviceID != "phone-1" || ss[0].Epoch != info.Epoch {
		t.Fatalf("router sessions %+v", ss)
	}
	if rtt, err := c.Keepalive(context.Background()); err != nil || rtt <= 0 {
		t.Fatalf("keepalive: %v %v", rtt, err)
	}
	if err := c.Logout(context.Background()); err != nil {
		t.Fatalf("logout: %v", err)
	}
	if c.State() != sdk.StateClosed {
		t.Fatalf("state after logout %s", c.State())
	}
	eventually(t, 2*time.Second, "session removed", func() bool { return len(sessions(t, p, 1, 42)) == 0 })
	eventually(t, 2*time.Second, "connection closed", func() bool { return p.Gateway.Conns() == 0 })
	if _, err := c.Keepalive(context.Background()); !errors.Is(err, sdk.ErrClosed) {
		t.Fatalf("keepalive after logout: %v, want ErrClosed", err)
	}
}

func TestDisconnectUnregisters(t *testing.T) {
	p := start(t, nil)
	c := login(t, p, 101, 43, nil)
	if len(sessions(t, p, 1, 43)) != 1 {
		t.Fatal("not registered")
	}
	_ = c.Close()
	eventually(t, 2*time.Second, "session removed after close", func() bool { return len(sessions(t, p, 1, 43)) == 0 })
}

func TestWrongTokens(t *testing.T) {
	p := start(t, nil)
	past := time.Now().Add(-time.Minute)
	cases := []struct {
		name    string
		appcode uint32
		uid     uint64
		token   string
		want    schema.Status
	}{
		{"bad signature", 101, 7, logic.MintToken("another-secret-0123456789", 101, 7, time.Now().Add(time.Hour)), schema.StatusTokenInvalid},
		{"expired", 101, 7, logic.MintToken(testSecret, 101, 7, past), schema.StatusTokenExpired},
		{"malformed", 101, 7, "not-a-token", schema.StatusTokenMalformed},
		{"empty", 101, 7, "", schema.StatusTokenMalformed},
		{"bad base64", 101, 7, "101.7.99999999999.***", schema.StatusTokenMalformed},
		{"other uid", 101, 7, token(101, 8), schema.StatusTokenMismatch},
		{"other appcode", 101, 7, token(102, 7), schema.StatusTokenMismatch},
		{"unknown appcode", 999, 7, token(999, 7), schema.StatusUnknownAppCode},
		{"uid zero", 101, 0, token(101, 0), schema.StatusTokenMismatch},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, p, nil)
			_, err := c.Login(context.Background(), sdk.Credentials{AppCode: tc.appcode, UID: tc.uid, Token: tc.token})
			if got := statusOf(err); got != tc.want {
				t.Fatalf("login error %v (status %d), want %d (%s)", err, got, tc.want, tc.want)
			}
			if sdk.IsRetryable(err) {
				t.Fatalf("%v must not be retryable", err)
			}
		})
	}
	eventually(t, 2*time.Second, "refused connections closed", func() bool { return p.Gateway.Conns() == 0 })
	if st, _ := p.Router.Stats(context.Background()); st.Sessions != 0 {
		t.Fatalf("refused logins left %d sessions", st.Sessions)
	}
	// and the server still serves a good login
	login(t, p, 101, 7, nil)
}

func TestKickoutSameTerminal(t *testing.T) {
	p := start(t, nil)
	kicked := make(chan *pb.Kickout, 1)
	first := login(t, p, 101, 9, func(o *sdk.Options) {
		o.DeviceID = "old-phone"
		o.OnKickout = func(k *pb.Kickout) { kicked <- k }
	})
	pc := login(t, p, 102, 9, nil) // same user, another terminal: stays
	second := login(t, p, 101, 9, func(o *sdk.Options) { o.DeviceID = "new-phone" })

	select {
	case k := <-kicked:
		if k.Reason != pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE || k.NewDeviceId != "new-phone" {
			t.Fatalf("kickout %+v", k)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("first session was not kicked")
	}
	if err := first.Wait(); !errors.Is(err, sdk.ErrClosed) {
		t.Fatalf("kicked client ended with %v", err)
	}
	if first.State() != sdk.StateClosed {
		t.Fatalf("kicked client state %s", first.State())
	}
	// The kicked client must not come back on its own.
	time.Sleep(100 * time.Millisecond)
	ss := sessions(t, p, 1, 9)
	if len(ss) != 2 {
		t.Fatalf("want the pc and the new phone session, got %+v", ss)
	}
	for _, c := range []*sdk.Client{pc, second} {
		if _, err := c.Keepalive(context.Background()); err != nil {
			t.Fatalf("surviving session: %v", err)
		}
	}
	// Support (account 2) uid 9 is another person: unaffected by all of this.
	login(t, p, 201, 9, nil)
	if got := len(sessions(t, p, 2, 9)); got != 1 {
		t.Fatalf("account 2 sessions %d", got)
	}
}

func TestMaxSessionsPolicy(t *testing.T) {
	p := start(t, nil)
	var kicks atomic.Int32
	onKick := func(o *sdk.Options) { o.OnKickout = func(*pb.Kickout) { kicks.Add(1) } }
	a := login(t, p, 301, 5, onKick)
	login(t, p, 301, 5, onKick)
	if kicks.Load() != 0 || len(sessions(t, p, 3, 5)) != 2 {
		t.Fatalf("two sessions allowed on appcode 301: kicks %d sessions %d", kicks.Load(), len(sessions(t, p, 3, 5)))
	}
	login(t, p, 301, 5, onKick) // the third evicts the oldest
	eventually(t, 5*time.Second, "oldest kicked", func() bool { return a.State() == sdk.StateClosed })
	if kicks.Load() != 1 || len(sessions(t, p, 3, 5)) != 2 {
		t.Fatalf("kicks %d sessions %d", kicks.Load(), len(sessions(t, p, 3, 5)))
	}
}

func TestKeepaliveAcrossIdleTimeout(t *testing.T) {
	p := start(t, func(c *config.Config) {
		c.Gateway.IdleTimeout = 600 * time.Millisecond
		c.Gateway.KeepaliveInterval = 150 * time.Millisecond
	})
	var lost atomic.Int32
	c := login(t, p, 101, 11, func(o *sdk.Options) {
		o.OnState = func(s sdk.State, _ error) {
			if s != sdk.StateOnline {
				lost.Add(1)
			}
		}
	})
	if got := c.LoginInfo().KeepaliveMs; got != 150 {
		t.Fatalf("advertised keepalive %dms", got)
	}
	// A raw connection that logs in and then stays silent is closed.
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 12, 1)
	start := time.Now()
	r.expectClosed(3 * time.Second)
	if el := time.Since(start); el < 500*time.Millisecond {
		t.Fatalf("silent connection closed after %s, before the idle timeout", el)
	}
	// The SDK client kept itself alive over more than three idle timeouts.
	time.Sleep(2 * time.Second)
	if c.State() != sdk.StateOnline || lost.Load() != 0 {
		t.Fatalf("SDK client state %s, lost %d times", c.State(), lost.Load())
	}
	if got := len(sessions(t, p, 1, 11)); got != 1 {
		t.Fatalf("sessions %d", got)
	}
}

func TestConcurrentLogins(t *testing.T) {
	const n = 1000
	p := start(t, nil)
	clients := make([]*sdk.Client, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	begin := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := sdk.Dial(context.Background(), sdk.Options{Addrs: []string{p.GatewayAddr()}, RequestTimeout: 20 * time.Second})
			if err != nil {
				errs <- err
				return
			}
			clients[i] = c
			appcode := uint32(101 + i%2) // two terminals per user
			if _, err := c.Login(context.Background(), creds(appcode, uint64(1+i/2))); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(begin)
	close(errs)
	for err := range errs {
		t.Errorf("login: %v", err)
	}
	t.Cleanup(func() {
		for _, c := range clients {
			if c != nil {
				_ = c.Close()
			}
		}
	})
	st, _ := p.Router.Stats(context.Background())
	if st.Sessions != n || st.Users != n/2 || p.Gateway.Conns() != n {
		t.Fatalf("sessions %d users %d conns %d, want %d %d %d", st.Sessions, st.Users, p.Gateway.Conns(), n, n/2, n)
	}
	t.Logf("%d concurrent logins in %s (race detector on makes this slow; see bench/ for rates)", n, elapsed)
}

// TestDebugAddrServesProfiler: --debug-addr serves Go's profiler on its
// own listener, and nothing of it is on the API port.
func TestDebugAddrServesProfiler(t *testing.T) {
	p := start(t, func(c *config.Config) { c.HTTP.DebugAddr = "127.0.0.1:0" })
	resp, err := http.Get("http://" + p.DebugAddr() + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "goroutine") {
		t.Fatalf("/debug/pprof/: %d %.200s", resp.StatusCode, body)
	}
	if code := api(t, p, "GET", "/debug/pprof/", "", nil, nil); code != 404 {
		t.Fatalf("the API port serves the profiler: %d", code)
	}
	if start(t, nil).DebugAddr() != "" {
		t.Fatal("the profiler is on by default")
	}
}
