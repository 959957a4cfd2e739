package platform

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// TestAuthPerAccountSystem: account 1's appcodes (101, 102) check JWTs
// signed by its account system, account 2's (201) asks its app-server,
// and 301 keeps HMAC tokens; a user of each logs in with a token of its
// own kind, a wrong token is refused with its status, and the two chat.
func TestAuthPerAccountSystem(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{
			{"kty": "OKP", "crv": "Ed25519", "kid": "acct1-2026", "x": base64.RawURLEncoding.EncodeToString(pub)},
		}})
	}))
	defer jwks.Close()
	var checks atomic.Int32
	var appServerDown atomic.Bool
	check := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		checks.Add(1)
		if appServerDown.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		var in struct {
			AppCode uint32 `json:"appcode"`
			UID     uint64 `json:"uid"`
			Token   string `json:"token"`
		}
		_ = json.NewDecoder(r.Body).Decode(&in)
		ok := in.AppCode == 201 && in.Token == "session-"+strconv.FormatUint(in.UID, 10)
		_ = json.NewEncoder(w).Encode(map[string]bool{"ok": ok})
	}))
	defer check.Close()

	p := start(t, func(cfg *config.Config) {
		for i := range cfg.Apps {
			a := &cfg.Apps[i]
			switch a.Account {
			case 1:
				a.Secrets = nil
				a.Auth = logic.AuthConfig{Kind: logic.AuthJWT, JWT: &logic.JWTAuthConfig{JWKSURL: jwks.URL, Issuer: "accounts-1", Algorithms: []string{"EdDSA"}}}
			case 2:
				a.Secrets = nil
				a.Auth = logic.AuthConfig{Kind: logic.AuthHTTP, HTTP: &logic.HTTPAuthConfig{URL: check.URL, Timeout: time.Second}}
			}
		}
	})
	jwtFor := func(uid uint64, exp time.Time) string {
		tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, jwt.MapClaims{"sub": strconv.FormatUint(uid, 10), "iss": "accounts-1", "exp": exp.Unix()})
		tok.Header["kid"] = "acct1-2026"
		s, err := tok.SignedString(priv)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	tryLogin := func(appcode uint32, uid uint64, tok string, mod func(*sdk.Options)) (*sdk.Client, error) {
		c := dial(t, p, mod)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.Login(ctx, sdk.Credentials{AppCode: appcode, UID: uid, Token: tok})
		return c, err
	}
	refused := func(what string, appcode uint32, uid uint64, tok string, want schema.Status) {
		t.Helper()
		if _, err := tryLogin(appcode, uid, tok, nil); statusOf(err) != want {
			t.Fatalf("%s: %v, want status %v", what, err, want)
		}
	}

	// The wrong tokens first, each refused with its status.
	refused("an HMAC token on a JWT app", 101, 1, token(101, 1), schema.StatusTokenMalformed)
	refused("an expired JWT", 101, 1, jwtFor(1, time.Now().Add(-time.Minute)), schema.StatusTokenExpired)
	refused("another uid's JWT", 101, 1, jwtFor(2, time.Now().Add(time.Hour)), schema.StatusTokenMismatch)
	refused("a session the app-server does not know", 201, 7, "session-8", schema.StatusTokenInvalid)
	refused("a JWT on the HMAC app", 301, 1, jwtFor(1, time.Now().Add(time.Hour)), schema.StatusTokenMalformed)
	login(t, p, 301, 1, nil) // 301 keeps HMAC tokens

	// Account 1's user logs in on two terminals with the same JWT,
	// account 2's with its app-server session.
	var aliceGot, alicePCGot, bobGot received
	alice, err := tryLogin(101, 1, jwtFor(1, time.Now().Add(time.Hour)), func(o *sdk.Options) { o.OnC2C = aliceGot.on })
	if err != nil {
		t.Fatalf("JWT login: %v", err)
	}
	if _, err := tryLogin(102, 1, jwtFor(1, time.Now().Add(time.Hour)), func(o *sdk.Options) { o.OnC2C = alicePCGot.on }); err != nil {
		t.Fatalf("JWT login on the second terminal: %v", err)
	}
	if _, err := tryLogin(201, 7, "session-7", nil); err != nil {
		t.Fatalf("login checked by the app-server: %v", err)
	}
	// Bob reconnects (the first connection is kicked): the app-server's yes
	// is remembered, so it is not asked again.
	before := checks.Load()
	bob, err := tryLogin(201, 7, "session-7", func(o *sdk.Options) { o.OnC2C = bobGot.on })
	if err != nil {
		t.Fatalf("a second login of the same session: %v", err)
	}
	if n := checks.Load(); n != before {
		t.Fatalf("the second login asked the app-server again (%d calls, want %d)", n, before)
	}

	if _, err := alice.SendC2C(ctxb, &pb.User{Account: 2, Uid: 7}, 0, []byte("hello from account 1")); err != nil {
		t.Fatal(err)
	}
	if _, err := bob.SendC2C(ctxb, acct1(1), 0, []byte("hello from account 2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "bob got alice's message", func() bool { return bobGot.len() == 1 })
	// Alice's PC also gets a copy of what she sent from her phone.
	fromBob := func(r *received) bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, m := range r.msgs {
			if m.From.GetAccount() == 2 && m.From.GetUid() == 7 {
				return true
			}
		}
		return false
	}
	eventually(t, 5*time.Second, "both of alice's terminals got bob's message", func() bool { return fromBob(&aliceGot) && fromBob(&alicePCGot) })
	if m := bobGot.msgs[0]; string(m.Content) != "hello from account 1" || m.From.GetAccount() != 1 || m.From.GetUid() != 1 || m.FromAppcode != 101 {
		t.Fatalf("bob got %+v", m)
	}
	if m := aliceGot.msgs[0]; string(m.Content) != "hello from account 2" || m.From.GetAccount() != 2 || m.From.GetUid() != 7 || m.FromAppcode != 201 {
		t.Fatalf("alice got %+v", m)
	}

	// With the app-server down, a new session is refused as retryable;
	// the JWT app does not depend on it.
	appServerDown.Store(true)
	_, err = tryLogin(201, 8, "session-8", nil)
	if statusOf(err) != schema.StatusUnavailable || !strings.Contains(err.Error(), "retry") {
		t.Fatalf("login with the app-server down: %v, want status %v", err, schema.StatusUnavailable)
	}
	if _, err := tryLogin(101, 3, jwtFor(3, time.Now().Add(time.Hour)), nil); err != nil {
		t.Fatalf("JWT login while account 2's app-server is down: %v", err)
	}
}
