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
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema/pb"
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

func decodeLoad(t *testing.T, b []byte) *loadReport {
	t.Helper()
	var rep loadReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("report does not decode: %v\n%s", err, b)
	}
	return &rep
}

// checkRun asserts what every clean run must show: everything scheduled
// was issued and delivered once, with plausible latencies.
func checkRun(t *testing.T, r loadRun, perOp int64) {
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
	if !strings.Contains(table, "deliveries/s") || !strings.Contains(table, "srv us/delivery") {
		t.Errorf("table:\n%s", table)
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
	var v c2sVerify
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
	var rep offlineReport
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
	var doc connsStepsReport
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

// TestDriveIsOpenLoop checks the driver against a fake operation: one
// stalled operation delays the ones behind it (one slot per sender), and
// their latency, taken from the schedule, shows the stall, while the
// service time does not.
func TestDriveIsOpenLoop(t *testing.T) {
	rs := newRunState(1000, 100, 1, false)
	rs.start = time.Now()
	rs.startM = mono()
	op := func(_ context.Context, rs *runState, s int, g int64, at int64) error {
		sent := mono()
		if g == 10 {
			time.Sleep(60 * time.Millisecond)
		}
		rs.expected.Add(1)
		rs.deliver(s, g, at, sent)
		return nil
	}
	drive(context.Background(), rs, 1, 1, op)
	if rs.issued.Load() != 100 || rs.ok.Load() != 100 || rs.delivered.Load() != 100 {
		t.Fatalf("issued %d ok %d delivered %d", rs.issued.Load(), rs.ok.Load(), rs.delivered.Load())
	}
	lat, svc := rs.lat.merged(), rs.svc.merged()
	// Operations 11.. were due 1 ms apart while 10 stalled for 60 ms: the
	// next one waited ~59 ms, and the p90 of the 100 is well above 1 ms.
	if lat.Max() < 50*time.Millisecond || lat.Quantile(0.9) < 5*time.Millisecond {
		t.Errorf("latency from the schedule hides the stall: max %s, p90 %s", lat.Max(), lat.Quantile(0.9))
	}
	if svc.Quantile(0.5) > 5*time.Millisecond {
		t.Errorf("service p50 %s, want the bare operation time", svc.Quantile(0.5))
	}
	if rs.maxBehind.Load() < int64(50*time.Millisecond) {
		t.Errorf("max behind schedule %s, want the stall", time.Duration(rs.maxBehind.Load()))
	}
}

func TestDriveStopsAtDeadline(t *testing.T) {
	rs := newRunState(100, 1000, 1, false) // 10 s of schedule
	rs.start = time.Now()
	rs.startM = mono()
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	var mu sync.Mutex
	seen := map[int]int{}
	drive(ctx, rs, 4, 2, func(_ context.Context, rs *runState, s int, g int64, at int64) error {
		mu.Lock()
		seen[s]++
		mu.Unlock()
		if g%5 == 0 {
			return errors.New("boom")
		}
		return nil
	})
	is := rs.issued.Load()
	if is < 5 || is > 30 {
		t.Fatalf("issued %d in 150 ms at 100/s", is)
	}
	if rs.ok.Load()+rs.failed.Load() != is || rs.failed.Load() == 0 || rs.errs["boom"] != int(rs.failed.Load()) {
		t.Fatalf("ok %d failed %d of %d issued, errors %v", rs.ok.Load(), rs.failed.Load(), is, rs.errs)
	}
	if len(seen) != 4 {
		t.Errorf("senders used: %v, want all 4", seen)
	}
}

// TestS2CSlots checks that every (push, recipient) pair maps to a slot of
// its own and that a client a push did not name is not counted.
func TestS2CSlots(t *testing.T) {
	s := &s2c{n: 7, k: 3}
	rs := newRunState(1, 10, 3, false)
	s.cur.Store(rs)
	content := newContent(msgHeader)
	for g := range int64(10) {
		for j := range int64(3) {
			putHeader(content, rs.id, g, 0, 0)
			s.received(int((s.first(g)+j)%7), &pb.S2CNotify{Content: content})
		}
	}
	if rs.delivered.Load() != 30 || rs.dups.Load() != 0 || rs.stray.Load() != 0 {
		t.Fatalf("delivered %d dups %d stray %d, want 30 distinct", rs.delivered.Load(), rs.dups.Load(), rs.stray.Load())
	}
	putHeader(content, rs.id, 0, 0, 0)
	s.received(5, &pb.S2CNotify{Content: content}) // push 0 went to 0, 1, 2
	putHeader(content, rs.id+1, 0, 0, 0)
	s.received(0, &pb.S2CNotify{Content: content}) // another run's push
	if rs.stray.Load() != 1 || rs.delivered.Load() != 30 {
		t.Fatalf("stray %d delivered %d", rs.stray.Load(), rs.delivered.Load())
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
	if got := minMedMax([]float64{3, 1, 2, 10}); got != [3]float64{1, 2.5, 10} {
		t.Errorf("minMedMax = %v", got)
	}
	if singular("deliveries") != "delivery" || singular("msgs") != "msg" || singular("acks") != "ack" {
		t.Error("singular")
	}
	for _, c := range []struct{ flag, json, want string }{
		{"", "", "results/x.svg"}, {"", "a/b.json", "a/b.svg"}, {"", "b.json", "results/b.svg"},
		{"c.svg", "a/b.json", "results/c.svg"}, {"d/c.svg", "", "d/c.svg"},
	} {
		if got := chartFile(c.flag, c.json, "results", "x.svg"); got != c.want {
			t.Errorf("chartFile(%q, %q) = %q, want %q", c.flag, c.json, got, c.want)
		}
	}
	b := newContent(40)
	putHeader(b, 7, 12345, 111, 222)
	if run, idx, at, sent, ok := getHeader(b); !ok || run != 7 || idx != 12345 || at != 111 || sent != 222 {
		t.Fatalf("header round trip: %v %v %v %v %v", run, idx, at, sent, ok)
	}
	if _, _, _, _, ok := getHeader(b[:10]); ok {
		t.Fatal("short content decoded")
	}
}

func TestLoadFlagsValidate(t *testing.T) {
	var stdout, stderr bytes.Buffer
	for _, args := range [][]string{
		{"c2c", "--rate", "0"}, {"c2c", "--pairs", "0"}, {"c2c", "--size", "4"}, {"c2c", "--rates", "1,x"},
		{"s2c", "--fanout", "600"}, {"s2c", "--clients", "0"}, {"c2s", "--kafka-brokers", "10.0.0.1:9092"},
		{"offline", "-n", "0"}, {"c2c", "--repeat", "0"}, {"conns", "--steps", "0"},
	} {
		if code := run(context.Background(), args, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
	for _, sc := range []string{"c2c", "s2c", "c2s", "offline"} {
		stdout.Reset()
		if code := run(context.Background(), []string{sc, "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "-json") {
			t.Errorf("%s --help: exit %d\n%s", sc, code, &stdout)
		}
	}
}
