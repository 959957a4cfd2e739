package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/bench/scenario"
)

// TestMain lets the test binary stand in for imbench when a scenario
// re-executes itself as a worker process.
func TestMain(m *testing.M) {
	if os.Getenv("IMBENCH_TEST_AS_MAIN") == "1" {
		os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
	}
	code := m.Run()
	if imdDir != "" {
		_ = os.RemoveAll(imdDir)
	}
	os.Exit(code)
}

var (
	imdOnce sync.Once
	imdDir  string
	imdPath string
	imdErr  error
)

// buildIMD builds cmd/imd once for every test that needs a server.
func buildIMD(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs imd")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool in PATH to build imd")
	}
	imdOnce.Do(func() {
		if imdDir, imdErr = os.MkdirTemp("", "imbench-test-"); imdErr != nil {
			return
		}
		imdPath = filepath.Join(imdDir, "imd")
		out, err := exec.Command(goBin, "build", "-o", imdPath, "github.com/imd-dev/imd/cmd/imd").CombinedOutput()
		if err != nil {
			imdErr = err
			imdPath = string(out)
		}
	})
	if imdErr != nil {
		t.Fatalf("go build ./cmd/imd: %v\n%s", imdErr, imdPath)
	}
	return imdPath
}

// runConnsJSON runs `imbench conns args...` in this process and decodes its
// JSON report.
func runConnsJSON(t *testing.T, wantCode int, args ...string) (*scenario.ConnsReport, string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "report.json")
	args = append([]string{"conns", "--imd", buildIMD(t), "--json", out, "--settle", "300ms",
		"--baseline-wait", "100ms", "--timeout", "60s"}, args...)
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	code := run(ctx, args, &stdout, &stderr)
	if code != wantCode {
		t.Fatalf("imbench %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, wantCode, &stdout, &stderr)
	}
	for _, bad := range []string{"DATA RACE", "panic", "worker"} {
		if strings.Contains(stderr.String(), bad) {
			t.Errorf("stderr mentions %q:\n%s", bad, &stderr)
		}
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("no JSON report: %v\nstderr:\n%s", err, &stderr)
	}
	var rep scenario.ConnsReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("report does not decode: %v\n%s", err, b)
	}
	return &rep, stdout.String()
}

// checkSane asserts what every successful conns run must show.
func checkSane(t *testing.T, rep *scenario.ConnsReport, n int) {
	t.Helper()
	if !rep.OK || rep.Requested != n || rep.Opened != int64(n) || rep.Failed != 0 {
		t.Errorf("ok %v, requested %d, opened %d, failed %d; want %d opened, none failed", rep.OK, rep.Requested, rep.Opened, rep.Failed, n)
	}
	if rep.HeldClient != int64(n) || rep.HeldServer != int64(n) || rep.Sessions != int64(n) {
		t.Errorf("held: clients %d, server %d, sessions %d; want %d each", rep.HeldClient, rep.HeldServer, rep.Sessions, n)
	}
	if rep.After.GatewayConns != int64(n) || rep.Before.GatewayConns != 0 {
		t.Errorf("gateway gauge %d -> %d, want 0 -> %d", rep.Before.GatewayConns, rep.After.GatewayConns, n)
	}
	if rep.LoginRate <= 0 || rep.LoginSeconds <= 0 {
		t.Errorf("login rate %v/s over %vs, want > 0", rep.LoginRate, rep.LoginSeconds)
	}
	for name, s := range map[string]struct {
		count             uint64
		min, p50, p99, mx float64
	}{
		"dial":  {rep.Dial.Count, rep.Dial.MinMs, rep.Dial.P50Ms, rep.Dial.P99Ms, rep.Dial.MaxMs},
		"login": {rep.Login.Count, rep.Login.MinMs, rep.Login.P50Ms, rep.Login.P99Ms, rep.Login.MaxMs},
	} {
		if s.count != uint64(n) || s.min <= 0 || s.p50 < s.min || s.p99 < s.p50 || s.mx < s.p99 || s.mx > 60_000 {
			t.Errorf("%s latency implausible: %+v", name, s)
		}
	}
	for _, sn := range []scenario.Snapshot{rep.Before, rep.After} {
		if sn.RSSBytes < 1<<20 || sn.HeapInuse <= 0 || sn.StackInuse <= 0 || sn.Goroutines <= 0 || sn.RSSSource != "VmRSS" {
			t.Errorf("implausible server snapshot %+v", sn)
		}
	}
	if rep.After.Goroutines <= rep.Before.Goroutines && rep.After.HeapInuse <= rep.Before.HeapInuse {
		t.Errorf("holding %d connections cost the server neither goroutines nor heap: %+v -> %+v", n, rep.Before, rep.After)
	}
	if rep.ConnsAfterClose != 0 {
		t.Errorf("gateway holds %d connections after the clients closed", rep.ConnsAfterClose)
	}
	if !rep.Server.Started || rep.Server.PID == 0 || rep.ServerStopResult != "" {
		t.Errorf("server: %+v, stop: %q", rep.Server, rep.ServerStopResult)
	}
	if rep.ClientRSSBytes <= 0 {
		t.Errorf("client RSS %d", rep.ClientRSSBytes)
	}
	// /proc counts 10 ms ticks: a few logins may read 0.
	if rep.LoginServerCPUSource != scenario.CPUFromProc || rep.LoginServerCPU < 0 || (rep.LoginServerCPU > 0) != (rep.LoginServerCPUPerUs > 0) {
		t.Errorf("server CPU %vs, %v us per login, from %q: want it from /proc", rep.LoginServerCPU, rep.LoginServerCPUPerUs, rep.LoginServerCPUSource)
	}
}

func TestConnsSDKEndToEnd(t *testing.T) {
	const n = 200
	rep, table := runConnsJSON(t, 0, "-n", "200", "-c", "20")
	checkSane(t, rep, n)
	if rep.Clients.Kind != scenario.ClientSDK || !rep.Clients.InProcess || rep.Clients.Processes != 1 {
		t.Errorf("clients %+v, want the SDK in process", rep.Clients)
	}
	for _, want := range []string{"held: clients 200, server 200", "  OK", "per conn", "logins/s"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
}

func TestConnsRawClientInWorkers(t *testing.T) {
	t.Setenv("IMBENCH_TEST_AS_MAIN", "1") // the workers are this test binary
	const n = 120
	rep, _ := runConnsJSON(t, 0, "-n", "120", "-c", "10", "--client", "raw", "--src-ips", "3", "--workers", "2")
	checkSane(t, rep, n)
	if rep.Clients.Processes != 2 || rep.Clients.InProcess || rep.Clients.SrcIPs != 3 {
		t.Errorf("clients %+v, want 2 workers over 3 source addresses", rep.Clients)
	}
}

func TestConnsSDKOverSourceAddresses(t *testing.T) {
	const n = 90
	rep, _ := runConnsJSON(t, 0, "-n", "90", "-c", "10", "--client", "sdk", "--src-ips", "3")
	checkSane(t, rep, n)
	if rep.Clients.SrcIPs != 3 || rep.Clients.Kind != "sdk" {
		t.Errorf("clients %+v, want the sdk over 3 source addresses", rep.Clients)
	}
}

func TestConnsFailsWhenServerRefuses(t *testing.T) {
	// A server that holds at most 50 connections cannot pass a 100 run.
	rep, table := runConnsJSON(t, 1, "-n", "100", "-c", "10", "--max-errors", "5", "--imd-arg=--max-conns=50")
	if rep.OK || rep.Failed < 5 || rep.HeldServer > 50 || rep.Aborted == "" {
		t.Errorf("ok %v failed %d held %d aborted %q: want a failed run", rep.OK, rep.Failed, rep.HeldServer, rep.Aborted)
	}
	if !strings.Contains(table, "NOT OK") {
		t.Errorf("table does not say NOT OK:\n%s", table)
	}
}

func TestParseFlagsEnvironment(t *testing.T) {
	var stdout, stderr bytes.Buffer
	fs := newFlagSet("x", "", &stdout, &stderr)
	n := fs.Int("n", 1, "")
	settle := fs.Duration("settle", time.Second, "")
	env := map[string]string{"IMBENCH_N": "7", "IMBENCH_SETTLE": "3s"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	if err := parseFlags(fs, []string{"--settle", "5s"}, lookup); err != nil {
		t.Fatal(err)
	}
	if *n != 7 || *settle != 5*time.Second {
		t.Fatalf("n %d settle %s: want 7 from the environment and 5s from the flag", *n, *settle)
	}
	env["IMBENCH_N"] = "many"
	fs2 := newFlagSet("x", "", &stdout, &stderr)
	fs2.Int("n", 1, "")
	if err := parseFlags(fs2, nil, lookup); err == nil {
		t.Fatal("a bad IMBENCH_N should fail")
	}
}

func TestUsageAndUnknownScenario(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "conns") {
		t.Fatalf("--help: exit %d, %q", code, stdout.String())
	}
	if strings.Contains(stdout.String(), "worker") {
		t.Error("the hidden worker command is listed")
	}
	stdout.Reset()
	if code := run(context.Background(), []string{"conns", "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "-settle") {
		t.Fatalf("conns --help: exit %d, %q", code, stdout.String())
	}
	if code := run(context.Background(), []string{"nope"}, &stdout, &stderr); code != 2 {
		t.Fatalf("unknown scenario: exit %d", code)
	}
	if code := run(context.Background(), []string{"conns", "-n", "0"}, &stdout, &stderr); code != 2 {
		t.Fatalf("-n 0: exit %d, want 2", code)
	}
	if code := run(context.Background(), []string{"conns", "--src-ips", "300"}, &stdout, &stderr); code != 2 {
		t.Fatalf("--src-ips 300: exit %d, want 2", code)
	}
}
