package web

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/imd-dev/imd/logic"
)

func get(t *testing.T, h http.Handler, path string) (int, string, http.Header) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	b, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(b), rec.Result().Header
}

func TestServesThePage(t *testing.T) {
	h := Handler(Options{})
	for path, want := range map[string]string{
		"/demo/":           "<title>imd demo chat</title>",
		"/demo/app.js":     "import * as imd from \"./imd-sdk.js\"",
		"/demo/style.css":  "#messages",
		"/demo/imd-sdk.js": "",
	} {
		code, body, hdr := get(t, h, path)
		if code != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("GET %s: %d, body holds %q: %v", path, code, want, strings.Contains(body, want))
		}
		if path == "/demo/app.js" && !strings.Contains(hdr.Get("Content-Type"), "javascript") {
			t.Errorf("app.js served as %q: browsers refuse a module that is not JavaScript", hdr.Get("Content-Type"))
		}
	}
	for _, path := range []string{"/demo/nope.js", "/demo/token?appcode=101&uid=1", "/elsewhere"} {
		if code, _, _ := get(t, h, path); code != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, code)
		}
	}
	if _, body, _ := get(t, h, "/demo/config.json"); body != `{"mint":false}` {
		t.Errorf("config.json without Mint: %s", body)
	}
}

func TestMintsDemoTokens(t *testing.T) {
	apps := []logic.App{{AppCode: 101, Account: 1, Secrets: []string{"0123456789abcdef0123"}}}
	h := Handler(Options{Mint: AppsMint(apps)})
	if _, body, _ := get(t, h, "/demo/config.json"); body != `{"mint":true}` {
		t.Errorf("config.json with Mint: %s", body)
	}
	code, body, _ := get(t, h, "/demo/token?appcode=101&uid=42")
	if code != http.StatusOK {
		t.Fatalf("token: %d %s", code, body)
	}
	var out struct{ Token string }
	if err := json.Unmarshal([]byte(body), &out); err != nil {
		t.Fatal(err)
	}
	auth := logic.HMACAuth{}
	if err := auth.Authenticate(t.Context(), &apps[0], 42, out.Token); err != nil {
		t.Fatalf("minted token does not verify: %v", err)
	}
	if err := auth.Authenticate(t.Context(), &apps[0], 43, out.Token); err == nil {
		t.Fatal("the token verified for another uid")
	}
	for path, want := range map[string]int{
		"/demo/token?appcode=999&uid=1": http.StatusNotFound, // not a demo app
		"/demo/token?appcode=101&uid=0": http.StatusBadRequest,
		"/demo/token?appcode=101":       http.StatusBadRequest,
	} {
		if code, _, _ := get(t, h, path); code != want {
			t.Errorf("GET %s: %d, want %d", path, code, want)
		}
	}
}
