package logic

import (
	"bytes"
	"container/list"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imd-dev/imd/schema"
)

// The kinds of login check an appcode can choose (App.Auth.Kind).
const (
	AuthHMAC = "hmac" // tokens minted with the app's secrets (MintToken); the default
	AuthJWT  = "jwt"  // JWTs signed by the app's account system, verified with its public keys
	AuthHTTP = "http" // the app-server's own login check, asked over HTTP
)

// AuthConfig chooses how an appcode's logins are checked, so that each
// account system can check its own users' tokens.
type AuthConfig struct {
	// Kind is hmac (the default when empty), jwt or http.
	Kind string          `yaml:"kind" json:"kind,omitempty"`
	JWT  *JWTAuthConfig  `yaml:"jwt" json:"jwt,omitempty"`
	HTTP *HTTPAuthConfig `yaml:"http" json:"http,omitempty"`
}

// JWTAuthConfig configures kind jwt. A token's `sub` is the uid, `exp` is
// required, and `iss` and `aud` are checked when Issuer and Audience are set.
type JWTAuthConfig struct {
	// KeysFile is a PEM file of public keys (PUBLIC KEY, RSA PUBLIC KEY
	// or CERTIFICATE blocks). Exactly one of KeysFile and JWKSURL is set.
	KeysFile string `yaml:"keys_file" json:"keys_file,omitempty"`
	// JWKSURL serves the keys as a JSON Web Key Set (OKP/Ed25519 and RSA
	// keys).
	JWKSURL string `yaml:"jwks_url" json:"jwks_url,omitempty"`
	// Refresh is how old the keys may grow before they are loaded again
	// (the file re-read, the set fetched). A token whose kid is unknown
	// loads them at once, at most every 10 seconds. Default 10 minutes.
	Refresh time.Duration `yaml:"refresh" json:"refresh,omitempty"`
	// Issuer, when set, must equal the token's `iss`.
	Issuer string `yaml:"issuer" json:"issuer,omitempty"`
	// Audience, when set, must be one of the token's `aud`.
	Audience string `yaml:"audience" json:"audience,omitempty"`
	// Algorithms are the accepted signing algorithms: EdDSA and RS256
	// (the default, both).
	Algorithms []string `yaml:"algorithms" json:"algorithms,omitempty"`
}

// HTTPAuthConfig configures kind http: each login is checked by a POST of
// {"appcode", "uid", "token"} (JSON) to URL, which answers 200 with
// {"ok": true} or {"ok": false}; 401 and 403 also mean no.
type HTTPAuthConfig struct {
	URL string `yaml:"url" json:"url,omitempty"`
	// Timeout bounds one check. Default 2 seconds.
	Timeout time.Duration `yaml:"timeout" json:"timeout,omitempty"`
	// CacheTTL is how long a yes is remembered for the same (uid, token),
	// so that reconnects do not ask again. Default 1 minute.
	CacheTTL time.Duration `yaml:"cache_ttl" json:"cache_ttl,omitempty"`
	// CacheSize bounds the remembered answers (least recently used go
	// first). Default 10000.
	CacheSize int `yaml:"cache_size" json:"cache_size,omitempty"`
}

// AuthKind returns the app's kind of login check, hmac when unset.
func (a *App) AuthKind() string {
	if a.Auth.Kind == "" {
		return AuthHMAC
	}
	return a.Auth.Kind
}

var jwtAlgorithms = map[string]bool{"EdDSA": true, "RS256": true}

// validateAuth reports what is wrong with a.Auth.
func (a *App) validateAuth() []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("appcode %d: auth: "+format, append([]any{a.AppCode}, args...)...))
	}
	kind := a.AuthKind()
	switch kind {
	case AuthHMAC, AuthJWT, AuthHTTP:
	default:
		bad("kind %q is not one of hmac, jwt, http", a.Auth.Kind)
		return errs
	}
	if a.Auth.JWT != nil && kind != AuthJWT {
		bad("a jwt section is set but kind is %s", kind)
	}
	if a.Auth.HTTP != nil && kind != AuthHTTP {
		bad("an http section is set but kind is %s", kind)
	}
	switch kind {
	case AuthJWT:
		j := a.Auth.JWT
		if j == nil {
			bad("kind jwt needs a jwt section with keys_file or jwks_url")
			break
		}
		switch {
		case j.KeysFile == "" && j.JWKSURL == "":
			bad("jwt needs keys_file or jwks_url")
		case j.KeysFile != "" && j.JWKSURL != "":
			bad("jwt takes keys_file or jwks_url, not both")
		case j.JWKSURL != "":
			if err := checkHTTPURL(j.JWKSURL); err != nil {
				bad("jwt.jwks_url: %v", err)
			}
		}
		if j.Refresh < 0 {
			bad("jwt.refresh must be >= 0")
		}
		for _, alg := range j.Algorithms {
			if !jwtAlgorithms[alg] {
				bad("jwt.algorithms: %q is not EdDSA or RS256", alg)
			}
		}
	case AuthHTTP:
		h := a.Auth.HTTP
		if h == nil {
			bad("kind http needs an http section with a url")
			break
		}
		if h.URL == "" {
			bad("http.url is required")
		} else if err := checkHTTPURL(h.URL); err != nil {
			bad("http.url: %v", err)
		}
		if h.Timeout < 0 || h.CacheTTL < 0 || h.CacheSize < 0 {
			bad("http.timeout, http.cache_ttl and http.cache_size must be >= 0")
		}
	}
	return errs
}

func checkHTTPURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%q is not an http(s) URL", s)
	}
	return nil
}

// newAuthenticator builds the login check of a validated app. hmac is the
// authenticator used for kind hmac.
func newAuthenticator(app *App, hmac Authenticator, log *slog.Logger) (Authenticator, error) {
	switch app.AuthKind() {
	case AuthJWT:
		return newJWTAuth(app, log)
	case AuthHTTP:
		return newHTTPAuth(app), nil
	default:
		return hmac, nil
	}
}

// pubKey is one verification key and what it may verify.
type pubKey struct {
	kid string
	alg string // from the JWK's alg; empty: any algorithm of its type
	key crypto.PublicKey
}

// fits reports whether k may verify a token signed with alg.
func (k pubKey) fits(alg string) bool {
	if k.alg != "" && k.alg != alg {
		return false
	}
	switch k.key.(type) {
	case ed25519.PublicKey:
		return alg == "EdDSA"
	case *rsa.PublicKey:
		return alg == "RS256"
	}
	return false
}

// keySnapshot is the keys as loaded at one time; a refresh replaces it.
type keySnapshot struct {
	keys []pubKey
	at   time.Time
}

// match returns the keys that may verify a token with kid and alg: those
// carrying that kid, else those carrying none (a PEM file's keys).
func (s *keySnapshot) match(kid, alg string) []jwt.VerificationKey {
	var named, anon []jwt.VerificationKey
	for _, k := range s.keys {
		if !k.fits(alg) {
			continue
		}
		switch {
		case k.kid == "":
			anon = append(anon, k.key)
		case k.kid == kid:
			named = append(named, k.key)
		}
	}
	if len(named) > 0 {
		return named
	}
	return anon
}

// jwksMinInterval is how often a token with an unknown kid (or keys that
// never loaded) may make a JWT app load its keys again. Tests shorten it.
var jwksMinInterval = 10 * time.Second

// jwksFetchTimeout bounds one load of the keys.
const jwksFetchTimeout = 10 * time.Second

// maxJWKSBytes bounds a JWKS document.
const maxJWKSBytes = 1 << 20

// errKeysUnavailable: the app's keys never loaded.
var errKeysUnavailable = errors.New("the app's public keys are not loaded")

// jwtAuth checks JWTs with the public keys of one app.
type jwtAuth struct {
	appcode uint32
	cfg     JWTAuthConfig
	parser  *jwt.Parser
	log     *slog.Logger
	client  *http.Client
	now     func() time.Time

	keys      atomic.Pointer[keySnapshot]
	fetchMu   sync.Mutex // one load at a time
	lastForce atomic.Int64
	lastTry   atomic.Int64 // unix nanos of the last background load
	bgRunning atomic.Bool
}

func newJWTAuth(app *App, log *slog.Logger) (*jwtAuth, error) {
	cfg := *app.Auth.JWT
	if cfg.Refresh == 0 {
		cfg.Refresh = 10 * time.Minute
	}
	if len(cfg.Algorithms) == 0 {
		cfg.Algorithms = []string{"EdDSA", "RS256"}
	}
	opts := []jwt.ParserOption{jwt.WithValidMethods(cfg.Algorithms), jwt.WithExpirationRequired()}
	if cfg.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(cfg.Issuer))
	}
	if cfg.Audience != "" {
		opts = append(opts, jwt.WithAudience(cfg.Audience))
	}
	a := &jwtAuth{
		appcode: app.AppCode,
		cfg:     cfg,
		parser:  jwt.NewParser(opts...),
		log:     log,
		client:  &http.Client{Timeout: jwksFetchTimeout},
		now:     time.Now,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.load(ctx); err != nil {
		if cfg.KeysFile != "" {
			// A local file that does not load is a configuration mistake.
			return nil, fmt.Errorf("appcode %d: auth: %w", app.AppCode, err)
		}
		// A JWKS server that is down must not keep the platform from
		// starting: the app's logins answer StatusUnavailable until the
		// keys load.
		log.Warn("jwt keys did not load; logins of the appcode are refused as unavailable until they do",
			"appcode", app.AppCode, "url", cfg.JWKSURL, "err", err)
	}
	return a, nil
}

// load reads the keys from the file or the JWKS URL and installs them.
func (a *jwtAuth) load(ctx context.Context) error {
	var keys []pubKey
	var err error
	if a.cfg.KeysFile != "" {
		keys, err = readPEMKeys(a.cfg.KeysFile)
	} else {
		keys, err = a.fetchJWKS(ctx)
	}
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return errors.New("no usable Ed25519 or RSA key")
	}
	a.keys.Store(&keySnapshot{keys: keys, at: a.now()})
	return nil
}

// forceLoad loads the keys now unless another login did while this one
// waited, or a forced load happened within jwksMinInterval. It returns the
// keys to use.
func (a *jwtAuth) forceLoad(ctx context.Context, seen *keySnapshot) *keySnapshot {
	a.fetchMu.Lock()
	defer a.fetchMu.Unlock()
	if cur := a.keys.Load(); cur != seen {
		return cur
	}
	now := a.now().UnixNano()
	if last := a.lastForce.Load(); last != 0 && now-last < int64(jwksMinInterval) {
		return seen
	}
	a.lastForce.Store(now)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), jwksFetchTimeout)
	defer cancel()
	if err := a.load(ctx); err != nil {
		a.log.Warn("jwt keys did not load", "appcode", a.appcode, "err", err)
	}
	return a.keys.Load()
}

// refreshIfOld starts a background load when the keys are older than
// Refresh; the login goes on with the keys it has. A failing load is
// retried at most every jwksMinInterval.
func (a *jwtAuth) refreshIfOld(snap *keySnapshot) {
	now := a.now()
	if snap == nil || now.Sub(snap.at) < a.cfg.Refresh {
		return
	}
	if last := a.lastTry.Load(); last != 0 && now.UnixNano()-last < int64(min(jwksMinInterval, a.cfg.Refresh)) {
		return
	}
	if !a.bgRunning.CompareAndSwap(false, true) {
		return
	}
	a.lastTry.Store(now.UnixNano())
	go func() {
		defer a.bgRunning.Store(false)
		a.fetchMu.Lock()
		defer a.fetchMu.Unlock()
		if a.keys.Load() != snap {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), jwksFetchTimeout)
		defer cancel()
		if err := a.load(ctx); err != nil {
			a.log.Warn("jwt keys did not refresh; the old keys stay in use", "appcode", a.appcode, "err", err)
		}
	}()
}

// Authenticate implements Authenticator.
func (a *jwtAuth) Authenticate(ctx context.Context, app *App, uid uint64, token string) error {
	snap := a.keys.Load()
	a.refreshIfOld(snap)
	var claims jwt.RegisteredClaims
	_, err := a.parser.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		alg := t.Method.Alg()
		var keys []jwt.VerificationKey
		if snap != nil {
			keys = snap.match(kid, alg)
		}
		if len(keys) == 0 {
			// A kid never seen may be a key the app just added.
			snap = a.forceLoad(ctx, snap)
			if snap == nil {
				return nil, errKeysUnavailable
			}
			keys = snap.match(kid, alg)
		}
		switch len(keys) {
		case 0:
			return nil, fmt.Errorf("no %s key with kid %q", alg, kid)
		case 1:
			return keys[0], nil
		}
		return jwt.VerificationKeySet{Keys: keys}, nil
	})
	switch {
	case err == nil:
	case errors.Is(err, errKeysUnavailable):
		return schema.Errorf(schema.StatusUnavailable, "appcode %d: %v; retry later", app.AppCode, err)
	case errors.Is(err, jwt.ErrTokenMalformed):
		return schema.Errorf(schema.StatusTokenMalformed, "jwt does not parse")
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return schema.Errorf(schema.StatusTokenMalformed, "jwt has no exp")
	case errors.Is(err, jwt.ErrTokenExpired):
		return schema.Errorf(schema.StatusTokenExpired, "jwt expired")
	case errors.Is(err, jwt.ErrTokenInvalidIssuer), errors.Is(err, jwt.ErrTokenInvalidAudience):
		return schema.Errorf(schema.StatusTokenMismatch, "jwt is for another issuer or audience")
	default:
		return schema.Errorf(schema.StatusTokenInvalid, "jwt is not valid: %v", err)
	}
	if claims.Subject != strconv.FormatUint(uid, 10) {
		return schema.Errorf(schema.StatusTokenMismatch, "jwt is for sub %q, not uid %d", claims.Subject, uid)
	}
	return nil
}

// readPEMKeys reads the public keys of a PEM file.
func readPEMKeys(path string) ([]pubKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []pubKey
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		var k any
		switch b.Type {
		case "PUBLIC KEY":
			k, err = x509.ParsePKIXPublicKey(b.Bytes)
		case "RSA PUBLIC KEY":
			k, err = x509.ParsePKCS1PublicKey(b.Bytes)
		case "CERTIFICATE":
			var c *x509.Certificate
			if c, err = x509.ParseCertificate(b.Bytes); err == nil {
				k = c.PublicKey
			}
		default:
			return nil, fmt.Errorf("%s: a %s block is not a public key", path, b.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		switch k := k.(type) {
		case ed25519.PublicKey:
			keys = append(keys, pubKey{key: k})
		case *rsa.PublicKey:
			if k.N.BitLen() < 2048 {
				return nil, fmt.Errorf("%s: an RSA key of %d bits is too small (2048 at least)", path, k.N.BitLen())
			}
			keys = append(keys, pubKey{key: k})
		default:
			return nil, fmt.Errorf("%s: a %T key is neither Ed25519 nor RSA", path, k)
		}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s: no PEM public key", path)
	}
	return keys, nil
}

// jwk holds the fields of a JSON Web Key (RFC 7517, 7518, 8037) that
// Ed25519 and RSA verification keys use.
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Use string `json:"use"`
	Alg string `json:"alg"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	N   string `json:"n"`
	E   string `json:"e"`
}

// fetchJWKS gets the app's JWKS and returns its signing keys; keys of
// other types or uses are skipped.
func (a *jwtAuth) fetchJWKS(ctx context.Context) ([]pubKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.cfg.JWKSURL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", a.cfg.JWKSURL, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxJWKSBytes {
		return nil, fmt.Errorf("GET %s: the JWKS is over %d bytes", a.cfg.JWKSURL, maxJWKSBytes)
	}
	return parseJWKS(body)
}

// parseJWKS returns the Ed25519 and RSA signing keys of a JWKS document.
func parseJWKS(body []byte) ([]pubKey, error) {
	var set struct {
		Keys []jwk `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("the JWKS does not parse: %w", err)
	}
	var keys []pubKey
	for _, k := range set.Keys {
		if k.Use != "" && k.Use != "sig" {
			continue
		}
		pk, err := k.publicKey()
		if err != nil {
			return nil, fmt.Errorf("JWKS key %q: %w", k.Kid, err)
		}
		if pk != nil {
			keys = append(keys, pubKey{kid: k.Kid, alg: k.Alg, key: pk})
		}
	}
	return keys, nil
}

// publicKey decodes k; nil without an error for key types imd does not
// verify with.
func (k jwk) publicKey() (crypto.PublicKey, error) {
	switch {
	case k.Kty == "OKP" && k.Crv == "Ed25519":
		x, err := base64.RawURLEncoding.DecodeString(k.X)
		if err != nil || len(x) != ed25519.PublicKeySize {
			return nil, errors.New("x is not a base64url Ed25519 public key")
		}
		return ed25519.PublicKey(x), nil
	case k.Kty == "RSA":
		n, err1 := base64.RawURLEncoding.DecodeString(k.N)
		e, err2 := base64.RawURLEncoding.DecodeString(k.E)
		if err1 != nil || err2 != nil || len(n) == 0 || len(e) == 0 || len(e) > 4 {
			return nil, errors.New("n or e is not base64url")
		}
		var eb [8]byte
		copy(eb[8-len(e):], e)
		exp := binary.BigEndian.Uint64(eb[:])
		if exp < 3 || exp%2 == 0 {
			return nil, fmt.Errorf("exponent %d is not valid", exp)
		}
		pk := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(exp)}
		if pk.N.BitLen() < 2048 {
			return nil, fmt.Errorf("an RSA key of %d bits is too small (2048 at least)", pk.N.BitLen())
		}
		return pk, nil
	}
	return nil, nil
}

// httpAuth asks the app-server whether a login is valid.
type httpAuth struct {
	url     string
	timeout time.Duration
	client  *http.Client
	cache   *authCache
}

func newHTTPAuth(app *App) *httpAuth {
	cfg := *app.Auth.HTTP
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = time.Minute
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = 10000
	}
	return &httpAuth{
		url:     cfg.URL,
		timeout: cfg.Timeout,
		client:  &http.Client{},
		cache:   newAuthCache(cfg.CacheSize, cfg.CacheTTL, time.Now),
	}
}

// loginCheck is the body POSTed to the app-server.
type loginCheck struct {
	AppCode uint32 `json:"appcode"`
	UID     uint64 `json:"uid"`
	Token   string `json:"token"`
}

// maxCheckAnswer bounds the app-server's answer.
const maxCheckAnswer = 64 << 10

// Authenticate implements Authenticator.
func (a *httpAuth) Authenticate(ctx context.Context, app *App, uid uint64, token string) error {
	key := cacheKey(app.AppCode, uid, token)
	if a.cache.has(key) {
		return nil
	}
	body, err := json.Marshal(loginCheck{AppCode: app.AppCode, UID: uid, Token: token})
	if err != nil {
		return schema.Errorf(schema.StatusInternal, "login check: %v", err)
	}
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url, bytes.NewReader(body))
	if err != nil {
		return schema.Errorf(schema.StatusInternal, "login check: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return schema.Errorf(schema.StatusUnavailable, "the app-server's login check did not answer; retry later")
	}
	defer func() { _ = resp.Body.Close() }()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusUnauthorized, http.StatusForbidden:
		return schema.Errorf(schema.StatusTokenInvalid, "the app-server refused the token")
	default:
		return schema.Errorf(schema.StatusUnavailable, "the app-server's login check answered %d; retry later", resp.StatusCode)
	}
	var answer struct {
		OK *bool `json:"ok"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxCheckAnswer)).Decode(&answer); err != nil || answer.OK == nil {
		return schema.Errorf(schema.StatusUnavailable, "the app-server's login check answered without {\"ok\": bool}; retry later")
	}
	if !*answer.OK {
		return schema.Errorf(schema.StatusTokenInvalid, "the app-server refused the token")
	}
	a.cache.add(key)
	return nil
}

// cacheKey names (appcode, uid, token) without keeping the token.
func cacheKey(appcode uint32, uid uint64, token string) [32]byte {
	h := sha256.New()
	var b [12]byte
	binary.BigEndian.PutUint32(b[:4], appcode)
	binary.BigEndian.PutUint64(b[4:], uid)
	h.Write(b[:])
	h.Write([]byte(token))
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// authCache is a bounded LRU of positive login answers, each valid for ttl.
type authCache struct {
	mu    sync.Mutex
	size  int
	ttl   time.Duration
	now   func() time.Time
	order *list.List // front: most recently used; values are *cacheEntry
	byKey map[[32]byte]*list.Element
}

type cacheEntry struct {
	key     [32]byte
	expires time.Time
}

func newAuthCache(size int, ttl time.Duration, now func() time.Time) *authCache {
	return &authCache{size: size, ttl: ttl, now: now, order: list.New(), byKey: make(map[[32]byte]*list.Element)}
}

// has reports whether key was answered yes within the ttl.
func (c *authCache) has(key [32]byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.byKey[key]
	if !ok {
		return false
	}
	if !c.now().Before(el.Value.(*cacheEntry).expires) {
		c.order.Remove(el)
		delete(c.byKey, key)
		return false
	}
	c.order.MoveToFront(el)
	return true
}

// add remembers a yes for key, dropping the least recently used beyond size.
func (c *authCache) add(key [32]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	exp := c.now().Add(c.ttl)
	if el, ok := c.byKey[key]; ok {
		el.Value.(*cacheEntry).expires = exp
		c.order.MoveToFront(el)
		return
	}
	c.byKey[key] = c.order.PushFront(&cacheEntry{key: key, expires: exp})
	for c.order.Len() > c.size {
		el := c.order.Back()
		c.order.Remove(el)
		delete(c.byKey, el.Value.(*cacheEntry).key)
	}
}

// len returns how many answers are remembered.
func (c *authCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}
