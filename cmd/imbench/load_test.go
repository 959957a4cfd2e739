package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/bench/scenario"
)

// runScenario runs `imbench <args...>` in this process with the test's imd
// and returns the JSON report (raw), the table and stderr.
func runScenario(t *testing.T, wantCode int, scenario string, args ...string) ([]byte, string, string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "report.json")
	args = append([]string{scenario, "--imd", buildIMD(t), "--json", out}, args...)
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	began := time.Now()
	code := run(ctx, args, &stdout, &stderr)
	if code != wantCode {
		t.Fatalf("imbench %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, wantCode, &stdout, &stderr)
	}
	t.Logf("imbench %s: %.1fs\n%s", scenario, time.Since(began).Seconds(), &stdout)
	for _, bad := range []string{"DATA RACE", "panic"} {
		if strings.Contains(stderr.String(), bad) {
			t.Errorf("stderr mentions %q:\n%s", bad, &stderr)
		}
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("no JSON report: %v\nstderr:\n%s", err, &stderr)
	}
	return b, stdout.String(), stderr.String()
}

func decodeLoad(t *testing.T, b []byte) *scenario.LoadReport {
	t.Helper()
	var rep scenario.LoadReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("report does not decode: %v\n%s", err, b)
	}
	return &rep
}

// checkRun asserts what every clean run must show: everything scheduled
// was issued and delivered once, with plausible latencies.
func checkRun(t *testing.T, r scenario.LoadRun, perOp int64) {
	t.Helper()
	if !r.OK || r.Failed != 0 || r.Missing != 0 || r.Duplicates != 0 || r.Stray != 0 || r.Unsent != 0 {
		t.Errorf("run at %v/s not clean: %+v", r.Rate, r)
	}
	if r.Issued != r.Scheduled || r.OKOps != r.Scheduled || r.Expected != r.Scheduled*perOp || r.Delivered != r.Expected {
		t.Errorf("run at %v/s: scheduled %d, issued %d, ok %d, expected %d, delivered %d (x%d per op)",
			r.Rate, r.Scheduled, r.Issued, r.OKOps, r.Expected, r.Delivered, perOp)
	}
	if r.Throughput <= 0 || r.Seconds <= 0 || r.ServerCPUSeconds < 0 || r.ClientCPUSeconds <= 0 {
		t.Errorf("run at %v/s: throughput %v over %vs, server cpu %v, client cpu %v", r.Rate, r.Throughput, r.Seconds, r.ServerCPUSeconds, r.ClientCPUSeconds)
	}
	// A started server's CPU comes from /proc (10 ms ticks: a short run may
	// read 0), and the per-unit figures follow from it.
	if r.ServerCPUSource != scenario.CPUFromProc || (r.ServerCPUSeconds > 0 && (r.ServerUsPerDeliv <= 0 || r.ServerUsPerOp < r.ServerUsPerDeliv)) {
		t.Errorf("run at %v/s: server CPU %vs from %q, %v us per delivery, %v per op", r.Rate, r.ServerCPUSeconds, r.ServerCPUSource, r.ServerUsPerDeliv, r.ServerUsPerOp)
	}
	l := r.Latency
	if l.Count != uint64(r.Delivered) || l.MinMs <= 0 || l.P50Ms < l.MinMs || l.P99Ms < l.P50Ms || l.MaxMs < l.P999Ms || l.MaxMs > 30_000 {
		t.Errorf("run at %v/s: latency implausible: %+v", r.Rate, l)
	}
	// The service latency starts later than the scheduled one, never earlier.
	if r.Service.Count != l.Count || r.Service.MinMs > l.MaxMs || r.Service.P50Ms > l.P50Ms*1.02+0.01 {
		t.Errorf("run at %v/s: service latency %+v against scheduled %+v", r.Rate, r.Service, l)
	}
}

// checkChart asserts that path is a well-formed SVG with the given series.
func checkChart(t *testing.T, path string, series ...string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("chart: %v", err)
	}
	dec := xml.NewDecoder(bytes.NewReader(b))
	for {
		_, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("chart %s is not well-formed: %v", path, err)
		}
	}
	for _, s := range series {
		if !bytes.Contains(b, []byte(`data-name="`+s+`"`)) {
			t.Errorf("chart %s lacks series %q", path, s)
		}
	}
}

func TestC2CEndToEnd(t *testing.T) {
	b, table, stderr := runScenario(t, 0, "c2c", "--pairs", "4", "--rates", "200,400", "--duration", "600ms",
		"--warmup", "200ms", "--settle", "0s", "--pause", "100ms", "--drain", "10s", "--size", "64")
	rep := decodeLoad(t, b)
	if !rep.OK || rep.Scenario != "c2c" || len(rep.Runs) != 2 || len(rep.Rates) != 2 || rep.Warmup == nil {
		t.Fatalf("ok %v, %d runs, %d rates, warm-up %v", rep.OK, len(rep.Runs), len(rep.Rates), rep.Warmup)
	}
	for i, want := range []int64{120, 240} {
		if rep.Runs[i].Scheduled != want {
			t.Errorf("run %d scheduled %d, want rate x duration = %d", i, rep.Runs[i].Scheduled, want)
		}
		checkRun(t, rep.Runs[i], 1)
	}
	if !rep.Server.Started || rep.ServerStopResult != "" {
		t.Errorf("server %+v, stop %q", rep.Server, rep.ServerStopResult)
	}
	checkChart(t, rep.Chart, "p50", "p99", "p99.9")
	if filepath.Base(rep.Chart) != "report.svg" {
		t.Errorf("chart at %s, want next to the JSON report", rep.Chart)
	}
	for _, want := range []string{"msgs/s", "p99.9", "offered msgs/s", "chart"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	if !strings.Contains(stderr, "issued ") && !strings.Contains(stderr, "done:") {
		t.Errorf("no progress on stderr:\n%s", stderr)
	}
}

func TestS2CEndToEnd(t *testing.T) {
	b, table, _ := runScenario(t, 0, "s2c", "--clients", "20", "--pushers", "2", "--fanout", "8", "--rate", "20",
		"--duration", "1s", "--warmup", "0s", "--settle", "0s", "--drain", "10s")
	rep := decodeLoad(t, b)
	if !rep.OK || len(rep.Runs) != 1 || rep.Chart != "" {
		t.Fatalf("ok %v, %d runs, chart %q: want one clean run and no chart", rep.OK, len(rep.Runs), rep.Chart)
	}
	r := rep.Runs[0]
	if r.Scheduled != 20 || r.Delivered != 160 {
		t.Errorf("%d pushes, %d deliveries: want 20 pushes to 8 recipients = 160", r.Scheduled, r.Delivered)
	}
	checkRun(t, r, 8)
	if r.OfferedDeliveries != 160 {
		t.Errorf("offered %v deliveries/s, want 20 pushes/s x 8", r.OfferedDeliveries)
	}
	setup := rep.Setup.(map[string]any)
	if setup["shape"] != "rotate" || setup["client"] != "raw" {
		t.Errorf("setup %v: want the rotate shape (--fanout alone) and the raw client (the default)", setup)
	}
	for _, want := range []string{"deliveries/s", "srv us/delivery", "srv us/push", "client us/delivery", "lean clients: 20 connections"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	var ex scenario.S2CExtra
	raw, _ := json.Marshal(rep.Extra)
	if err := json.Unmarshal(raw, &ex); err != nil || ex.Lean == nil {
		t.Fatalf("extra %s: %v", raw, err)
	}
	// Every delivery was acknowledged, some reads together.
	if ex.Lean.AckedIDs != 160 || ex.Lean.AckFrames > 160 || ex.Lean.Dropped != 0 || ex.Lean.ErrorResps != 0 {
		t.Errorf("lean client %+v: want 160 push ids acked in at most 160 frames", ex.Lean)
	}
}

// TestS2CShapes runs the dispatch shape on the lean client and the
// broadcast shape on the SDK, with a sweep and its chart.
func TestS2CShapes(t *testing.T) {
	b, _, _ := runScenario(t, 0, "s2c", "--shape", "dispatch", "--clients", "300", "--fanout", "25", "--rates", "40,80",
		"--duration", "1s", "--warmup", "200ms", "--settle", "0s", "--pause", "100ms", "--drain", "10s", "--login-c", "50")
	rep := decodeLoad(t, b)
	if !rep.OK || len(rep.Runs) != 2 || rep.Chart == "" {
		t.Fatalf("dispatch: ok %v, %d runs, chart %q", rep.OK, len(rep.Runs), rep.Chart)
	}
	for i, r := range rep.Runs {
		checkRun(t, r, 25)
		if want := []int64{40, 80}[i]; r.Scheduled != want || r.Delivered != want*25 {
			t.Errorf("dispatch run %d: %d pushes, %d deliveries", i, r.Scheduled, r.Delivered)
		}
	}
	checkChart(t, rep.Chart, "p50", "p99")
	if s := rep.Setup.(map[string]any); s["shape"] != "dispatch" || s["fanout"] != 25.0 {
		t.Errorf("setup %v", s)
	}

	b, _, _ = runScenario(t, 0, "s2c", "--shape", "broadcast", "--client", "sdk", "--clients", "30", "--rate", "20",
		"--duration", "1s", "--warmup", "0s", "--settle", "0s", "--drain", "10s")
	rep = decodeLoad(t, b)
	if !rep.OK || len(rep.Runs) != 1 || rep.Extra != nil {
		t.Fatalf("broadcast: ok %v, %d runs, extra %v: want one clean run and no lean client", rep.OK, len(rep.Runs), rep.Extra)
	}
	checkRun(t, rep.Runs[0], 30)
	if rep.Runs[0].Delivered != 600 {
		t.Errorf("broadcast: %d deliveries, want 20 pushes to all 30", rep.Runs[0].Delivered)
	}

	// The same through POST /v1/broadcast, to the lean clients.
	b, _, _ = runScenario(t, 0, "s2c", "--shape", "broadcast", "--endpoint", "broadcast", "--clients", "40", "--rate", "20",
		"--duration", "1s", "--warmup", "0s", "--settle", "0s", "--drain", "10s")
	rep = decodeLoad(t, b)
	if !rep.OK || len(rep.Runs) != 1 || len(rep.Runs[0].Errors) != 0 {
		t.Fatalf("broadcast endpoint: ok %v, %d runs, errors %v", rep.OK, len(rep.Runs), rep.Runs[0].Errors)
	}
	checkRun(t, rep.Runs[0], 40)
	if s := rep.Setup.(map[string]any); s["endpoint"] != "broadcast" || s["client"] != "raw" {
		t.Errorf("setup %v", s)
	}
}

func TestC2SEndToEnd(t *testing.T) {
	b, table, _ := runScenario(t, 0, "c2s", "--clients", "4", "--rate", "300", "--duration", "800ms",
		"--warmup", "200ms", "--settle", "0s", "--drain", "10s", "--size", "160")
	rep := decodeLoad(t, b)
	if !rep.OK || len(rep.Runs) != 1 {
		t.Fatalf("ok %v, %d runs", rep.OK, len(rep.Runs))
	}
	checkRun(t, rep.Runs[0], 1)
	var v scenario.C2SVerify
	raw, _ := json.Marshal(rep.Extra)
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	if !v.OK || v.Acked != 240 || v.Found != 240 || v.Missing != 0 || v.Ours < 240+60 || v.Topic != "imbench.gps" || len(v.Brokers) != 1 {
		t.Errorf("verification %+v: want all 240 acked reports found (and the 60 of the warm-up read)", v)
	}
	if len(rep.Server.Kafka) != 1 || !strings.HasPrefix(rep.Server.Kafka[0], "127.0.0.1:") || rep.Server.Kafka[0] == "127.0.0.1:9092" {
		t.Errorf("embedded broker at %v, want a free loopback port", rep.Server.Kafka)
	}
	if !strings.Contains(table, "verify: 240 of 240") {
		t.Errorf("table does not give the verification:\n%s", table)
	}
}

func TestOfflineEndToEnd(t *testing.T) {
	b, table, _ := runScenario(t, 0, "offline", "-n", "300", "--users", "2", "--page-size", "40", "--repeat", "2", "--drain", "20s")
	var rep scenario.OfflineReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if !rep.OK || len(rep.Runs) != 2 {
		t.Fatalf("ok %v, %d runs", rep.OK, len(rep.Runs))
	}
	for _, r := range rep.Runs {
		if !r.OK || r.Stored != 600 || r.Delivered != 600 || r.Missing != 0 || r.Duplicates != 0 || r.StoreFailed != 0 {
			t.Errorf("run %+v: want 600 stored and delivered once", r)
		}
		if r.PullRate <= 0 || r.PullSeconds <= 0 || r.FirstMs <= 0 || r.FirstMs > r.PullSeconds*1000 || r.PerUser.Count != 2 || r.StoreRate <= 0 {
			t.Errorf("run %d timings implausible: %+v", r.Repeat, r)
		}
	}
	if rep.PullRate[0] > rep.PullRate[1] || rep.PullRate[1] > rep.PullRate[2] || rep.PullRate[0] <= 0 {
		t.Errorf("pull rate min/median/max %v", rep.PullRate)
	}
	if !strings.Contains(table, "pulled msgs/s") || !strings.Contains(table, "min / median / max") {
		t.Errorf("table:\n%s", table)
	}
}

func TestConnsStepsChart(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "steps.json")
	args := []string{"conns", "--imd", buildIMD(t), "--json", out, "--steps", "30,60", "-c", "10",
		"--settle", "200ms", "--baseline-wait", "100ms", "--timeout", "60s"}
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, &stdout, &stderr)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var doc scenario.ConnsStepsReport
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	if !doc.OK || len(doc.Runs) != 2 || doc.Runs[0].Requested != 30 || doc.Runs[1].Requested != 60 || doc.Runs[1].HeldServer != 60 {
		t.Fatalf("steps report: ok %v, %d runs", doc.OK, len(doc.Runs))
	}
	if doc.Chart != filepath.Join(dir, "steps.svg") {
		t.Errorf("chart at %q, want next to the JSON", doc.Chart)
	}
	checkChart(t, doc.Chart, "RSS / conn", "Go heap+stacks / conn", "goal 2 KiB")
	if !strings.Contains(stdout.String(), "memory per held connection") {
		t.Errorf("no steps summary:\n%s", &stdout)
	}
}

func TestListFlagsAndHelpers(t *testing.T) {
	var il intList
	if err := il.Set("1000, 5000,10000"); err != nil || il.String() != "1000,5000,10000" {
		t.Fatalf("intList %v %v", il, err)
	}
	for _, bad := range []string{"", "1,x", "0", "-5"} {
		if err := il.Set(bad); err == nil {
			t.Errorf("intList accepted %q", bad)
		}
	}
	var fl floatList
	if err := fl.Set("500,1e3,2500.5"); err != nil || len(fl) != 3 || fl[1] != 1000 {
		t.Fatalf("floatList %v %v", fl, err)
	}
	for _, bad := range []string{"0", "NaN", "Inf", "a"} {
		if err := fl.Set(bad); err == nil {
			t.Errorf("floatList accepted %q", bad)
		}
	}
}

func TestLoadFlagsValidate(t *testing.T) {
	var stdout, stderr bytes.Buffer
	for _, args := range [][]string{
		{"c2c", "--rate", "0"}, {"c2c", "--pairs", "0"}, {"c2c", "--size", "4"}, {"c2c", "--rates", "1,x"},
		{"s2c", "--fanout", "600"}, {"s2c", "--clients", "0"}, {"c2s", "--kafka-brokers", "10.0.0.1:9092"},
		{"offline", "-n", "0"}, {"c2c", "--repeat", "0"}, {"conns", "--steps", "0"},
		{"s2c", "--shape", "spray"}, {"s2c", "--shape", "broadcast", "--fanout", "5"}, {"s2c", "--client", "pigeon"},
		{"group", "--client", "pigeon"}, {"s2c", "--msgtype", "-1"}, {"s2c", "--shape", "dispatch", "--endpoint", "broadcast"},
	} {
		if code := run(context.Background(), args, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
	for _, sc := range []string{"c2c", "s2c", "c2s", "offline", "group", "conns"} {
		stdout.Reset()
		if code := run(context.Background(), []string{sc, "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "-json") {
			t.Errorf("%s --help: exit %d\n%s", sc, code, &stdout)
		}
	}
}
