package testnet

import (
	"bufio"
	"net"
	"testing"
	"time"
)

func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 1024)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func roundTrip(t *testing.T, addr string) (time.Duration, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	start := time.Now()
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return 0, err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return 0, err
	}
	if line != "ping\n" {
		t.Fatalf("echo %q", line)
	}
	return time.Since(start), nil
}

// TestProxyDelayCutRestore: a round trip through a 20 ms proxy takes at
// least 40 ms; a cut proxy refuses; a restored one forwards again.
func TestProxyDelayCutRestore(t *testing.T) {
	target := echoServer(t)
	px, err := NewProxy("", target, 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	d, err := roundTrip(t, px.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if d < 40*time.Millisecond {
		t.Fatalf("round trip %v through a 20ms-each-way proxy", d)
	}
	deadline := time.Now().Add(time.Second)
	for px.Bytes.Load() != 10 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond) // counted just after each write
	}
	if px.Bytes.Load() != 10 {
		t.Fatalf("%d bytes counted, want 10", px.Bytes.Load())
	}
	px.Cut()
	if _, err := roundTrip(t, px.Addr()); err == nil {
		t.Fatal("a round trip through a cut proxy")
	}
	px.Restore()
	if _, err := roundTrip(t, px.Addr()); err != nil {
		t.Fatalf("after restore: %v", err)
	}
}

// TestProxyCountsAsItGoes: without a delay, bytes are counted while the
// connection is still open.
func TestProxyCountsAsItGoes(t *testing.T) {
	px, err := NewProxy("", echoServer(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	c, err := net.Dial("tcp", px.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	for px.Bytes.Load() != 10 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := px.Bytes.Load(); got != 10 {
		t.Fatalf("%d bytes counted on an open connection, want 10", got)
	}
}
