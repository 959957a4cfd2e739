package sdk

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// gatewayServer is a fake gateway that counts its logins.
type gatewayServer struct {
	*fakeServer
	logins atomic.Int32
}

func newGatewayServer(t *testing.T) *gatewayServer {
	g := &gatewayServer{}
	g.fakeServer = newFakeServer(t, func(h schema.Header, _ []byte) (schema.Status, proto.Message, bool) {
		if h.Cmd == schema.CmdLogin {
			g.logins.Add(1)
		}
		resp, _ := answer(h.Cmd)
		return schema.StatusOK, resp, false
	})
	return g
}

// discoveryServer answers GET /v1/gateways with its list, which a test
// changes; status, when set, is answered instead.
type discoveryServer struct {
	srv    *httptest.Server
	mu     sync.Mutex
	list   []map[string]any
	status int
	asked  atomic.Int32
}

func newDiscoveryServer(t *testing.T, addrs ...string) *discoveryServer {
	d := &discoveryServer{}
	d.set(addrs...)
	d.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.asked.Add(1)
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.status != 0 {
			http.Error(w, `{"error": {}}`, d.status)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"dc": "dc1", "gateways": d.list})
	}))
	t.Cleanup(d.srv.Close)
	return d
}

func (d *discoveryServer) url() string { return d.srv.URL + "/v1/gateways" }

// set lists addrs as plain-TCP gateways of dc1, a TLS address beside each.
func (d *discoveryServer) set(addrs ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.list = nil
	for i, a := range addrs {
		d.list = append(d.list, map[string]any{"dc": "dc1", "id": "g" + a, "addr": a, "tls_addr": "tls-" + a,
			"web_addr": "", "load": i, "weight": 100 - i})
	}
}

func (d *discoveryServer) fail(status int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status = status
}

// deadAddr is a loopback address that refuses connections.
func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	_ = ln.Close()
	return a
}

func loginTest(t *testing.T, c *Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Login(ctx, Credentials{AppCode: 1, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
}

// TestDiscoveryDialsInOrder: a client given only a DiscoveryURL dials the
// gateways in the answer's order, passing over one that does not answer,
// and asks once.
func TestDiscoveryDialsInOrder(t *testing.T) {
	g1, g2 := newGatewayServer(t), newGatewayServer(t)
	d := newDiscoveryServer(t, deadAddr(t), g2.addr(), g1.addr())
	c, err := Dial(context.Background(), Options{DiscoveryURL: d.url(), DialTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	loginTest(t, c)
	if g1.logins.Load() != 0 || g2.logins.Load() != 1 {
		t.Fatalf("logins: %d on the second listed, %d on the third; want the second", g2.logins.Load(), g1.logins.Load())
	}
	if n := d.asked.Load(); n != 1 {
		t.Fatalf("discovery asked %d times, want 1", n)
	}
}

// TestDiscoveryFallsBackToAddrs: when discovery fails the client dials
// Options.Addrs, and without them Dial fails saying why.
func TestDiscoveryFallsBackToAddrs(t *testing.T) {
	g := newGatewayServer(t)
	d := newDiscoveryServer(t, g.addr())
	d.fail(http.StatusServiceUnavailable)
	c, err := Dial(context.Background(), Options{DiscoveryURL: d.url(), Addrs: []string{g.addr()}})
	if err != nil {
		t.Fatal(err)
	}
	loginTest(t, c)
	_ = c.Close()

	_, err = Dial(context.Background(), Options{DiscoveryURL: d.url()})
	if err == nil || !strings.Contains(err.Error(), "gateway discovery") || !strings.Contains(err.Error(), "503") {
		t.Fatalf("Dial with a failing discovery and no Addrs: %v, want an error naming discovery and its 503", err)
	}
	// An endpoint that does not answer in time fails within DiscoveryTimeout.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // accepts (in the backlog) and never answers
	start := time.Now()
	_, err = Dial(context.Background(), Options{DiscoveryURL: "http://" + ln.Addr().String() + "/v1/gateways", DiscoveryTimeout: 200 * time.Millisecond})
	if err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("Dial with a silent discovery endpoint: %v after %s", err, time.Since(start))
	}
}

// TestDiscoveryTLSAddrs: a client configured for TLS dials the answer's
// TLS addresses (here names that do not resolve, so the dial fails on
// them), never the plain ones.
func TestDiscoveryTLSAddrs(t *testing.T) {
	g := newGatewayServer(t)
	d := newDiscoveryServer(t, g.addr())
	d.mu.Lock()
	d.list[0]["tls_addr"] = "tls.invalid:7443"
	d.mu.Unlock()
	var dialled []string
	var mu sync.Mutex
	_, err := Dial(context.Background(), Options{DiscoveryURL: d.url(), TLS: &tls.Config{MinVersion: tls.VersionTLS13},
		Dialer: func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			dialled = append(dialled, addr)
			mu.Unlock()
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}})
	if err == nil {
		t.Fatal("dialled a plain gateway over TLS")
	}
	mu.Lock()
	defer mu.Unlock()
	for _, a := range dialled {
		if a == g.addr() {
			t.Fatalf("a TLS client dialled the plain address %s (dialled %v)", a, dialled)
		}
	}
	if len(dialled) == 0 || dialled[len(dialled)-1] != "tls.invalid:7443" {
		t.Fatalf("dialled %v, want the TLS address last", dialled)
	}
}

// TestDiscoveryAfterEveryAddrFailed: when the gateways of the list are
// gone, the reconnect asks for the list again and logs in on the gateway
// it names now.
func TestDiscoveryAfterEveryAddrFailed(t *testing.T) {
	g1, g2 := newGatewayServer(t), newGatewayServer(t)
	d := newDiscoveryServer(t, g1.addr())
	online := make(chan struct{}, 16)
	c, err := Dial(context.Background(), Options{DiscoveryURL: d.url(), BackoffMin: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
		OnState: func(s State, _ error) {
			if s == StateOnline {
				online <- struct{}{}
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	loginTest(t, c)
	<-online
	d.set(g2.addr())
	_ = g1.ln.Close() // g1 is gone: no new connection
	g1.cutAll()
	select {
	case <-online:
	case <-time.After(10 * time.Second):
		t.Fatal("not back online within 10s")
	}
	if g2.logins.Load() != 1 {
		t.Fatalf("%d logins on the gateway discovered anew, want 1", g2.logins.Load())
	}
	if n := d.asked.Load(); n != 2 {
		t.Fatalf("discovery asked %d times, want 2 (at Dial, then when the list failed)", n)
	}
}

// TestDiscoveryAfterGoAway: a gateway that sends the client away (it
// drains) makes the client ask for the list again, and the gateway goes
// last in it should the answer still name it.
func TestDiscoveryAfterGoAway(t *testing.T) {
	g1, g2 := newGatewayServer(t), newGatewayServer(t)
	d := newDiscoveryServer(t, g1.addr(), g2.addr())
	online := make(chan struct{}, 16)
	c, err := Dial(context.Background(), Options{DiscoveryURL: d.url(), BackoffMin: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
		OnState: func(s State, _ error) {
			if s == StateOnline {
				online <- struct{}{}
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	loginTest(t, c)
	<-online
	if g1.logins.Load() != 1 {
		t.Fatal("not logged in on the first gateway listed")
	}
	// The answer still lists g1 first (a logic node's cache): the client
	// puts it last.
	g1.push(schema.CmdGoAway, &pb.GoAway{Reason: "draining", ReconnectAfterMs: 40})
	select {
	case <-online:
	case <-time.After(10 * time.Second):
		t.Fatal("not back online within 10s")
	}
	if g2.logins.Load() != 1 || g1.logins.Load() != 1 {
		t.Fatalf("after the GoAway: %d logins on g1, %d on g2; want the second on g2", g1.logins.Load(), g2.logins.Load())
	}
	if n := d.asked.Load(); n != 2 {
		t.Fatalf("discovery asked %d times, want 2 (at Dial, after the GoAway)", n)
	}
}

// TestDiscoveryLeavesNoGoroutine: a client that used discovery leaves no
// goroutine behind once closed (no kept HTTP connection).
func TestDiscoveryLeavesNoGoroutine(t *testing.T) {
	g := newGatewayServer(t)
	d := newDiscoveryServer(t, g.addr())
	before := runtime.NumGoroutine()
	for range 5 {
		c, err := Dial(context.Background(), Options{DiscoveryURL: d.url()})
		if err != nil {
			t.Fatal(err)
		}
		loginTest(t, c)
		_ = c.Close()
		_ = c.Wait()
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 { // the fake servers' own readers end with them
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
