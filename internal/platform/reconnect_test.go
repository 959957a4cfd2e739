package platform

import (
	"context"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/sdk"
)

// proxy forwards TCP connections to a target and can cut them all, which
// looks to both sides like a network failure.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	dials  atomic.Int32
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	px := &proxy{ln: ln, target: target}
	go px.serve()
	t.Cleanup(func() { _ = ln.Close(); px.cut() })
	return px
}

func (px *proxy) addr() string { return px.ln.Addr().String() }

func (px *proxy) serve() {
	for {
		a, err := px.ln.Accept()
		if err != nil {
			return
		}
		px.dials.Add(1)
		b, err := net.Dial("tcp", px.target)
		if err != nil {
			_ = a.Close()
			continue
		}
		px.mu.Lock()
		px.conns = append(px.conns, a, b)
		px.mu.Unlock()
		go func() { _, _ = io.Copy(a, b); _ = a.Close() }()
		go func() { _, _ = io.Copy(b, a); _ = b.Close() }()
	}
}

// cutOne cuts one random live connection and reports whether there was one.
func (px *proxy) cutOne(r *rand.Rand) bool {
	px.mu.Lock()
	defer px.mu.Unlock()
	if len(px.conns) < 2 {
		return false
	}
	i := r.IntN(len(px.conns)/2) * 2
	a, b := px.conns[i], px.conns[i+1]
	px.conns = append(px.conns[:i], px.conns[i+2:]...)
	_ = a.Close()
	_ = b.Close()
	return true
}

func (px *proxy) cut() {
	px.mu.Lock()
	defer px.mu.Unlock()
	for _, c := range px.conns {
		_ = c.Close()
	}
	px.conns = nil
}

// refuser accepts connections and closes them at once: a gateway that is
// up but broken. It counts the attempts.
func refuser(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() { _ = ln.Close() })
	return ln.Addr().String(), &n
}

type stateLog struct {
	mu     sync.Mutex
	states []sdk.State
}

func (s *stateLog) record(st sdk.State, _ error) {
	s.mu.Lock()
	s.states = append(s.states, st)
	s.mu.Unlock()
}

func (s *stateLog) count(st sdk.State) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, x := range s.states {
		if x == st {
			n++
		}
	}
	return n
}

// TestReconnectPrefersLastGateway: the client's first address is dead, so
// it lands on the second; when that connection is cut it goes straight back
// to the gateway that worked, logs in again and is online once more.
func TestReconnectPrefersLastGateway(t *testing.T) {
	p := start(t, nil)
	px := newProxy(t, p.GatewayAddr())
	// A listener that is gone: connection refused.
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := gone.Addr().String()
	_ = gone.Close()
	var states stateLog
	c := login(t, p, 101, 21, func(o *sdk.Options) {
		o.Addrs = []string{deadAddr, px.addr()}
		o.OnState = states.record
	})
	epoch := c.LoginInfo().Epoch
	for round := 1; round <= 3; round++ {
		px.cut()
		eventually(t, 5*time.Second, "back online", func() bool {
			return c.State() == sdk.StateOnline && c.LoginInfo().Epoch != epoch
		})
		epoch = c.LoginInfo().Epoch
		if got := px.dials.Load(); got != int32(1+round) {
			t.Fatalf("round %d: %d dials to the proxy, want %d", round, got, 1+round)
		}
	}
	if _, err := c.Keepalive(context.Background()); err != nil {
		t.Fatalf("keepalive after reconnects: %v", err)
	}
	if states.count(sdk.StateOffline) < 3 {
		t.Fatalf("OnState saw %d offline transitions, want >= 3", states.count(sdk.StateOffline))
	}
	// One session, the latest: the old ones were unregistered on disconnect.
	eventually(t, 2*time.Second, "one session", func() bool {
		ss := sessions(t, p, 1, 21)
		return len(ss) == 1 && ss[0].Epoch == epoch
	})
}

// TestReconnectSkipsBrokenGateway: the preferred gateway accepts and drops
// connections; the client moves on to the next one.
func TestReconnectSkipsBrokenGateway(t *testing.T) {
	p := start(t, nil)
	px := newProxy(t, p.GatewayAddr())
	var states stateLog
	c := login(t, p, 101, 22, func(o *sdk.Options) {
		o.Addrs = []string{px.addr(), p.GatewayAddr()}
		o.OnState = states.record
	})
	_ = px.ln.Close() // the first gateway goes away for good
	px.cut()
	eventually(t, 5*time.Second, "online again", func() bool {
		return states.count(sdk.StateOffline) > 0 && c.State() == sdk.StateOnline
	})
	if _, err := c.Keepalive(context.Background()); err != nil {
		t.Fatal(err)
	}
	addr, attempts := refuser(t)
	c2 := login(t, p, 101, 23, func(o *sdk.Options) { o.Addrs = []string{p.GatewayAddr(), addr} })
	if attempts.Load() != 0 {
		t.Fatalf("the first address worked but the client dialed the second %d times", attempts.Load())
	}
	_ = c2
}

// TestGracefulShutdownMovesClients: a draining gateway sends GoAway, the
// client moves to the other gateway of its list, and the drained gateway
// has unregistered every session when Shutdown returns.
func TestGracefulShutdownMovesClients(t *testing.T) {
	a := start(t, nil)
	b := start(t, nil)
	const n = 20
	var clients []*sdk.Client
	for i := range n {
		clients = append(clients, login(t, a, 101, uint64(300+i), func(o *sdk.Options) {
			o.Addrs = []string{a.GatewayAddr(), b.GatewayAddr()}
		}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	began := time.Now()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v (clients did not leave within the grace)", err)
	}
	if a.Gateway.Conns() != 0 {
		t.Fatalf("%d connections left after shutdown", a.Gateway.Conns())
	}
	st, err := routerAfter(t, a).Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Sessions != 0 {
		t.Fatalf("drained gateway left %d sessions in its router", st.Sessions)
	}
	t.Logf("drained %d clients in %s", n, time.Since(began))
	eventually(t, 10*time.Second, "all clients on gateway b", func() bool { return b.Gateway.Conns() == n })
	for i, c := range clients {
		eventually(t, 5*time.Second, "client online", func() bool { return c.State() == sdk.StateOnline })
		if c.LoginInfo().GateId != b.Gateway.ID() {
			t.Fatalf("client %d on gate %q, want %q", i, c.LoginInfo().GateId, b.Gateway.ID())
		}
		if _, err := c.Keepalive(context.Background()); err != nil {
			t.Fatalf("client %d keepalive on b: %v", i, err)
		}
	}
	// A client that dials the drained address now is refused (nothing listens).
	if _, err := net.DialTimeout("tcp", a.GatewayAddr(), time.Second); err == nil {
		t.Fatal("drained gateway still accepts connections")
	}
}

// TestShutdownForcesStragglers: a client that ignores GoAway is closed when
// the grace ends, and its session is unregistered.
func TestShutdownForcesStragglers(t *testing.T) {
	p := start(t, nil)
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 31, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := p.Shutdown(ctx)
	if err == nil {
		t.Fatal("shutdown reported a clean drain though a client stayed")
	}
	h, _ := r.read()
	if h.Cmd != schema.CmdGoAway || h.Kind() != schema.KindNotify {
		t.Fatalf("first frame after shutdown %+v, want a GoAway notify", h)
	}
	r.expectClosed(2 * time.Second)
	if ss, _ := routerAfter(t, p).Lookup(context.Background(), router.User{Account: 1, UID: 31}); len(ss) != 0 {
		t.Fatalf("sessions left: %+v", ss)
	}
}
