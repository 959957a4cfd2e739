package main

import (
	"crypto/tls"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/testcert"
)

// TestSIGHUPReloadsTLS: SIGHUP makes imd read its TLS certificate again:
// the next handshake gets the new one, a connection made before stays up,
// and a reload from a broken file is logged and keeps the certificate.
func TestSIGHUPReloadsTLS(t *testing.T) {
	ca := testcert.NewCA(t, "imd test CA")
	dir := t.TempDir()
	certFile, keyFile := ca.Issue(t, dir, 2)
	p := startImd(t, 0, "--tls-addr", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile, "--plain-tcp")
	var addr string
	for _, l := range p.log() {
		if l["msg"] == "node started" {
			addr, _ = l["tls"].(string)
		}
	}
	if addr == "" {
		t.Fatal("the node started line names no tls address")
	}
	cfg := &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName}
	dial := func() *tls.Conn {
		t.Helper()
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
		nc, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = nc.Close() })
		return nc.(*tls.Conn)
	}
	serial := func(c *tls.Conn) int64 { return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64() }
	hup := func(msg string) {
		t.Helper()
		if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for !p.logged(msg) {
			if time.Now().After(deadline) {
				t.Fatalf("no %q logged within 5s of SIGHUP", msg)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	before := dial()
	if s := serial(before); s != 2 {
		t.Fatalf("serial %d, want 2", s)
	}
	ca.Issue(t, dir, 3)
	hup("SIGHUP: tls certificate reloaded")
	if s := serial(dial()); s != 3 {
		t.Fatalf("serial %d after SIGHUP, want 3", s)
	}
	testcert.Write(t, keyFile, []byte("not a key"))
	hup("SIGHUP: tls certificate reload failed; keeping the certificate in use")
	if s := serial(dial()); s != 3 {
		t.Fatalf("serial %d after a failed reload, want 3", s)
	}
	// the connection from before the reloads is still open: it is closed
	// only by the login timeout (10s), not by a reload
	_ = before.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := before.Read(make([]byte, 1)); err == nil {
		t.Fatal("the server sent bytes on an idle connection")
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("the connection made before the reloads: %v, want it open (a read timeout)", err)
	}
	select {
	case <-p.exited:
		t.Fatalf("imd exited after SIGHUP: %v", p.waitErr)
	default:
	}
}
