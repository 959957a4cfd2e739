package bench

import (
	"context"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

const exposition = `# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 10042
# HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 1.2345678e+07
imd_gateway_connections 10000

imd_gateway_closed_total{reason="eof"} 3
imd_gateway_closed_total{reason="idle timeout"} 4 1700000000000
imd_gateway_closed_total{reason="odd \"}\" {reason}",x="y"} 5
imd_gateway_closed_totally 100
rpc_duration_seconds_bucket{le="+Inf"} 7
weird_value +Inf
	indented_value   -2.5
`

func TestParseMetrics(t *testing.T) {
	m, err := ParseMetrics(strings.NewReader(exposition))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]float64{
		"go_goroutines":                10042,
		"go_memstats_heap_inuse_bytes": 12345678,
		"imd_gateway_connections":      10000,
		"indented_value":               -2.5,
	} {
		if got, ok := m.Get(name); !ok || got != want {
			t.Errorf("Get(%s) = %v, %v; want %v", name, got, ok, want)
		}
	}
	if v, ok := m.Get("weird_value"); !ok || !math.IsInf(v, 1) {
		t.Errorf("weird_value = %v, want +Inf", v)
	}
	if v := m[`imd_gateway_closed_total{reason="idle timeout"}`]; v != 4 {
		t.Errorf("labelled series with timestamp = %v, want 4", v)
	}
	if v, ok := m.Sum("imd_gateway_closed_total"); !ok || v != 12 {
		t.Errorf("Sum(imd_gateway_closed_total) = %v, %v; want 12 (and not the _totally metric)", v, ok)
	}
	if _, ok := m.Get("imd_gateway_closed_total"); ok {
		t.Error("Get should only find unlabelled series")
	}
	if _, ok := m.Sum("missing"); ok {
		t.Error("Sum of a missing metric reported found")
	}
	if v, ok := m.Sum("go_goroutines"); !ok || v != 10042 {
		t.Errorf("Sum of an unlabelled metric = %v, %v", v, ok)
	}
}

func TestParseMetricsRejectsMalformed(t *testing.T) {
	for _, bad := range []string{
		"just_a_name\n",
		"name{a=\"b\" 1\n",
		"name{a=\"b\"} \n",
		"name notanumber\n",
		"{a=\"b\"} 1\n",
	} {
		if _, err := ParseMetrics(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseMetrics(%q) accepted a malformed line", bad)
		}
	}
}

func TestScrape(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(exposition))
	}))
	defer srv.Close()
	m, err := Scrape(context.Background(), srv.Client(), srv.URL+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := m.Get("imd_gateway_connections"); v != 10000 {
		t.Fatalf("scraped connections = %v", v)
	}
	if _, err := Scrape(context.Background(), srv.Client(), srv.URL+"/nope"); err == nil {
		t.Fatal("a 404 scrape should fail")
	}
}
