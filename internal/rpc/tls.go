package rpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"
)

// MutualTLS reads the internal RPC's mutual TLS material: this node's
// certificate chain and key, and the CA certificates that sign every
// node's. Its Server config goes in ServerOptions.TLS, its Client config
// in ClientOptions.TLS.
func MutualTLS(certFile, keyFile, caFile string) (server, client *tls.Config, err error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, nil, errors.New("rpc tls: needs a certificate, a key and a CA (--rpc-tls-cert, --rpc-tls-key, --rpc-tls-ca)")
	}
	kp, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("rpc tls: certificate %s, key %s: %w", certFile, keyFile, err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, nil, fmt.Errorf("rpc tls: ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, nil, fmt.Errorf("rpc tls: ca %s: no PEM certificate in it", caFile)
	}
	server = &tls.Config{
		Certificates: []tls.Certificate{kp},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS13,
	}
	client = &tls.Config{
		Certificates: []tls.Certificate{kp},
		RootCAs:      pool,
		MinVersion:   tls.VersionTLS13,
	}
	return server, client, nil
}

// tuneTCP sets what newLink sets on a plain link, for a connection about
// to be wrapped in TLS (newLink no longer sees the *net.TCPConn).
func tuneTCP(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		_ = tc.SetKeepAlive(true)
		_ = tc.SetKeepAlivePeriod(15 * time.Second)
	}
}

// clientTLS completes a TLS handshake as the gateway, verifying the
// logic node's certificate for the host in addr unless cfg names one.
func clientTLS(ctx context.Context, nc net.Conn, cfg *tls.Config, addr string) (net.Conn, error) {
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		cfg.ServerName = host
	}
	tuneTCP(nc)
	tc := tls.Client(nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("rpc tls handshake with %s: %w", addr, err)
	}
	return tc, nil
}

// handshakeTimeout bounds a gateway's TLS handshake on the logic side.
const handshakeTimeout = 10 * time.Second

// serverTLS completes a TLS handshake as the logic node: the gateway's
// client certificate must verify against the CA.
func (s *Server) serverTLS(nc net.Conn) (net.Conn, error) {
	return serverHandshake(s.hsCtx, nc, s.tls)
}

// serverHandshake completes the server side of a TLS handshake on nc
// (the peer's certificate must verify when cfg asks for one), bounded by
// handshakeTimeout and ctx; nc is closed when it fails.
func serverHandshake(ctx context.Context, nc net.Conn, cfg *tls.Config) (net.Conn, error) {
	tuneTCP(nc)
	tc := tls.Server(nc, cfg)
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = nc.Close()
		return nil, err
	}
	return tc, nil
}

// acceptLoop accepts on ln and hands each connection to handle until
// handle returns false or, after a failed Accept, stopping reports that
// the listener was closed on purpose. Failures that pass (EMFILE and the
// like) back off and go on.
func acceptLoop(ln net.Listener, what string, log *slog.Logger, stopping func() bool, handle func(net.Conn) bool) error {
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if stopping() {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("rpc: %s accept: %w", what, err)
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			log.Warn("rpc accept failed; backing off", "listener", what, "err", err, "backoff", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !handle(nc) {
			return nil
		}
	}
}
