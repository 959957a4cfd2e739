package deploy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// The roles a deployment runs: the sub-commands of imd that serve, and
// migrate, run once per release.
var roles = []string{"all", "logic", "gateway", "migrate"}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error

	helpMu sync.Mutex
	helps  = map[string]*roleHelp{}
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// imdBinary builds cmd/imd once per test run: the files here are checked
// against what that binary accepts.
func imdBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "imd-deploy-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "imd")
		out, err := exec.Command("go", "build", "-o", binPath, "../cmd/imd").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// roleHelp is what `imd <role> --help` says: its flags and their defaults.
type roleHelp struct {
	flags    map[string]bool
	defaults map[string]string
}

var (
	helpFlag    = regexp.MustCompile(`^  -([a-z0-9][a-z0-9-]*)`)
	helpDefault = regexp.MustCompile(`\(default "?([^")]*)"?\)\s*$`)
)

// help runs `imd <role> --help` once per role.
func help(t *testing.T, role string) *roleHelp {
	t.Helper()
	helpMu.Lock()
	defer helpMu.Unlock()
	if h := helps[role]; h != nil {
		return h
	}
	out, err := exec.Command(imdBinary(t), role, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("imd %s --help: %v\n%s", role, err, out)
	}
	h := &roleHelp{flags: map[string]bool{}, defaults: map[string]string{}}
	var last string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if m := helpFlag.FindStringSubmatch(line); m != nil {
			last = m[1]
			h.flags[last] = true
		}
		if m := helpDefault.FindStringSubmatch(line); m != nil && last != "" {
			h.defaults[last] = m[1]
		}
	}
	if len(h.flags) < 5 {
		t.Fatalf("imd %s --help lists %d flags; did its format change?\n%s", role, len(h.flags), out)
	}
	helps[role] = h
	return h
}

// envFlag returns the flag an IMD_* variable sets (IMD_RPC_SECRET:
// rpc-secret), "" for other names.
func envFlag(name string) string {
	if !strings.HasPrefix(name, "IMD_") || name == "IMD_CONFIG" {
		return ""
	}
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(name, "IMD_"), "_", "-"))
}

// checkEnvNames reports IMD_* variables that no flag of role reads: imd
// ignores those silently, so a typo would go unnoticed in production.
func checkEnvNames(t *testing.T, where, role string, names []string) {
	t.Helper()
	h := help(t, role)
	for _, n := range names {
		if n == "IMD_CONFIG" {
			continue
		}
		f := envFlag(n)
		if f == "" {
			continue
		}
		if !h.flags[f] {
			t.Errorf("%s: %s sets --%s, which `imd %s --help` does not list", where, n, f, role)
		}
	}
}

// checkArgs checks a command line `imd <role> <flags>`: every flag must be
// one `imd <role> --help` lists. It returns the role.
func checkArgs(t *testing.T, where string, args []string) string {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: no imd sub-command", where)
		return ""
	}
	role := args[0]
	if !contains(roles, role) {
		t.Errorf("%s: imd %s: not a role (%v)", where, role, roles)
		return ""
	}
	h := help(t, role)
	for i := 1; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			continue // the value of the flag before
		}
		name := strings.TrimLeft(a, "-")
		name, _, _ = strings.Cut(name, "=")
		if !h.flags[name] {
			t.Errorf("%s: imd %s %s: `imd %s --help` has no such flag", where, role, a, role)
		}
	}
	return role
}

// loopback points every outside server a config names at a closed port on
// loopback (environment wins over the file), so that a node started with
// it fails at its first dial, after every part of its configuration was
// read and accepted, and sends nothing beyond this machine.
var loopback = map[string]string{
	"IMD_REDIS_ADDRS":     "127.0.0.1:1",
	"IMD_CASSANDRA_HOSTS": "127.0.0.1:1",
	"IMD_KAFKA_BROKERS":   "127.0.0.1:1",
	"IMD_LOGIC_ADDRS":     "127.0.0.1:1",
}

// firstDial is what each role fails on when every server is unreachable:
// its configuration was read (file, environment and flags) and accepted.
var firstDial = map[string]*regexp.Regexp{
	"all":     regexp.MustCompile(`imd: redis \[127\.0\.0\.1:1\]`),
	"logic":   regexp.MustCompile(`imd: redis \[127\.0\.0\.1:1\]`),
	"gateway": regexp.MustCompile(`imd: redis \[127\.0\.0\.1:1\]`),
	"migrate": regexp.MustCompile(`imd: migrate: `),
}

// startUntilDial runs the real imd with args and env (the configuration a
// unit or a pod gives it; --config pointing at a copy of the file), with
// the outside servers moved to loopback, and checks that it gets as far
// as dialling the first one: a key, flag or variable value it refuses
// stops it earlier with another message.
func startUntilDial(t *testing.T, where string, args []string, env map[string]string) {
	t.Helper()
	role := args[0]
	full := append([]string{}, args...)
	if role == "migrate" {
		full = append(full, "--timeout", "20s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, imdBinary(t), full...)
	cmd.Dir = t.TempDir()
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + cmd.Dir}
	for _, k := range sortedKeys(env) {
		if _, moved := loopback[k]; moved {
			continue
		}
		cmd.Env = append(cmd.Env, k+"="+env[k])
	}
	for _, k := range sortedKeys(loopback) {
		cmd.Env = append(cmd.Env, k+"="+loopback[k])
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Errorf("%s: imd %s: want exit status 1 at the first dial, got %v\n%s", where, strings.Join(args, " "), err, out)
		return
	}
	if !firstDial[role].Match(out) {
		t.Errorf("%s: imd %s stopped before dialling its first server (want %q in its output): its configuration is refused\n%s",
			where, strings.Join(args, " "), firstDial[role], out)
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// readEnvFile reads a systemd EnvironmentFile (KEY=VALUE lines, # comments).
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || !regexp.MustCompile(`^[A-Z_][A-Z0-9_]*$`).MatchString(k) {
			t.Errorf("%s:%d: not KEY=VALUE: %q", path, i+1, line)
			continue
		}
		if _, dup := env[k]; dup {
			t.Errorf("%s:%d: %s given twice", path, i+1, k)
		}
		env[k] = v
	}
	return env
}
