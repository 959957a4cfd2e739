package config

import (
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
)

// TestAppAuthYAML: an app's auth section reads from YAML with durations,
// an app without one checks HMAC tokens, and a misspelt key is an error.
func TestAppAuthYAML(t *testing.T) {
	p := writeFile(t, `
apps:
  - appcode: 101
    account: 1
    auth:
      kind: jwt
      jwt: {jwks_url: "https://accounts.example/jwks.json", refresh: 5m, issuer: accounts, audience: imd, algorithms: [EdDSA]}
  - appcode: 201
    account: 2
    auth:
      kind: http
      http: {url: "http://127.0.0.1:9/check", timeout: 1500ms, cache_ttl: 30s, cache_size: 500}
  - appcode: 301
    account: 3
    secrets: ["0123456789abcdef0123"]
`)
	c, err := load(t, []string{"--config", p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	j, h := c.Apps[0].Auth.JWT, c.Apps[1].Auth.HTTP
	if c.Apps[0].AuthKind() != logic.AuthJWT || j == nil || j.JWKSURL != "https://accounts.example/jwks.json" || j.Refresh != 5*time.Minute ||
		j.Issuer != "accounts" || j.Audience != "imd" || len(j.Algorithms) != 1 {
		t.Fatalf("jwt app: %+v %+v", c.Apps[0].Auth, j)
	}
	if c.Apps[1].AuthKind() != logic.AuthHTTP || h == nil || h.Timeout != 1500*time.Millisecond || h.CacheTTL != 30*time.Second || h.CacheSize != 500 {
		t.Fatalf("http app: %+v %+v", c.Apps[1].Auth, h)
	}
	if c.Apps[2].AuthKind() != logic.AuthHMAC {
		t.Fatalf("app without auth: kind %q", c.Apps[2].AuthKind())
	}
	for i := range c.Apps {
		if err := c.Apps[i].Validate(); err != nil {
			t.Fatal(err)
		}
	}

	p = writeFile(t, `
apps:
  - appcode: 101
    account: 1
    auth: {kind: jwt, jwt: {jwks_uri: "https://accounts.example/jwks.json"}}
`)
	if _, err := load(t, []string{"--config", p}, nil); err == nil || !strings.Contains(err.Error(), "jwks_uri") {
		t.Fatalf("a misspelt key: %v", err)
	}
}
