package logic

import (
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// readAll reads what the server writes on c until it closes it, failing
// after limit.
func readAll(t *testing.T, c net.Conn, limit time.Duration) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(limit))
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the server did not close the connection within %v (read %q)", limit, b)
	}
	return b
}

// TestHTTPIdleConnClosedSilently: a connection that sends nothing past the
// timeout, fresh or kept alive after a request, is closed with nothing
// written; an HTTP client would otherwise read an unsolicited 400 as the
// answer to the request it sends on that connection.
func TestHTTPIdleConnClosedSilently(t *testing.T) {
	const timeout = 300 * time.Millisecond
	addr := serveHTTP(t, HTTPOptions{ReadTimeout: timeout, IdleTimeout: timeout})

	fresh, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	start := time.Now()
	if b := readAll(t, fresh, 10*timeout); len(b) != 0 {
		t.Errorf("an idle fresh connection got %q", b)
	}
	if d := time.Since(start); d < timeout*8/10 {
		t.Errorf("closed after %v, before the %v timeout", d, timeout)
	}

	used, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer used.Close()
	if _, err := io.WriteString(used, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	b := readAll(t, used, 10*timeout)
	if n := strings.Count(string(b), "HTTP/1.1 "); n != 1 || !strings.HasPrefix(string(b), "HTTP/1.1 200") {
		t.Errorf("a kept-alive connection got %d responses: %q", n, b)
	}

	// A request that started and stalled is still answered.
	partial, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer partial.Close()
	if _, err := io.WriteString(partial, "GET /healthz HTTP/1.1\r\nHo"); err != nil {
		t.Fatal(err)
	}
	if b := readAll(t, partial, 10*timeout); !strings.HasPrefix(string(b), "HTTP/1.1 4") {
		t.Errorf("a request stalled in its headers got %q, want a 4xx", b)
	}
	body, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	if _, err := io.WriteString(body, "POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{\"to"); err != nil {
		t.Fatal(err)
	}
	if b := readAll(t, body, 10*timeout); !strings.HasPrefix(string(b), "HTTP/1.1 4") {
		t.Errorf("a request stalled in its body got %q, want a 4xx", b)
	}
}
