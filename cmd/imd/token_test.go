package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
)

// TestTokenRefusesWithoutSecrets: `imd token` run where there is no
// secrets file (outside the data dir) says where it looked instead of
// generating a secret the running server does not know.
func TestTokenRefusesWithoutSecrets(t *testing.T) {
	cwd := t.TempDir()
	t.Chdir(cwd)
	for _, args := range [][]string{
		{"token", "--uid", "42"},
		{"token", "--api-key"},
		{"token", "--data-dir", filepath.Join(cwd, "elsewhere"), "--uid", "42"},
	} {
		code, out, errOut := runCmd(args...)
		if code == 0 || out != "" {
			t.Errorf("%v: exit %d, printed %q; want a refusal", args, code, out)
		}
		for _, want := range []string{"secrets.yaml", "--data-dir", "--config", "--create-secrets"} {
			if !strings.Contains(errOut, want) {
				t.Errorf("%v: error %q does not mention %s", args, errOut, want)
			}
		}
		if !strings.Contains(errOut, cwd) {
			t.Errorf("%v: error %q does not say where it looked (%s)", args, errOut, cwd)
		}
	}
	for _, dir := range []string{filepath.Join(cwd, "data"), filepath.Join(cwd, "elsewhere")} {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("%s was created (%v)", dir, err)
		}
	}
}

// TestTokenCreateSecrets: --create-secrets generates the file once, and
// later tokens (and the server, through the same config) use it.
func TestTokenCreateSecrets(t *testing.T) {
	dir := t.TempDir()
	code, out, errOut := runCmd("token", "--data-dir", dir, "--uid", "42", "--create-secrets")
	if code != 0 {
		t.Fatalf("--create-secrets: exit %d: %s", code, errOut)
	}
	cfg := config.Default()
	cfg.DataDir = dir
	if demo, err := cfg.ResolveApps(); err != nil || !demo {
		t.Fatalf("ResolveApps: demo %v, %v", demo, err)
	}
	app := &logic.App{AppCode: 101, Account: 1, Secrets: cfg.Apps[0].Secrets}
	if err := (logic.HMACAuth{}).Authenticate(context.Background(), app, 42, strings.TrimSpace(out)); err != nil {
		t.Fatalf("token from --create-secrets does not verify with the file's secret: %v", err)
	}
	code, out, errOut = runCmd("token", "--data-dir", dir, "--uid", "43")
	if code != 0 {
		t.Fatalf("second token: exit %d: %s", code, errOut)
	}
	if err := (logic.HMACAuth{}).Authenticate(context.Background(), app, 43, strings.TrimSpace(out)); err != nil {
		t.Fatalf("second token does not verify: %v", err)
	}
}
