package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
)

func runToken(args []string, stdout, stderr io.Writer) error {
	cfg := config.Default()
	fs := newFlagSet("token", "Mint an HMAC login token for (appcode, uid) with the appcode's first secret\n"+
		"from the same configuration `imd all` uses, and print it. With --api-key,\n"+
		"print the appcode's HTTP API key instead.\n\n"+
		"With no apps configured it reads the demo secret that `imd all` generated\n"+
		"in <data-dir>/secrets.yaml: point --data-dir (or --config) at the running\n"+
		"server's data directory. It refuses when that file is missing, unless\n"+
		"--create-secrets asks it to generate one (for a server not started yet).", stdout, stderr)
	path := cfg.Flags(fs)
	appcode := fs.Uint("appcode", 101, "appcode the token is for")
	uid := fs.Uint64("uid", 0, "uid the token is for (required, > 0)")
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token stays valid")
	apiKey := fs.Bool("api-key", false, "print the appcode's HTTP API key (for app-servers) instead of a login token")
	create := fs.Bool("create-secrets", false, "with no apps configured, generate <data-dir>/secrets.yaml when it is missing\n"+
		"(an `imd all` started later on that data dir uses it) instead of refusing")
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
	if len(cfg.Apps) == 0 && !*create {
		// ResolveApps would generate a fresh demo secret here, and a token
		// signed with it fails against the server, which has its own.
		if err := demoSecretsExist(cfg.DataDir); err != nil {
			return err
		}
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

// demoSecretsExist reports, as an error that says where it looked and how
// to look elsewhere, when dataDir holds no secrets file of the demo apps.
func demoSecretsExist(dataDir string) error {
	path := filepath.Join(dataDir, "secrets.yaml")
	_, err := os.Stat(path)
	if err == nil {
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if abs, aerr := filepath.Abs(path); aerr == nil {
		path = abs
	}
	return fmt.Errorf("no apps configured and no demo secrets at %s: a token minted with a new secret would not verify on the server. "+
		"Point at the server's data directory with --data-dir (IMD_DATA_DIR) or at its config with --config, "+
		"or pass --create-secrets to generate the file for a server not started yet", path)
}
