package logic

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
)

// jwksServer serves a JWKS that a test can change, counting the fetches.
type jwksServer struct {
	*httptest.Server
	mu      sync.Mutex
	keys    []map[string]string
	down    bool
	fetches atomic.Int32
}

func newJWKSServer(t *testing.T) *jwksServer {
	t.Helper()
	js := &jwksServer{}
	js.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		js.fetches.Add(1)
		js.mu.Lock()
		defer js.mu.Unlock()
		if js.down {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"keys": js.keys})
	}))
	t.Cleanup(js.Close)
	return js
}

func (js *jwksServer) set(keys ...map[string]string) {
	js.mu.Lock()
	js.keys = keys
	js.mu.Unlock()
}

func edJWK(kid string, pub ed25519.PublicKey) map[string]string {
	return map[string]string{"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "x": base64.RawURLEncoding.EncodeToString(pub)}
}

func rsaJWK(kid string, pub *rsa.PublicKey) map[string]string {
	return map[string]string{"kty": "RSA", "kid": kid, "alg": "RS256",
		"n": base64.RawURLEncoding.EncodeToString(pub.N.Bytes()),
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(pub.E)).Bytes())}
}

// signJWT signs claims with key (ed25519 or RSA) under kid ("" for none).
func signJWT(t *testing.T, key any, kid string, claims jwt.MapClaims) string {
	t.Helper()
	var m jwt.SigningMethod = jwt.SigningMethodEdDSA
	if _, ok := key.(*rsa.PrivateKey); ok {
		m = jwt.SigningMethodRS256
	}
	tok := jwt.NewWithClaims(m, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func claimsFor(uid uint64) jwt.MapClaims {
	return jwt.MapClaims{"sub": strconv.FormatUint(uid, 10), "exp": time.Now().Add(time.Hour).Unix(), "iss": "accounts.example", "aud": "imd"}
}

func newEd(t *testing.T) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv
}

func authService(t *testing.T, apps ...App) *Service {
	t.Helper()
	s, err := New(Options{Apps: apps, Router: router.NewMemory()})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var authConn atomic.Uint64

// tryLogin logs uid in on appcode with token and returns the status.
func tryLogin(s *Service, appcode uint32, uid uint64, token string) schema.Status {
	_, err := s.Login(context.Background(), LoginInput{AppCode: appcode, UID: uid, Token: token, Gate: "gate-a", Conn: authConn.Add(1)})
	if err == nil {
		return schema.StatusOK
	}
	if se, ok := err.(*schema.Error); ok {
		return se.Status
	}
	return schema.StatusInternal
}

func wantLogin(t *testing.T, what string, got, want schema.Status) {
	t.Helper()
	if got != want {
		t.Fatalf("%s: status %v, want %v", what, got, want)
	}
}

func TestAuthConfigValidate(t *testing.T) {
	cases := []struct {
		name string
		auth AuthConfig
		want string
	}{
		{"unknown kind", AuthConfig{Kind: "ldap"}, `kind "ldap" is not one of`},
		{"jwt without section", AuthConfig{Kind: AuthJWT}, "needs a jwt section"},
		{"jwt without keys", AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{}}, "keys_file or jwks_url"},
		{"jwt both keys", AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{KeysFile: "k.pem", JWKSURL: "https://a/jwks"}}, "not both"},
		{"jwt bad url", AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{JWKSURL: "ftp://a/jwks"}}, "not an http(s) URL"},
		{"jwt bad algorithm", AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{JWKSURL: "https://a/jwks", Algorithms: []string{"HS256"}}}, `"HS256" is not EdDSA or RS256`},
		{"http without url", AuthConfig{Kind: AuthHTTP, HTTP: &HTTPAuthConfig{}}, "http.url is required"},
		{"http negative", AuthConfig{Kind: AuthHTTP, HTTP: &HTTPAuthConfig{URL: "http://a/check", Timeout: -1}}, "must be >= 0"},
		{"section of another kind", AuthConfig{HTTP: &HTTPAuthConfig{URL: "http://a/check"}}, "an http section is set but kind is hmac"},
	}
	for _, tc := range cases {
		a := App{AppCode: 1, Account: 1, Auth: tc.auth}
		if err := a.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error about %q", tc.name, err, tc.want)
		}
	}
	// Apps that do not check HMAC tokens need no secret.
	ok := App{AppCode: 1, Account: 1, Auth: AuthConfig{Kind: AuthHTTP, HTTP: &HTTPAuthConfig{URL: "http://127.0.0.1:1/check"}}}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	// The missing keys file is reported by New, with the appcode.
	bad := App{AppCode: 7, Account: 1, Auth: AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{KeysFile: filepath.Join(t.TempDir(), "none.pem")}}}
	if _, err := New(Options{Apps: []App{bad}, Router: router.NewMemory()}); err == nil || !strings.Contains(err.Error(), "appcode 7: auth:") {
		t.Fatalf("New with a missing keys file: %v", err)
	}
}

// TestJWTAuthLogin: an app of kind jwt logs in with EdDSA and RS256 tokens
// verified with its JWKS, and each wrong token gets its status, while an
// HMAC app beside it keeps its tokens.
func TestJWTAuthLogin(t *testing.T) {
	edPub, edPriv := newEd(t)
	rsaPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	js := newJWKSServer(t)
	js.set(edJWK("ed-1", edPub), rsaJWK("rsa-1", &rsaPriv.PublicKey))
	secret := "0123456789abcdef0123"
	s := authService(t,
		App{AppCode: 1, Account: 1, Auth: AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{JWKSURL: js.URL, Issuer: "accounts.example", Audience: "imd"}}},
		App{AppCode: 2, Account: 2, Secrets: []string{secret}},
	)
	wantLogin(t, "EdDSA", tryLogin(s, 1, 42, signJWT(t, edPriv, "ed-1", claimsFor(42))), schema.StatusOK)
	wantLogin(t, "RS256", tryLogin(s, 1, 42, signJWT(t, rsaPriv, "rsa-1", claimsFor(42))), schema.StatusOK)
	wantLogin(t, "hmac app", tryLogin(s, 2, 42, MintToken(secret, 2, 42, time.Now().Add(time.Hour))), schema.StatusOK)
	wantLogin(t, "hmac token on the jwt app", tryLogin(s, 1, 42, MintToken(secret, 1, 42, time.Now().Add(time.Hour))), schema.StatusTokenMalformed)
	wantLogin(t, "jwt on the hmac app", tryLogin(s, 2, 42, signJWT(t, edPriv, "ed-1", claimsFor(42))), schema.StatusTokenMalformed)

	_, otherPriv := newEd(t)
	wantLogin(t, "forged signature", tryLogin(s, 1, 42, signJWT(t, otherPriv, "ed-1", claimsFor(42))), schema.StatusTokenInvalid)
	wantLogin(t, "another uid", tryLogin(s, 1, 43, signJWT(t, edPriv, "ed-1", claimsFor(42))), schema.StatusTokenMismatch)
	c := claimsFor(42)
	c["exp"] = time.Now().Add(-time.Minute).Unix()
	wantLogin(t, "expired", tryLogin(s, 1, 42, signJWT(t, edPriv, "ed-1", c)), schema.StatusTokenExpired)
	c = claimsFor(42)
	delete(c, "exp")
	wantLogin(t, "no exp", tryLogin(s, 1, 42, signJWT(t, edPriv, "ed-1", c)), schema.StatusTokenMalformed)
	c = claimsFor(42)
	c["iss"] = "elsewhere"
	wantLogin(t, "another issuer", tryLogin(s, 1, 42, signJWT(t, edPriv, "ed-1", c)), schema.StatusTokenMismatch)
	c = claimsFor(42)
	c["aud"] = "someone-else"
	wantLogin(t, "another audience", tryLogin(s, 1, 42, signJWT(t, edPriv, "ed-1", c)), schema.StatusTokenMismatch)
	hs, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, claimsFor(42)).SignedString([]byte(secret))
	wantLogin(t, "HS256", tryLogin(s, 1, 42, hs), schema.StatusTokenInvalid)
	wantLogin(t, "garbage", tryLogin(s, 1, 42, "not-a-jwt"), schema.StatusTokenMalformed)
}

// TestJWTKeyRotation: a key added to the JWKS verifies at once (an unknown
// kid loads the set again), a removed key stops verifying after the next
// refresh, and unknown kids do not make imd fetch the set over and over.
func TestJWTKeyRotation(t *testing.T) {
	pub1, priv1 := newEd(t)
	pub2, priv2 := newEd(t)
	js := newJWKSServer(t)
	js.set(edJWK("k1", pub1))
	s := authService(t, App{AppCode: 1, Account: 1, Auth: AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{JWKSURL: js.URL, Refresh: time.Hour}}})
	if n := js.fetches.Load(); n != 1 {
		t.Fatalf("%d fetches at start, want 1", n)
	}
	old := signJWT(t, priv1, "k1", claimsFor(5))
	wantLogin(t, "first key", tryLogin(s, 1, 5, old), schema.StatusOK)

	js.set(edJWK("k1", pub1), edJWK("k2", pub2))
	wantLogin(t, "added key", tryLogin(s, 1, 5, signJWT(t, priv2, "k2", claimsFor(5))), schema.StatusOK)
	if n := js.fetches.Load(); n != 2 {
		t.Fatalf("%d fetches after the new kid, want 2", n)
	}
	// Within jwksMinInterval, unknown kids are refused without a fetch.
	for range 5 {
		wantLogin(t, "unknown kid", tryLogin(s, 1, 5, signJWT(t, priv2, "k9", claimsFor(5))), schema.StatusTokenInvalid)
	}
	if n := js.fetches.Load(); n != 2 {
		t.Fatalf("%d fetches after unknown kids, want 2", n)
	}

	// The periodic refresh drops the removed key. The test shortens the
	// period only now so that the counts above hold on a slow machine.
	js.set(edJWK("k2", pub2))
	s.auths[1].(*jwtAuth).cfg.Refresh = 100 * time.Millisecond
	deadline := time.Now().Add(5 * time.Second)
	for tryLogin(s, 1, 5, old) == schema.StatusOK {
		if time.Now().After(deadline) {
			t.Fatal("a token of the removed key still logs in")
		}
		time.Sleep(50 * time.Millisecond)
	}
	wantLogin(t, "removed key", tryLogin(s, 1, 5, old), schema.StatusTokenInvalid)
	wantLogin(t, "kept key", tryLogin(s, 1, 5, signJWT(t, priv2, "k2", claimsFor(5))), schema.StatusOK)
}

// TestJWTKeysUnavailable: a JWKS that is down at start does not stop New;
// logins answer StatusUnavailable until the keys load.
func TestJWTKeysUnavailable(t *testing.T) {
	defer func(d time.Duration) { jwksMinInterval = d }(jwksMinInterval)
	jwksMinInterval = 0
	pub, priv := newEd(t)
	js := newJWKSServer(t)
	js.down = true
	s := authService(t, App{AppCode: 1, Account: 1, Auth: AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{JWKSURL: js.URL}}})
	tok := signJWT(t, priv, "k1", claimsFor(9))
	wantLogin(t, "keys down", tryLogin(s, 1, 9, tok), schema.StatusUnavailable)
	js.mu.Lock()
	js.down = false
	js.keys = []map[string]string{edJWK("k1", pub)}
	js.mu.Unlock()
	wantLogin(t, "keys back", tryLogin(s, 1, 9, tok), schema.StatusOK)
}

// TestJWTKeysFile: keys from a PEM file verify tokens with or without kid.
func TestJWTKeysFile(t *testing.T) {
	pub, priv := newEd(t)
	rsaPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	var pemData []byte
	for _, k := range []any{pub, &rsaPriv.PublicKey} {
		der, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			t.Fatal(err)
		}
		pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})...)
	}
	path := filepath.Join(t.TempDir(), "keys.pem")
	if err := os.WriteFile(path, pemData, 0o600); err != nil {
		t.Fatal(err)
	}
	s := authService(t, App{AppCode: 1, Account: 1, Auth: AuthConfig{Kind: AuthJWT, JWT: &JWTAuthConfig{KeysFile: path, Algorithms: []string{"EdDSA", "RS256"}}}})
	wantLogin(t, "EdDSA, no kid", tryLogin(s, 1, 3, signJWT(t, priv, "", claimsFor(3))), schema.StatusOK)
	wantLogin(t, "RS256, a kid", tryLogin(s, 1, 3, signJWT(t, rsaPriv, "any", claimsFor(3))), schema.StatusOK)
	_, other := newEd(t)
	wantLogin(t, "other key", tryLogin(s, 1, 3, signJWT(t, other, "", claimsFor(3))), schema.StatusTokenInvalid)
}

// loginServer is an app-server's login check: token "ok-<uid>" is valid.
type loginServer struct {
	*httptest.Server
	calls atomic.Int32
	mode  atomic.Value // "", "500" or "slow"
}

func newLoginServer(t *testing.T) *loginServer {
	t.Helper()
	ls := &loginServer{}
	ls.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ls.calls.Add(1)
		switch ls.mode.Load() {
		case "500":
			http.Error(w, "broken", http.StatusInternalServerError)
			return
		case "slow":
			time.Sleep(500 * time.Millisecond)
		}
		var in struct {
			AppCode uint32 `json:"appcode"`
			UID     uint64 `json:"uid"`
			Token   string `json:"token"`
		}
		if r.Method != http.MethodPost || json.NewDecoder(r.Body).Decode(&in) != nil {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		if in.Token == "forbidden" {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		ok := in.AppCode != 0 && in.Token == "ok-"+strconv.FormatUint(in.UID, 10)
		_ = json.NewEncoder(w).Encode(map[string]bool{"ok": ok})
	}))
	t.Cleanup(ls.Close)
	return ls
}

// TestHTTPAuthLogin: an app of kind http asks its app-server, remembers
// the yes answers, and answers StatusUnavailable when the app-server is
// down, slow or broken.
func TestHTTPAuthLogin(t *testing.T) {
	ls := newLoginServer(t)
	s := authService(t, App{AppCode: 1, Account: 1, Auth: AuthConfig{Kind: AuthHTTP, HTTP: &HTTPAuthConfig{URL: ls.URL, Timeout: 200 * time.Millisecond}}})
	wantLogin(t, "good token", tryLogin(s, 1, 11, "ok-11"), schema.StatusOK)
	wantLogin(t, "again", tryLogin(s, 1, 11, "ok-11"), schema.StatusOK)
	if n := ls.calls.Load(); n != 1 {
		t.Fatalf("%d calls for two logins, want 1 (the second from the cache)", n)
	}
	wantLogin(t, "another uid's token", tryLogin(s, 1, 12, "ok-11"), schema.StatusTokenInvalid)
	wantLogin(t, "refused twice", tryLogin(s, 1, 12, "ok-11"), schema.StatusTokenInvalid)
	if n := ls.calls.Load(); n != 3 {
		t.Fatalf("%d calls, want 3: a no is not remembered", n)
	}
	wantLogin(t, "403", tryLogin(s, 1, 12, "forbidden"), schema.StatusTokenInvalid)

	ls.mode.Store("500")
	wantLogin(t, "app-server broken", tryLogin(s, 1, 13, "ok-13"), schema.StatusUnavailable)
	ls.mode.Store("slow")
	wantLogin(t, "app-server slow", tryLogin(s, 1, 13, "ok-13"), schema.StatusUnavailable)
	ls.mode.Store("")
	wantLogin(t, "app-server back", tryLogin(s, 1, 13, "ok-13"), schema.StatusOK)

	ls.Close()
	wantLogin(t, "app-server down", tryLogin(s, 1, 14, "ok-14"), schema.StatusUnavailable)
	wantLogin(t, "remembered while down", tryLogin(s, 1, 11, "ok-11"), schema.StatusOK)
}

// TestAuthCache: the cache forgets answers past their ttl and the least
// recently used beyond its size.
func TestAuthCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newAuthCache(2, time.Minute, func() time.Time { return now })
	a, b, d := cacheKey(1, 1, "a"), cacheKey(1, 2, "b"), cacheKey(1, 3, "d")
	if cacheKey(1, 1, "a") != a || cacheKey(2, 1, "a") == a {
		t.Fatal("cache keys must name appcode, uid and token")
	}
	c.add(a)
	c.add(b)
	if !c.has(a) { // a is now the most recently used
		t.Fatal("a forgotten")
	}
	c.add(d)
	if c.has(b) || !c.has(a) || !c.has(d) || c.len() != 2 {
		t.Fatalf("after an eviction: b %v a %v d %v len %d", c.has(b), c.has(a), c.has(d), c.len())
	}
	now = now.Add(time.Minute)
	if c.has(a) || c.len() != 1 {
		t.Fatal("an answer outlived its ttl")
	}
}
