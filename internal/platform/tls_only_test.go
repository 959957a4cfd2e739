package platform

import (
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testcert"
)

// TestTLSOnlyGateway: with an empty gateway address and a TLS address the
// gateway binds no plain-TCP port, is ready, advertises and reports the
// TLS address, and serves SDK clients over TLS.
func TestTLSOnlyGateway(t *testing.T) {
	ca := testcert.NewCA(t, "imd test CA")
	p := startTLS(t, ca, t.TempDir(), func(c *config.Config) { c.Gateway.Addr = "" })
	if a := p.Gateway.Addr(); a != nil {
		t.Fatalf("a plain listener at %s with an empty gateway address", a)
	}
	if p.GatewayAddr() != p.TLSAddr() || p.gateAddr != p.TLSAddr() {
		t.Fatalf("GatewayAddr %q, advertised %q; want the TLS address %q", p.GatewayAddr(), p.gateAddr, p.TLSAddr())
	}
	if code := api(t, p, "GET", "/readyz", "", nil, nil); code != 200 {
		t.Fatalf("/readyz: %d, want 200", code)
	}
	var got received
	chatter(t, p, 101, 1, &got, nil, overTLS(p, ca))
	sender := login(t, p, 101, 2, overTLS(p, ca))
	if _, err := sender.SendC2C(ctxb, acct1(1), 7, []byte("tls only")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the message over a TLS-only gateway", func() bool { return got.len() == 1 })
}

// TestTLSPlainPortOnlyWhenAsked: with a TLS address, a gateway address
// alone opens no plain-TCP port; --plain-tcp does.
func TestTLSPlainPortOnlyWhenAsked(t *testing.T) {
	ca := testcert.NewCA(t, "imd test CA")
	p := startTLS(t, ca, t.TempDir(), func(c *config.Config) { c.Gateway.PlainTCP = false })
	if a := p.Gateway.Addr(); a != nil {
		t.Fatalf("a plain listener at %s without --plain-tcp", a)
	}
	if p.GatewayAddr() != p.TLSAddr() {
		t.Fatalf("GatewayAddr %q, want the TLS address %q", p.GatewayAddr(), p.TLSAddr())
	}
	q := startTLS(t, ca, t.TempDir(), nil) // startTLS asks for the plain port
	if q.Gateway.Addr() == nil || q.GatewayAddr() == q.TLSAddr() {
		t.Fatal("no plain listener with --plain-tcp")
	}
}
