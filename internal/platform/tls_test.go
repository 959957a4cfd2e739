package platform

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testcert"
	"github.com/imd-dev/imd/sdk"
)

// startTLS runs a platform with a TLS listener whose certificate ca
// signed (serial 2), in files under dir.
func startTLS(t *testing.T, ca *testcert.CA, dir string, mod func(*config.Config)) *Platform {
	t.Helper()
	certFile, keyFile := ca.Issue(t, dir, 2)
	return start(t, func(c *config.Config) {
		c.Gateway.TLSAddr = "127.0.0.1:0"
		c.Gateway.TLSCert, c.Gateway.TLSKey = certFile, keyFile
		c.Gateway.PlainTCP = true // the tests' plain clients beside the TLS ones
		if mod != nil {
			mod(c)
		}
	})
}

// overTLS points an SDK client at the TLS listener, trusting ca.
func overTLS(p *Platform, ca *testcert.CA) func(*sdk.Options) {
	return func(o *sdk.Options) {
		o.Addrs = []string{p.TLSAddr()}
		o.TLS = &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName}
	}
}

// handshake opens a TLS connection to the TLS listener with cfg.
func handshake(p *Platform, cfg *tls.Config) (*tls.Conn, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	nc, err := d.DialContext(context.Background(), "tcp", p.TLSAddr())
	if err != nil {
		return nil, err
	}
	return nc.(*tls.Conn), nil
}

// TestTLSChatWithTCPClient: an SDK client on the TLS port (a private CA,
// the certificate's server name) and one on the plain TCP port chat both
// ways; the TLS session is TLS 1.3.
func TestTLSChatWithTCPClient(t *testing.T) {
	ca := testcert.NewCA(t, "imd test CA")
	p := startTLS(t, ca, t.TempDir(), nil)
	var aliceGot, bobGot received
	alice := chatter(t, p, 101, 1, &aliceGot, nil, overTLS(p, ca))
	bob := chatter(t, p, 101, 2, &bobGot, nil, nil)

	if _, err := alice.SendC2C(ctxb, acct1(2), 7, []byte("over tls")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "bob (tcp) got alice's message", func() bool { return bobGot.len() == 1 })
	if _, err := bob.SendC2C(ctxb, acct1(1), 7, []byte("over tcp")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "alice (tls) got bob's message", func() bool { return aliceGot.len() == 1 })
	if m := aliceGot.msgs[0]; string(m.Content) != "over tcp" || m.From.GetUid() != 2 {
		t.Fatalf("alice got %+v", m)
	}
	if m := bobGot.msgs[0]; string(m.Content) != "over tls" || m.From.GetUid() != 1 {
		t.Fatalf("bob got %+v", m)
	}

	tc, err := handshake(p, &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if v := tc.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Fatalf("negotiated %s, want TLS 1.3", tls.VersionName(v))
	}
}

// TestTLSRefusals: a client that does not trust the CA fails the
// handshake, TLS 1.2 is refused while the minimum is 1.3, and bytes that
// are no TLS handshake get the connection closed; the listener goes on
// serving a good client.
func TestTLSRefusals(t *testing.T) {
	ca := testcert.NewCA(t, "imd test CA")
	p := startTLS(t, ca, t.TempDir(), nil)

	t.Run("untrusted CA", func(t *testing.T) {
		other := testcert.NewCA(t, "another CA")
		_, err := handshake(p, &tls.Config{RootCAs: other.Pool, ServerName: testcert.ServerName})
		var unknown x509.UnknownAuthorityError
		if err == nil || !errors.As(err, &unknown) {
			t.Fatalf("handshake with a CA that did not sign the certificate: %v, want an unknown authority error", err)
		}
		// the SDK reports it and does not log in
		c, err := sdk.Dial(ctxb, sdk.Options{Addrs: []string{p.TLSAddr()}, NoReconnect: true, RequestTimeout: 2 * time.Second,
			TLS: &tls.Config{RootCAs: other.Pool, ServerName: testcert.ServerName}})
		if err == nil {
			ctx, cancel := context.WithTimeout(ctxb, 2*time.Second)
			_, err = c.Login(ctx, creds(101, 9))
			cancel()
			_ = c.Close()
		}
		if err == nil {
			t.Fatal("an SDK client that does not trust the CA logged in")
		}
	})
	t.Run("TLS 1.2", func(t *testing.T) {
		_, err := handshake(p, &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName, MaxVersion: tls.VersionTLS12})
		if err == nil {
			t.Fatal("a TLS 1.2 handshake succeeded with tls_min_version 1.3")
		}
	})
	t.Run("garbage", func(t *testing.T) {
		nc, err := net.DialTimeout("tcp", p.TLSAddr(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		if _, err := nc.Write([]byte("IMD\x01 this is no client hello, just bytes\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.Copy(io.Discard, nc) // whatever the server answers, then EOF
		if err != nil && !isReset(err) {
			t.Fatalf("connection not closed after garbage: %v", err)
		}
	})
	// still serving
	c := login(t, p, 101, 3, overTLS(p, ca))
	if _, err := c.OfflineCount(ctxb); err != nil {
		t.Fatal(err)
	}
}

// TestTLSReload: a reload swaps the certificate for new handshakes while
// a TLS connection made before it stays up and served; a reload from bad
// files fails and keeps the certificate in use.
func TestTLSReload(t *testing.T) {
	ca := testcert.NewCA(t, "imd test CA")
	dir := t.TempDir()
	p := startTLS(t, ca, dir, nil)
	cfg := &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName}
	serial := func() int64 {
		t.Helper()
		tc, err := handshake(p, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		return tc.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if s := serial(); s != 2 {
		t.Fatalf("serial %d before the reload, want 2", s)
	}
	var got received
	old := chatter(t, p, 101, 1, &got, nil, overTLS(p, ca))

	ca.Issue(t, dir, 3)
	if _, ok, err := p.ReloadTLS(); !ok || err != nil {
		t.Fatalf("reload: ok %v, err %v", ok, err)
	}
	if s := serial(); s != 3 {
		t.Fatalf("serial %d after the reload, want 3", s)
	}
	// the connection from before the reload is still served
	if _, err := old.OfflineCount(ctxb); err != nil {
		t.Fatalf("the connection made before the reload: %v", err)
	}
	sender := login(t, p, 101, 2, overTLS(p, ca))
	if _, err := sender.SendC2C(ctxb, acct1(1), 7, []byte("after reload")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the old TLS connection got a message", func() bool { return got.len() == 1 })

	testcert.Write(t, dir+"/server.crt", []byte("not a certificate"))
	if _, ok, err := p.ReloadTLS(); !ok || err == nil {
		t.Fatalf("reload from a broken file: ok %v, err %v; want an error", ok, err)
	}
	if s := serial(); s != 3 {
		t.Fatalf("serial %d after a failed reload, want 3 (kept)", s)
	}
}
