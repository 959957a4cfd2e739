package scenario

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"strconv"
	"time"
)

// MintToken returns a login token for (appcode, uid) valid until expiry,
// signed with the appcode's secret, in the format of schema/PROTOCOL.md
// ("Login token") that any app-server implements:
//
//	<appcode>.<uid>.<expiry>.<base64url(HMAC-SHA256(secret, "<appcode>|<uid>|<expiry>"))>
func MintToken(secret string, appcode uint32, uid uint64, expiry time.Time) string {
	app := strconv.FormatUint(uint64(appcode), 10)
	user := strconv.FormatUint(uid, 10)
	exp := strconv.FormatInt(expiry.Unix(), 10)
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(app + "|" + user + "|" + exp))
	return app + "." + user + "." + exp + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}
