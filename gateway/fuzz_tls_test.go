package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/testcert"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
)

// FuzzTLSConnInput is FuzzConnInput over the TLS listener: each input
// goes as application data on a real TLS 1.3 connection (a throwaway CA
// from internal/testcert) to a gateway with no plain listener, after a
// completed handshake. The gateway must answer only with well-formed
// frames, never panic, and let go of the connection once the peer
// leaves. Seeds: fuzzSeeds, and the corpus in
// testdata/fuzz/FuzzTLSConnInput.
func FuzzTLSConnInput(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	ca := testcert.NewCA(f, "imd fuzz CA")
	cert, err := LoadCertificate(ca.Issue(f, f.TempDir(), 2))
	if err != nil {
		f.Fatal(err)
	}
	svc, err := logic.New(logic.Options{
		Apps:   []logic.App{{AppCode: 101, Account: 1, Secrets: []string{fuzzSecret}}},
		Router: router.NewMemory(),
	})
	if err != nil {
		f.Fatal(err)
	}
	s, err := New(Options{NoPlain: true, TLSAddr: "127.0.0.1:0", TLS: ServerTLSConfig(cert, 0),
		LoginTimeout: time.Second, IdleTimeout: 2 * time.Second, WriteTimeout: time.Second}, svc)
	if err != nil {
		f.Fatal(err)
	}
	svc.AttachGate(s.ID(), s)
	if err := s.Listen(); err != nil {
		f.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve() }()
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			f.Errorf("Serve: %v", err)
		}
	})
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second},
		Config: &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName, MinVersion: tls.VersionTLS13}}
	addr := s.TLSAddr().String()
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		nc, err := d.DialContext(ctx, "tcp", addr) // the handshake completes here
		cancel()
		if err != nil {
			t.Fatalf("tls dial: %v", err)
		}
		fuzzTLSOne(t, s, nc.(*tls.Conn), data)
	})
}

// fuzzTLSOne writes data on an established TLS connection, half-closes it
// (close_notify) and reads the gateway's answers to the end; see fuzzOne.
func fuzzTLSOne(t *testing.T, s *Server, client *tls.Conn, data []byte) {
	defer client.Close()
	read := make(chan error, 1)
	go func() { read <- readAnswers(client) }()
	_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = client.Write(data)
	_ = client.CloseWrite() // close_notify; answers can still be read
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := <-read; err != nil {
		t.Fatalf("tls: %v", err)
	}
	_ = client.Close()
	deadline := time.Now().Add(3 * time.Second)
	for s.Conns() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("tls: gateway still holds %d connections after the peer left", s.Conns())
		}
		time.Sleep(time.Millisecond)
	}
}
