package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
)

func runToken(args []string, stdout, stderr io.Writer) error {
	cfg := config.Default()
	fs := newFlagSet("token", "Mint an HMAC login token for (appcode, uid) with the appcode's first secret\n"+
		"from the same configuration `imd all` uses, and print it. With --api-key,\n"+
		"print the appcode's HTTP API key instead.", stdout, stderr)
	path := cfg.Flags(fs)
	appcode := fs.Uint("appcode", 101, "appcode the token is for")
	uid := fs.Uint64("uid", 0, "uid the token is for (required, > 0)")
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token stays valid")
	apiKey := fs.Bool("api-key", false, "print the appcode's HTTP API key (for app-servers) instead of a login token")
	if err := loadConfig(fs, &cfg, path, args); err != nil {
		return err
	}
	if *uid == 0 && !*apiKey {
		fmt.Fprintln(stderr, "imd token: --uid is required")
		return errUsage
	}
	if *ttl <= 0 {
		return errors.New("--ttl must be positive")
	}
	if _, err := cfg.ResolveApps(); err != nil {
		return err
	}
	for _, a := range cfg.Apps {
		if a.AppCode == uint32(*appcode) {
			if *apiKey {
				if len(a.APIKeys) == 0 {
					return fmt.Errorf("appcode %d has no api key", a.AppCode)
				}
				fmt.Fprintln(stdout, a.APIKeys[0])
				return nil
			}
			if len(a.Secrets) == 0 {
				return fmt.Errorf("appcode %d has no secret", a.AppCode)
			}
			fmt.Fprintln(stdout, logic.MintToken(a.Secrets[0], a.AppCode, *uid, time.Now().Add(*ttl)))
			return nil
		}
	}
	return fmt.Errorf("appcode %d is not configured", *appcode)
}
