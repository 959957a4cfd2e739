package config

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
)

func load(t *testing.T, args []string, env map[string]string) (Config, error) {
	t.Helper()
	c := Default()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	path := c.Flags(fs)
	c.ServerFlags(fs)
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	err := c.Load(fs, path, args, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	return c, err
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "imd.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	c, err := load(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Gateway.Addr != ":7070" || c.HTTP.Addr != ":8080" || c.DataDir != "./data" || c.Gateway.IdleTimeout != 90*time.Second {
		t.Fatalf("defaults %+v", c)
	}
}

// TestPrecedence: defaults < file < environment < flags, key by key.
func TestPrecedence(t *testing.T) {
	file := writeFile(t, `
gateway:
  addr: "127.0.0.1:1001"
  idle_timeout: 2m
  login_timeout: 3s
http:
  addr: "127.0.0.1:2001"
log:
  level: warn
`)
	env := map[string]string{
		"IMD_CONFIG":        file,
		"IMD_GATEWAY_ADDR":  "127.0.0.1:1002",
		"IMD_LOGIN_TIMEOUT": "4s",
		"IMD_HTTP_ADDR":     "127.0.0.1:2002",
	}
	c, err := load(t, []string{"--gateway-addr", "127.0.0.1:1003"}, env)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct{ name, got, want string }{
		{"gateway addr (flag over env over file)", c.Gateway.Addr, "127.0.0.1:1003"},
		{"http addr (env over file)", c.HTTP.Addr, "127.0.0.1:2002"},
		{"login timeout (env over file)", c.Gateway.LoginTimeout.String(), "4s"},
		{"idle timeout (file over default)", c.Gateway.IdleTimeout.String(), "2m0s"},
		{"log level (file over default)", c.Log.Level, "warn"},
		{"data dir (default)", c.DataDir, "./data"},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s: got %q, want %q", ch.name, ch.got, ch.want)
		}
	}
	// --config wins over IMD_CONFIG.
	other := writeFile(t, "log:\n  level: error\n")
	c, err = load(t, []string{"--config", other}, env)
	if err != nil {
		t.Fatal(err)
	}
	if c.Log.Level != "error" {
		t.Fatalf("--config ignored: level %q", c.Log.Level)
	}
}

func TestBadConfigIsAClearError(t *testing.T) {
	cases := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"unknown key", []string{"--config", writeFile(t, "gatway:\n  addr: x\n")}, nil, "gatway"},
		{"bad duration in file", []string{"--config", writeFile(t, "gateway:\n  idle_timeout: soon\n")}, nil, "soon"},
		{"missing file", []string{"--config", "/nonexistent/imd.yaml"}, nil, "/nonexistent/imd.yaml"},
		{"bad env value", nil, map[string]string{"IMD_IDLE_TIMEOUT": "forever"}, "IMD_IDLE_TIMEOUT"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := load(t, tc.args, tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming %q", err, tc.want)
			}
		})
	}
}

// TestExampleConfig loads docs/imd.example.yaml, so the documented file
// stays valid.
func TestExampleConfig(t *testing.T) {
	c, err := load(t, []string{"--config", "../../docs/imd.example.yaml"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Apps) != 3 || c.Gateway.ID != "gate-a" || c.Gateway.KeepaliveInterval != 30*time.Second || c.Gateway.MaxQueueBytes != 4<<20 ||
		len(c.C2S.Routes) != 2 || c.Bus.Linger != 5*time.Millisecond || c.Store.Cassandra.Keyspace != "imd" || len(c.Apps[0].APIKeys) != 1 {
		t.Fatalf("example config loaded as %+v", c)
	}
	for _, a := range c.Apps {
		if err := a.Validate(); err != nil {
			t.Errorf("example app: %v", err)
		}
	}
	if demo, err := c.ResolveApps(); demo || err != nil {
		t.Fatalf("configured apps replaced by demo apps (%v, %v)", demo, err)
	}
}

func TestDemoSecretsPersist(t *testing.T) {
	dir := t.TempDir()
	c := Default()
	c.DataDir = dir
	demo, err := c.ResolveApps()
	if err != nil || !demo || len(c.Apps) != 3 {
		t.Fatalf("demo apps: %v %v %+v", demo, err, c.Apps)
	}
	first := c.Apps[0].Secrets[0]
	c2 := Default()
	c2.DataDir = dir
	if _, err := c2.ResolveApps(); err != nil {
		t.Fatal(err)
	}
	if c2.Apps[0].Secrets[0] != first || len(first) < 32 {
		t.Fatalf("secret not reused across restarts: %q then %q", first, c2.Apps[0].Secrets[0])
	}
	if err := os.WriteFile(filepath.Join(dir, "secrets.yaml"), []byte("demo_secret: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c3 := Default()
	c3.DataDir = dir
	if _, err := c3.ResolveApps(); err == nil {
		t.Fatal("a too-short demo secret was accepted")
	}
}

// The demo page is on by default with the generated demo apps only, and
// --demo or IMD_DEMO overrides that either way.
func TestDemoPageDefault(t *testing.T) {
	for _, tc := range []struct {
		name  string
		apps  bool
		args  []string
		env   map[string]string
		want  bool
		mints bool
	}{
		{name: "demo apps", want: true, mints: true},
		{name: "demo apps, --demo=false", args: []string{"--demo=false"}, want: false, mints: true},
		{name: "configured apps", apps: true, want: false},
		{name: "configured apps, IMD_DEMO=true", apps: true, env: map[string]string{"IMD_DEMO": "true"}, want: true},
		{name: "configured apps, --demo", apps: true, args: []string{"--demo"}, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			c.DataDir = t.TempDir()
			if tc.apps {
				c.Apps = []logic.App{{AppCode: 7, Account: 1, Secrets: []string{"0123456789abcdef"}}}
			}
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			path := c.Flags(fs)
			c.ServerFlags(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			env := func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok }
			if err := c.Load(fs, path, tc.args, env); err != nil {
				t.Fatal(err)
			}
			if _, err := c.ResolveApps(); err != nil {
				t.Fatal(err)
			}
			if c.Demo == nil || *c.Demo != tc.want || c.DemoAppsInUse != tc.mints {
				t.Fatalf("demo page %v (want %v), demo apps in use %v (want %v)", c.Demo, tc.want, c.DemoAppsInUse, tc.mints)
			}
		})
	}
}
