package deploy

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// unitKeys are the sections and keys the units may use: systemd ignores
// an unknown key with a warning in the journal, so a misspelt hardening
// option would silently do nothing. Keys that may repeat are marked true.
var unitKeys = map[string]map[string]bool{
	"Unit": {
		"Description": false, "Documentation": true, "After": true, "Before": true, "Wants": true,
		"Requires": true, "BindsTo": true, "PartOf": true, "Conflicts": true,
		"StartLimitIntervalSec": false, "StartLimitBurst": false, "ConditionPathExists": true,
	},
	"Service": {
		"Type": false, "User": false, "Group": false, "ExecStart": false, "ExecStartPre": true,
		"ExecReload": false, "EnvironmentFile": true, "Environment": true, "WorkingDirectory": false,
		"StateDirectory": false, "StateDirectoryMode": false, "ConfigurationDirectory": false,
		"KillSignal": false, "KillMode": false, "TimeoutStopSec": false, "TimeoutStartSec": false,
		"Restart": false, "RestartSec": false, "RemainAfterExit": false, "LimitNOFILE": false, "UMask": false,
		"NoNewPrivileges": false, "CapabilityBoundingSet": false, "AmbientCapabilities": false,
		"ProtectSystem": false, "ProtectHome": false, "PrivateTmp": false, "PrivateDevices": false,
		"ProtectHostname": false, "ProtectClock": false, "ProtectKernelTunables": false,
		"ProtectKernelModules": false, "ProtectKernelLogs": false, "ProtectControlGroups": false,
		"ProtectProc": false, "RestrictNamespaces": false, "RestrictRealtime": false,
		"RestrictSUIDSGID": false, "LockPersonality": false, "MemoryDenyWriteExecute": false,
		"RemoveIPC": false, "RestrictAddressFamilies": false, "SystemCallArchitectures": false,
		"SystemCallFilter": true, "SystemCallErrorNumber": false, "ReadWritePaths": true,
	},
	"Install": {"WantedBy": true, "Alias": true},
}

// hardening are the options every unit sets, with their values.
var hardening = map[string]string{
	"User": "imd", "Group": "imd",
	"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
	"PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
	"RestrictSUIDSGID": "yes", "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
}

type unitFile struct {
	path     string
	sections map[string]map[string][]string
}

func (u *unitFile) get(section, key string) (string, bool) {
	v := u.sections[section][key]
	if len(v) == 0 {
		return "", false
	}
	return v[len(v)-1], true
}

// parseUnit reads a unit file strictly: known sections and keys, no key
// given twice unless it may repeat, no line outside a section.
func parseUnit(t *testing.T, path string) *unitFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := &unitFile{path: path, sections: map[string]map[string][]string{}}
	section := ""
	for i, line := range strings.Split(string(b), "\n") {
		where := fmt.Sprintf("%s:%d", filepath.Base(path), i+1)
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			continue
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if unitKeys[section] == nil {
				t.Errorf("%s: unknown section [%s]", where, section)
			}
			if u.sections[section] != nil {
				t.Errorf("%s: section [%s] twice", where, section)
			}
			u.sections[section] = map[string][]string{}
			continue
		case strings.HasSuffix(line, `\`):
			t.Errorf("%s: continued lines are not used here", where)
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Errorf("%s: not KEY=VALUE in a section: %q", where, line)
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		repeats, known := unitKeys[section][k]
		if !known {
			t.Errorf("%s: %s in [%s] is no key these units use: a typo (systemd ignores unknown keys), or add it to unitKeys", where, k, section)
		}
		if len(u.sections[section][k]) > 0 && !repeats {
			t.Errorf("%s: %s given twice in [%s]", where, k, section)
		}
		u.sections[section][k] = append(u.sections[section][k], v)
	}
	return u
}

// seconds parses a systemd time span as the units write them (30s, 6min, 2s).
func seconds(v string) (time.Duration, error) {
	v = strings.ReplaceAll(v, "min", "m")
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(v)
}

// exampleGrace is shutdown_grace of deploy/systemd/imd.yaml.
func exampleGrace(t *testing.T, path string) time.Duration {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		ShutdownGrace string `yaml:"shutdown_grace"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if c.ShutdownGrace == "" {
		t.Fatalf("%s: set shutdown_grace: the units' stop timeouts are sized on it", path)
	}
	d, err := time.ParseDuration(c.ShutdownGrace)
	if err != nil {
		t.Fatalf("%s: shutdown_grace: %v", path, err)
	}
	return d
}

var unitName = regexp.MustCompile(`^imd-(all|logic|gateway|migrate)\.service$`)

func systemdUnits(t *testing.T) []string {
	t.Helper()
	units, err := filepath.Glob("systemd/*.service")
	if err != nil || len(units) == 0 {
		t.Fatalf("no unit files under systemd/: %v", err)
	}
	return units
}

// TestSystemdUnits checks each unit against the imd it runs: the role and
// flags of its command line exist, every IMD_* variable of the example
// environment file is a flag, the stop timeout exceeds the drain time,
// and the options that keep it contained are set.
func TestSystemdUnits(t *testing.T) {
	grace := exampleGrace(t, "systemd/imd.yaml")
	envExample := readEnvFile(t, "systemd/imd.env")
	seen := map[string]bool{}
	for _, path := range systemdUnits(t) {
		name := filepath.Base(path)
		m := unitName.FindStringSubmatch(name)
		if m == nil {
			t.Errorf("%s: name units imd-<role>.service", name)
			continue
		}
		role := m[1]
		seen[role] = true
		u := parseUnit(t, path)
		if d, _ := u.get("Unit", "Description"); d == "" {
			t.Errorf("%s: no Description", name)
		}
		execStart, _ := u.get("Service", "ExecStart")
		args := strings.Fields(execStart)
		if len(args) < 2 || args[0] != "/usr/local/bin/imd" {
			t.Errorf("%s: ExecStart=%s: want /usr/local/bin/imd %s ...", name, execStart, role)
			continue
		}
		if got := checkArgs(t, name, args[1:]); got != role {
			t.Errorf("%s: runs imd %s, its name says %s", name, got, role)
		}
		if !strings.Contains(execStart, "--config /etc/imd/imd.yaml") {
			t.Errorf("%s: ExecStart should read --config /etc/imd/imd.yaml", name)
		}
		for k, want := range hardening {
			if got, ok := u.get("Service", k); !ok || got != want {
				t.Errorf("%s: %s=%q, want %q", name, k, got, want)
			}
		}
		envFiles := u.sections["Service"]["EnvironmentFile"]
		if !contains(envFiles, "-/etc/imd/imd.env") {
			t.Errorf("%s: EnvironmentFile=-/etc/imd/imd.env (the secrets) missing", name)
		}
		for _, f := range envFiles {
			if !strings.HasPrefix(f, "-/etc/imd/") || !strings.HasSuffix(f, ".env") {
				t.Errorf("%s: EnvironmentFile=%s: want -/etc/imd/<name>.env (optional)", name, f)
			}
		}
		_, reload := u.get("Service", "ExecReload")
		if role == "migrate" {
			if ty, _ := u.get("Service", "Type"); ty != "oneshot" {
				t.Errorf("%s: Type=%s, want oneshot", name, ty)
			}
			// The unit's start timeout must leave imd migrate its own.
			def, err := time.ParseDuration(help(t, "migrate").defaults["timeout"])
			if err != nil {
				t.Fatalf("imd migrate --help: no default --timeout: %v", err)
			}
			v, _ := u.get("Service", "TimeoutStartSec")
			if d, err := seconds(v); err != nil || d <= def {
				t.Errorf("%s: TimeoutStartSec=%s must exceed imd migrate's --timeout (%s)", name, v, def)
			}
			continue
		}
		if ty, _ := u.get("Service", "Type"); ty != "exec" {
			t.Errorf("%s: Type=%s, want exec (imd does not notify)", name, ty)
		}
		if r, _ := u.get("Service", "Restart"); r != "on-failure" && r != "always" {
			t.Errorf("%s: Restart=%s", name, r)
		}
		v, _ := u.get("Service", "TimeoutStopSec")
		if d, err := seconds(v); err != nil || d < grace+5*time.Second {
			t.Errorf("%s: TimeoutStopSec=%s must exceed shutdown_grace (%s, systemd/imd.yaml) by 5s at least: imd drains that long on SIGTERM", name, v, grace)
		}
		if k, ok := u.get("Service", "KillSignal"); ok && k != "SIGTERM" {
			t.Errorf("%s: KillSignal=%s: imd drains on SIGTERM", name, k)
		}
		nofile, _ := u.get("Service", "LimitNOFILE")
		n, err := strconv.Atoi(nofile)
		want := 65536
		if role != "logic" {
			want = 1 << 20 // each client connection is a file
		}
		if err != nil || n < want {
			t.Errorf("%s: LimitNOFILE=%s, want %d at least", name, nofile, want)
		}
		// imd reloads the TLS certificate on SIGHUP where it runs a gateway.
		wantReload := role == "gateway" || role == "all"
		if wantReload && !reload {
			t.Errorf("%s: no ExecReload: imd reads its TLS certificate again on SIGHUP", name)
		}
		if r, _ := u.get("Service", "ExecReload"); reload && r != "/bin/kill -HUP $MAINPID" {
			t.Errorf("%s: ExecReload=%s, want /bin/kill -HUP $MAINPID", name, r)
		}
		if !wantReload && reload {
			t.Errorf("%s: ExecReload: imd %s has nothing to reload", name, role)
		}
		if w, _ := u.get("Install", "WantedBy"); w != "multi-user.target" {
			t.Errorf("%s: WantedBy=%s, want multi-user.target", name, w)
		}
	}
	for _, r := range roles {
		if !seen[r] {
			t.Errorf("no unit for imd %s", r)
		}
	}
	// The example environment file: every variable reaches some flag.
	for _, k := range sortedKeys(envExample) {
		f := envFlag(k)
		ok := false
		for _, r := range roles {
			ok = ok || help(t, r).flags[f]
		}
		if !ok {
			t.Errorf("systemd/imd.env: %s is no flag of any role (imd ignores it)", k)
		}
	}
}

// TestSystemdConfigStarts starts each unit's command line on the example
// config and environment file: imd must accept both and get as far as
// dialling Redis (Cassandra for migrate).
func TestSystemdConfigStarts(t *testing.T) {
	cfg, err := filepath.Abs("systemd/imd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	env := readEnvFile(t, "systemd/imd.env")
	for _, path := range systemdUnits(t) {
		u := parseUnit(t, path)
		execStart, _ := u.get("Service", "ExecStart")
		args := strings.Fields(strings.Replace(execStart, "/etc/imd/imd.yaml", cfg, 1))[1:]
		t.Run(filepath.Base(path), func(t *testing.T) {
			t.Parallel()
			startUntilDial(t, filepath.Base(path), args, env)
		})
	}
}

// TestSystemdAnalyze runs systemd's own checks where systemd is installed
// (Debian's machines, CI): `systemd-analyze verify` must say nothing and
// `systemd-analyze security` must rate every unit's exposure 2.0 or less.
func TestSystemdAnalyze(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed; TestSystemdUnits still checks the units")
	}
	bin := imdBinary(t)
	dir := t.TempDir()
	var copies []string
	for _, path := range systemdUnits(t) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// verify wants the executable to exist
		b = []byte(strings.ReplaceAll(string(b), "/usr/local/bin/imd", bin))
		c := filepath.Join(dir, filepath.Base(path))
		if err := os.WriteFile(c, b, 0o644); err != nil {
			t.Fatal(err)
		}
		copies = append(copies, c)
	}
	out, err := exec.Command(sa, append([]string{"verify", "--man=no"}, copies...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	exposure := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)
	for _, c := range copies {
		out, err := exec.Command(sa, "security", "--offline=yes", "--no-pager", c).CombinedOutput()
		m := exposure.FindSubmatch(out)
		if err != nil || m == nil {
			t.Errorf("systemd-analyze security %s: %v\n%s", filepath.Base(c), err, out)
			continue
		}
		if v, _ := strconv.ParseFloat(string(m[1]), 64); v > 2.0 {
			t.Errorf("systemd-analyze security %s: exposure %s, want 2.0 or less\n%s", filepath.Base(c), m[1], out)
		}
	}
}
