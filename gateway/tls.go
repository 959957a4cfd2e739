package gateway

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync/atomic"
	"time"
)

// Certificate is a TLS certificate and key loaded from files and held
// behind an atomic pointer: Reload swaps in the files' current contents
// for the handshakes that follow, while connections already up keep the
// session they negotiated. Its GetCertificate goes in a tls.Config.
type Certificate struct {
	certFile, keyFile string
	cur               atomic.Pointer[tls.Certificate]
}

// LoadCertificate reads a PEM certificate chain and its private key.
func LoadCertificate(certFile, keyFile string) (*Certificate, error) {
	c := &Certificate{certFile: certFile, keyFile: keyFile}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again. On an error (a file missing, unreadable,
// or a certificate that does not match its key) the certificate in use
// stays.
func (c *Certificate) Reload() error {
	kp, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("gateway: tls certificate %s, key %s: %w", c.certFile, c.keyFile, err)
	}
	if kp.Leaf == nil && len(kp.Certificate) > 0 {
		kp.Leaf, _ = x509.ParseCertificate(kp.Certificate[0])
	}
	c.cur.Store(&kp)
	return nil
}

// Current returns the certificate in use.
func (c *Certificate) Current() *tls.Certificate { return c.cur.Load() }

// NotAfter returns the expiry of the leaf certificate in use (the zero
// time when it cannot be parsed), for logs.
func (c *Certificate) NotAfter() time.Time {
	if kp := c.cur.Load(); kp != nil && kp.Leaf != nil {
		return kp.Leaf.NotAfter
	}
	return time.Time{}
}

// GetCertificate is tls.Config.GetCertificate: the certificate in use.
func (c *Certificate) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.cur.Load(), nil
}

// ServerTLSConfig returns the client port's TLS configuration: cert's
// current certificate at each handshake, and minVersion (0: TLS 1.3) as
// the oldest protocol version accepted.
func ServerTLSConfig(cert *Certificate, minVersion uint16) *tls.Config {
	if minVersion == 0 {
		minVersion = tls.VersionTLS13
	}
	return &tls.Config{GetCertificate: cert.GetCertificate, MinVersion: minVersion}
}

// ParseTLSVersion reads a protocol version as configured: "1.2" or "1.3"
// (empty: 1.3). Older versions are not offered.
func ParseTLSVersion(s string) (uint16, error) {
	switch s {
	case "", "1.3":
		return tls.VersionTLS13, nil
	case "1.2":
		return tls.VersionTLS12, nil
	}
	return 0, fmt.Errorf("tls min version %q: want 1.2 or 1.3", s)
}

// maxTLSRefusals bounds the goroutines that complete a TLS handshake only
// to tell a refused client why (draining, at MaxConns, rate limited);
// beyond it a refused TLS connection is closed without a word.
const maxTLSRefusals = 64
