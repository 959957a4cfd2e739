// Package testnet has the network pieces the multi-process and two-DC
// tests and benchmarks stand up on loopback: a TCP proxy that plays the
// WAN between data centers (cut, restored, or slowed by a fixed delay).
package testnet

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy forwards TCP connections from its own loopback address to a
// target. Cut closes every connection and refuses new ones, which looks
// to both ends like a network partition; Restore lets them through
// again. With a delay, every chunk read is written that much later, in
// order, in both directions: a WAN's one-way latency.
type Proxy struct {
	ln     net.Listener
	target string
	delay  time.Duration

	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}

	// Bytes counts what crossed the proxy, both directions.
	Bytes atomic.Int64
}

// NewProxy listens on host:0 (host "" is 127.0.0.1) and forwards to
// target with the given one-way delay (0: none). Close it when done.
func NewProxy(host, target string, delay time.Duration) (*Proxy, error) {
	if host == "" {
		host = "127.0.0.1"
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return nil, err
	}
	px := &Proxy{ln: ln, target: target, delay: delay, conns: map[net.Conn]struct{}{}}
	go px.serve()
	return px, nil
}

// Addr is where to dial to go through the proxy.
func (px *Proxy) Addr() string { return px.ln.Addr().String() }

// SetTarget changes where new connections go.
func (px *Proxy) SetTarget(target string) {
	px.mu.Lock()
	px.target = target
	px.mu.Unlock()
}

func (px *Proxy) serve() {
	for {
		a, err := px.ln.Accept()
		if err != nil {
			return
		}
		px.mu.Lock()
		down, target := px.down, px.target
		px.mu.Unlock()
		if down {
			_ = a.Close()
			continue
		}
		b, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			_ = a.Close()
			continue
		}
		if !px.track(a, b) {
			continue
		}
		go px.pipe(a, b)
		go px.pipe(b, a)
	}
}

// track registers a and b unless the proxy was cut meanwhile.
func (px *Proxy) track(a, b net.Conn) bool {
	px.mu.Lock()
	defer px.mu.Unlock()
	if px.down {
		_ = a.Close()
		_ = b.Close()
		return false
	}
	px.conns[a], px.conns[b] = struct{}{}, struct{}{}
	return true
}

func (px *Proxy) forget(cs ...net.Conn) {
	px.mu.Lock()
	for _, c := range cs {
		delete(px.conns, c)
		_ = c.Close()
	}
	px.mu.Unlock()
}

// pipe copies from src to dst, each chunk after the delay.
func (px *Proxy) pipe(dst, src net.Conn) {
	defer px.forget(dst, src)
	if px.delay <= 0 {
		_, _ = io.Copy(countingWriter{dst, &px.Bytes}, src)
		return
	}
	type chunk struct {
		at time.Time
		b  []byte
	}
	q := make(chan chunk, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range q {
			if d := time.Until(c.at); d > 0 {
				time.Sleep(d)
			}
			if _, err := dst.Write(c.b); err != nil {
				for range q { // drain: the reader stops on its own
				}
				return
			}
			px.Bytes.Add(int64(len(c.b)))
		}
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			q <- chunk{at: time.Now().Add(px.delay), b: append([]byte(nil), buf[:n]...)}
		}
		if err != nil {
			break
		}
	}
	close(q)
	<-done
}

// Cut closes every connection through the proxy and refuses new ones.
func (px *Proxy) Cut() {
	px.mu.Lock()
	defer px.mu.Unlock()
	px.down = true
	for c := range px.conns {
		_ = c.Close()
	}
	clear(px.conns)
}

// Restore lets connections through again.
func (px *Proxy) Restore() {
	px.mu.Lock()
	px.down = false
	px.mu.Unlock()
}

// Close stops the proxy and closes its connections.
func (px *Proxy) Close() error {
	err := px.ln.Close()
	px.Cut()
	return err
}

// countingWriter adds what it writes to n as it goes.
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	k, err := c.w.Write(b)
	c.n.Add(int64(k))
	return k, err
}
