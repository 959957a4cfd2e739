package logic

import (
	"encoding/json"
	"net"
	"net/http"
	"testing"

	"github.com/imd-dev/imd/router"
)

const testHTTPKey = "key-http-0123456789abcdef"

// serveHTTP starts the HTTP API of a service with one app (appcode 1,
// account 1, key testHTTPKey) on a loopback port and returns its address.
func serveHTTP(t *testing.T, o HTTPOptions) string {
	t.Helper()
	svc, err := New(Options{Router: router.NewMemory(), Apps: []App{
		{AppCode: 1, Account: 1, Secrets: []string{"0123456789abcdef0123"}, APIKeys: []string{testHTTPKey}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewHTTPServer(svc, o)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Shutdown()
		<-done
	})
	return ln.Addr().String()
}

func get(t *testing.T, addr, path, auth string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, m
}

// TestHTTPAuthSchemeAnyCase: the auth scheme is case-insensitive
// (RFC 9110, 11.1), so "bearer" works like "Bearer".
func TestHTTPAuthSchemeAnyCase(t *testing.T) {
	addr := serveHTTP(t, HTTPOptions{})
	for _, auth := range []string{"Bearer " + testHTTPKey, "bearer " + testHTTPKey, "BEARER " + testHTTPKey, "bEaReR  " + testHTTPKey} {
		if code, body := get(t, addr, "/v1/presence?uid=5", auth); code != 200 {
			t.Errorf("Authorization %q: HTTP %d %v, want 200", auth, code, body)
		}
	}
	for _, auth := range []string{"", "Bearer", "Bearer ", "Basic " + testHTTPKey, "Bearer" + testHTTPKey, "bearer wrong-key-0123456789"} {
		if code, body := get(t, addr, "/v1/presence?uid=5", auth); code != 401 {
			t.Errorf("Authorization %q: HTTP %d %v, want 401", auth, code, body)
		}
	}
}

// TestPresenceUIDIsNumber: presence answers uid as a JSON number, as push
// results and requests do.
func TestPresenceUIDIsNumber(t *testing.T) {
	addr := serveHTTP(t, HTTPOptions{})
	code, body := get(t, addr, "/v1/presence?uid=5", "Bearer "+testHTTPKey)
	if code != 200 {
		t.Fatalf("HTTP %d %v", code, body)
	}
	if uid, ok := body["uid"].(float64); !ok || uid != 5 {
		t.Fatalf("uid is %#v (%T), want the number 5", body["uid"], body["uid"])
	}
}
