package logic

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"strconv"
	"strings"
	"time"

	"github.com/imd-dev/imd/schema"
)

// Authenticator checks the token a client presents at login. Implementations
// return a *schema.Error whose status tells the client what is wrong.
// All methods are safe for concurrent use.
type Authenticator interface {
	Authenticate(ctx context.Context, app *App, uid uint64, token string) error
}

// HMACAuth is the default authenticator. A token is
//
//	<appcode>.<uid>.<expiry unix seconds>.<base64url(HMAC-SHA256(secret, "appcode|uid|expiry"))>
//
// signed with the secret configured for the appcode. App-servers mint tokens
// with MintToken (or `imd token`) and hand them to their clients.
type HMACAuth struct {
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
}

var _ Authenticator = HMACAuth{}

func tokenMAC(secret string, appcode uint32, uid uint64, expiry int64) []byte {
	m := hmac.New(sha256.New, []byte(secret))
	var b [64]byte
	p := strconv.AppendUint(b[:0], uint64(appcode), 10)
	p = append(p, '|')
	p = strconv.AppendUint(p, uid, 10)
	p = append(p, '|')
	p = strconv.AppendInt(p, expiry, 10)
	m.Write(p)
	return m.Sum(nil)
}

// MintToken returns a token for (appcode, uid) valid until expiry.
func MintToken(secret string, appcode uint32, uid uint64, expiry time.Time) string {
	exp := expiry.Unix()
	sig := base64.RawURLEncoding.EncodeToString(tokenMAC(secret, appcode, uid, exp))
	return strconv.FormatUint(uint64(appcode), 10) + "." + strconv.FormatUint(uid, 10) + "." +
		strconv.FormatInt(exp, 10) + "." + sig
}

// Authenticate implements Authenticator. The signature is checked before the
// expiry, so a forged token never learns more than "invalid".
func (a HMACAuth) Authenticate(_ context.Context, app *App, uid uint64, token string) error {
	parts := strings.Split(token, ".")
	if len(parts) != 4 {
		return schema.Errorf(schema.StatusTokenMalformed, "token must have 4 dot-separated parts, has %d", len(parts))
	}
	tApp, err1 := strconv.ParseUint(parts[0], 10, 32)
	tUID, err2 := strconv.ParseUint(parts[1], 10, 64)
	exp, err3 := strconv.ParseInt(parts[2], 10, 64)
	sig, err4 := base64.RawURLEncoding.DecodeString(parts[3])
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil || len(sig) != sha256.Size {
		return schema.Errorf(schema.StatusTokenMalformed, "token fields do not parse")
	}
	if uint32(tApp) != app.AppCode || tUID != uid {
		return schema.Errorf(schema.StatusTokenMismatch, "token is for appcode %d uid %d", tApp, tUID)
	}
	ok := false
	for _, secret := range app.Secrets {
		if hmac.Equal(sig, tokenMAC(secret, app.AppCode, uid, exp)) {
			ok = true
			break
		}
	}
	if !ok {
		return schema.Errorf(schema.StatusTokenInvalid, "token signature does not match")
	}
	now := time.Now
	if a.Now != nil {
		now = a.Now
	}
	if now().Unix() >= exp {
		return schema.Errorf(schema.StatusTokenExpired, "token expired at %s", time.Unix(exp, 0).UTC().Format(time.RFC3339))
	}
	return nil
}
