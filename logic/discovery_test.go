package logic

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/router"
)

// TestGatewayWeight: the least loaded gateway of a DC weighs 100, one
// with twice its load about half as much, near-idle ones about the same,
// and none less than 1.
func TestGatewayWeight(t *testing.T) {
	for _, c := range []struct {
		load, least int64
		want        int
	}{
		{0, 0, 100},
		{1000, 1000, 100},
		{2000, 1000, 52},     // 100 × 1100 / 2100
		{100, 0, 50},         // near-idle: smoothed
		{10, 0, 91},          // not ten times worse than idle
		{50_000, 10_000, 20}, // five times the load: a fifth of the share
		{1 << 40, 0, 1},      // never 0
		{-5, -5, 100},        // a bad heartbeat counts as idle
	} {
		if got := gatewayWeight(c.load, c.least); got != c.want {
			t.Errorf("gatewayWeight(%d, least %d) = %d, want %d", c.load, c.least, got, c.want)
		}
	}
}

func testGateways() []GatewayInfo {
	return []GatewayInfo{
		{DC: "dc2", ID: "b1", Load: 500},
		{DC: "dc1", ID: "a1", Load: 3000},
		{DC: "dc3", ID: "c1", Load: 0},
		{DC: "dc1", ID: "a2", Load: 1000},
		{DC: "dc2", ID: "b2", Load: 100},
		{DC: "dc1", ID: "a3", Load: 2000},
	}
}

func ids(gws []GatewayInfo) []string {
	out := make([]string, len(gws))
	for i, g := range gws {
		out[i] = g.ID
	}
	return out
}

// TestRankGateways: the asked-for DC first, least loaded (heaviest) first,
// then the other DCs by name; weights are per DC.
func TestRankGateways(t *testing.T) {
	got := RankGateways(testGateways(), "dc1", nil)
	if want := []string{"a2", "a3", "a1", "b2", "b1", "c1"}; !slices.Equal(ids(got), want) {
		t.Fatalf("dc1 first: %v, want %v", ids(got), want)
	}
	weights := map[string]int{}
	for _, g := range got {
		weights[g.ID] = g.Weight
	}
	// a2 is dc1's least loaded and b2 dc2's: each weighs 100 in its DC.
	if weights["a2"] != 100 || weights["b2"] != 100 || weights["c1"] != 100 || weights["a3"] != 52 || weights["a1"] != 35 || weights["b1"] != 33 {
		t.Fatalf("weights %v", weights)
	}
	got = RankGateways(testGateways(), "dc2", nil)
	if want := []string{"b2", "b1", "a2", "a3", "a1", "c1"}; !slices.Equal(ids(got), want) {
		t.Fatalf("dc2 first: %v, want %v", ids(got), want)
	}
	// A DC that lists no gateway: the others by name.
	got = RankGateways(testGateways(), "dc9", nil)
	if want := []string{"a2", "a3", "a1", "b2", "b1", "c1"}; !slices.Equal(ids(got), want) {
		t.Fatalf("unknown DC first: %v, want %v", ids(got), want)
	}
}

// TestRankGatewaysShufflesTies: gateways of equal weight come in the
// order the shuffle leaves them, so clients asking at once spread; the
// weights' order holds whatever the shuffle.
func TestRankGatewaysShufflesTies(t *testing.T) {
	gws := func() []GatewayInfo {
		return []GatewayInfo{{DC: "dc1", ID: "x", Load: 10}, {DC: "dc1", ID: "y", Load: 10}, {DC: "dc1", ID: "z", Load: 5000}}
	}
	reverse := func(n int, swap func(i, j int)) {
		for i := 0; i < n/2; i++ {
			swap(i, n-1-i)
		}
	}
	keep := func(int, func(i, j int)) {}
	if got := ids(RankGateways(gws(), "dc1", keep)); !slices.Equal(got, []string{"x", "y", "z"}) {
		t.Fatalf("unshuffled: %v", got)
	}
	if got := ids(RankGateways(gws(), "dc1", reverse)); !slices.Equal(got, []string{"y", "x", "z"}) {
		t.Fatalf("reversed: %v, want the tie reversed and z last", got)
	}
	firsts := map[string]int{}
	for range 200 {
		firsts[RankGateways(gws(), "dc1", nil)[0].ID]++
	}
	if firsts["x"] == 0 || firsts["y"] == 0 || firsts["z"] != 0 {
		t.Fatalf("first of 200 rankings: %v, want x and y both, never z", firsts)
	}
}

// fakeLister is a GatewayLister with a fixed answer.
type fakeLister struct {
	dc  string
	gws []GatewayInfo
	err error
}

func (f fakeLister) DC() string { return f.dc }
func (f fakeLister) Gateways(context.Context) ([]GatewayInfo, error) {
	return slices.Clone(f.gws), f.err
}

// serveDiscovery starts the HTTP API with lister and logic limits l.
func serveDiscovery(t *testing.T, lister GatewayLister, l Limits) string {
	t.Helper()
	svc, err := New(Options{Router: router.NewMemory(), Limits: l})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var o HTTPOptions
	if lister != nil {
		o.Gateways = lister
	}
	srv := NewHTTPServer(svc, o)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Shutdown()
		<-done
	})
	return ln.Addr().String()
}

// TestGatewaysEndpoint: GET /v1/gateways answers without an API key: the
// node's DC, its gateways first by weight, then the other DCs'; ?dc and
// ?limit; errors as JSON.
func TestGatewaysEndpoint(t *testing.T) {
	lister := fakeLister{dc: "dc1", gws: []GatewayInfo{
		{DC: "dc2", ID: "b1", Addr: "b1:7070", Load: 7},
		{DC: "dc1", ID: "a1", Addr: "a1:7070", TLSAddr: "a1:7443", WebAddr: "a1:7072", Load: 900},
		{DC: "dc1", ID: "a2", Addr: "a2:7070", Load: 100},
		{DC: "dc2", ID: "b2", Addr: "b2:7070", Load: 0, Stale: true},
	}}
	addr := serveDiscovery(t, lister, Limits{})
	var ans struct {
		DC       string        `json:"dc"`
		Gateways []GatewayInfo `json:"gateways"`
	}
	getJSON := func(path string, want int) {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET %s: HTTP %d, want %d", path, resp.StatusCode, want)
		}
		if resp.Header.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("GET %s: no CORS header", path)
		}
		ans.Gateways = nil
		if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	getJSON("/v1/gateways", 200)
	if ans.DC != "dc1" || !slices.Equal(ids(ans.Gateways), []string{"a2", "a1", "b2", "b1"}) {
		t.Fatalf("answer %+v", ans)
	}
	if a1 := ans.Gateways[1]; a1.TLSAddr != "a1:7443" || a1.WebAddr != "a1:7072" || a1.Load != 900 || a1.Weight != 20 {
		t.Fatalf("a1 listed as %+v", a1)
	}
	if !ans.Gateways[2].Stale || ans.Gateways[3].Stale {
		t.Fatalf("stale marks: %+v", ans.Gateways)
	}
	getJSON("/v1/gateways?dc=dc2&limit=3", 200)
	if ans.DC != "dc1" || !slices.Equal(ids(ans.Gateways), []string{"b2", "b1", "a2"}) {
		t.Fatalf("?dc=dc2&limit=3: %+v", ans)
	}
	for _, bad := range []string{"?limit=0", "?limit=x", "?limit=1001", "?dc=" + strings.Repeat("x", 65)} {
		resp, err := http.Get("http://" + addr + "/v1/gateways" + bad)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("GET /v1/gateways%s: HTTP %d, want 400", bad, resp.StatusCode)
		}
	}
	resp, err := http.Post("http://"+addr+"/v1/gateways", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 405 {
		t.Errorf("POST: HTTP %d, want 405", resp.StatusCode)
	}

	// No gateway at all: an empty list, not null.
	addr = serveDiscovery(t, fakeLister{dc: "dc1"}, Limits{})
	if code, body := get(t, addr, "/v1/gateways", ""); code != 200 || fmt.Sprint(body["gateways"]) != "[]" {
		t.Fatalf("no gateways: HTTP %d %v", code, body)
	}
	// The lister fails: 503, retryable.
	addr = serveDiscovery(t, fakeLister{dc: "dc1", err: errors.New("redis down")}, Limits{})
	if code, body := get(t, addr, "/v1/gateways", ""); code != 503 || body["error"].(map[string]any)["retryable"] != true {
		t.Fatalf("lister failing: HTTP %d %v", code, body)
	}
	// No lister: discovery is off.
	addr = serveDiscovery(t, nil, Limits{})
	if code, _ := get(t, addr, "/v1/gateways", ""); code != 404 {
		t.Fatalf("no lister: HTTP %d, want 404", code)
	}
}

// TestGatewaysRateLimit: limits.discovery_per_ip refuses an address over
// its bucket with 429 and status 3001.
func TestGatewaysRateLimit(t *testing.T) {
	addr := serveDiscovery(t, fakeLister{dc: "dc1"}, Limits{DiscoveryPerIP: ratelimit.Rate{Rate: 0.01, Burst: 3}})
	for i := range 3 {
		if code, body := get(t, addr, "/v1/gateways", ""); code != 200 {
			t.Fatalf("request %d within the burst: HTTP %d %v", i, code, body)
		}
	}
	code, body := get(t, addr, "/v1/gateways", "")
	if code != 429 || body["error"].(map[string]any)["code"] != float64(3001) {
		t.Fatalf("over the burst: HTTP %d %v, want 429 with 3001", code, body)
	}
}
