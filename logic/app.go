package logic

import (
	"errors"
	"fmt"
)

// App is the configuration of one appcode: a terminal of one account system.
type App struct {
	AppCode uint32 `yaml:"appcode" json:"appcode"`
	Name    string `yaml:"name" json:"name"`
	// Account is the account system the appcode's uids belong to. Two
	// appcodes with the same Account are two terminals of the same users.
	Account uint32 `yaml:"account" json:"account"`
	// Secrets sign login tokens; the first mints, all verify, so a secret
	// can be rotated without logging anyone out.
	Secrets []string `yaml:"secrets" json:"secrets"`
	// MaxSessions is how many connections one uid may hold on this appcode
	// at once; the oldest is kicked beyond it. 0 means 1.
	MaxSessions int `yaml:"max_sessions" json:"max_sessions"`
	// APIKeys authenticate the app's servers on the HTTP API (s2c push,
	// presence) as this appcode: `Authorization: Bearer <key>`. Empty: the
	// app has no HTTP access.
	APIKeys []string `yaml:"api_keys" json:"-"`
	// Auth chooses how the appcode's logins are checked: HMAC tokens
	// signed with Secrets (the default), JWTs verified with the account
	// system's public keys, or the app-server's own check over HTTP.
	Auth AuthConfig `yaml:"auth" json:"auth"`
}

// Validate reports what is wrong with a.
func (a *App) Validate() error {
	var errs []error
	if a.AppCode == 0 {
		errs = append(errs, errors.New("appcode must be > 0"))
	}
	if a.Account == 0 {
		errs = append(errs, fmt.Errorf("appcode %d: account must be > 0", a.AppCode))
	}
	if len(a.Secrets) == 0 && a.AuthKind() == AuthHMAC {
		errs = append(errs, fmt.Errorf("appcode %d: at least one secret is required", a.AppCode))
	}
	for _, s := range a.Secrets {
		if len(s) < 16 {
			errs = append(errs, fmt.Errorf("appcode %d: secrets must be at least 16 bytes", a.AppCode))
			break
		}
	}
	for _, k := range a.APIKeys {
		if len(k) < 16 {
			errs = append(errs, fmt.Errorf("appcode %d: api keys must be at least 16 bytes", a.AppCode))
			break
		}
	}
	errs = append(errs, a.validateAuth()...)
	if a.MaxSessions < 0 {
		errs = append(errs, fmt.Errorf("appcode %d: max_sessions must be >= 0", a.AppCode))
	}
	return errors.Join(errs...)
}
