package bench

import (
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// svgDoc is what a test learns from parsing an SVG document.
type svgDoc struct {
	root      string
	xmlns     string
	polylines int
	circles   int
	legend    []string
	series    []string // data-name of each series group
	texts     []string
}

// parseSVG checks that b is well-formed XML (every element closed, every
// entity valid) and collects what the tests look at.
func parseSVG(t *testing.T, b []byte) svgDoc {
	t.Helper()
	var d svgDoc
	dec := xml.NewDecoder(bytes.NewReader(b))
	dec.Strict = true
	depth := 0
	var inText, inLegend bool
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v\n%s", err, b)
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				d.root, d.xmlns = e.Name.Local, e.Name.Space
			}
			depth++
			switch e.Name.Local {
			case "polyline":
				d.polylines++
			case "circle":
				d.circles++
			case "g":
				for _, a := range e.Attr {
					if a.Name.Local == "data-name" {
						d.series = append(d.series, a.Value)
					}
				}
			case "text":
				inText = true
				for _, a := range e.Attr {
					if a.Name.Local == "class" && a.Value == "legend" {
						inLegend = true
					}
				}
			}
		case xml.EndElement:
			depth--
			if e.Name.Local == "text" {
				inText, inLegend = false, false
			}
		case xml.CharData:
			if inText {
				d.texts = append(d.texts, string(e))
			}
			if inLegend {
				d.legend = append(d.legend, string(e))
			}
		}
	}
	if depth != 0 {
		t.Fatalf("unbalanced elements (depth %d)", depth)
	}
	return d
}

func TestChartSVGIsWellFormedWithEverySeries(t *testing.T) {
	c := &Chart{
		Title:    "c2c latency <vs> throughput & more",
		Subtitle: `host "x", 2 CPUs`,
		XLabel:   "delivered msgs/s",
		YLabel:   "latency (ms)",
		Series: []Series{
			{Name: "p50", Points: []Point{{1000, 1.5}, {2000, 2}, {4000, 3.5}}},
			{Name: "p99 <corrected>", Points: []Point{{1000, 8}, {2000, 12}, {4000, 250}}},
			{Name: "goal", Points: []Point{{0, 50}, {4000, 50}}, Dashed: true},
		},
	}
	for _, logY := range []bool{false, true} {
		c.LogY = logY
		d := parseSVG(t, c.SVG())
		if d.root != "svg" || d.xmlns != "http://www.w3.org/2000/svg" {
			t.Fatalf("root %q in %q, want svg in the SVG namespace", d.root, d.xmlns)
		}
		if d.polylines != 3 {
			t.Errorf("logY %v: %d polylines, want one per series (3)", logY, d.polylines)
		}
		if d.circles != 6 {
			t.Errorf("logY %v: %d markers, want 6 (none on the dashed series)", logY, d.circles)
		}
		want := []string{"p50", "p99 <corrected>", "goal"}
		if strings.Join(d.legend, "|") != strings.Join(want, "|") || strings.Join(d.series, "|") != strings.Join(want, "|") {
			t.Errorf("legend %q, series groups %q, want %q", d.legend, d.series, want)
		}
		all := strings.Join(d.texts, "\n")
		for _, s := range []string{c.Title, c.Subtitle, c.XLabel, c.YLabel, "4k"} {
			if !strings.Contains(all, s) {
				t.Errorf("logY %v: no text %q in\n%s", logY, s, all)
			}
		}
	}
}

func TestChartSkipsUnusablePoints(t *testing.T) {
	c := &Chart{Title: "t", LogY: true, Series: []Series{
		{Name: "a", Points: []Point{{1, 0}, {2, math.NaN()}, {3, math.Inf(1)}, {4, 5}}},
		{Name: "empty"},
	}}
	d := parseSVG(t, c.SVG())
	if d.circles != 1 || d.polylines != 0 {
		t.Fatalf("%d markers, %d lines: want only the one usable point", d.circles, d.polylines)
	}
	// No data at all still renders a valid, empty chart.
	d = parseSVG(t, (&Chart{Title: "none"}).SVG())
	if d.root != "svg" || d.polylines != 0 {
		t.Fatalf("empty chart: %+v", d)
	}
	if b := (&Chart{Series: []Series{{Name: "one", Points: []Point{{3, 3}}}}}).SVG(); bytes.Contains(b, []byte("NaN")) {
		t.Fatalf("one point gives NaN coordinates:\n%s", b)
	}
}

func TestChartWriteFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "c.svg")
	c := &Chart{Title: "mem", Series: []Series{{Name: "rss", Points: []Point{{1000, 1300}, {5000, 1250}}}}}
	if err := c.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	parseSVG(t, b)
}

func TestNiceTicks(t *testing.T) {
	for _, tc := range []struct{ lo, hi float64 }{{0, 1}, {0, 4321}, {0, 97000}, {0.2, 0.9}, {0, 0}, {5, 5}, {-3, 17}, {0, 1.2e6}} {
		ticks := niceTicks(tc.lo, tc.hi, 6)
		if len(ticks) < 2 || len(ticks) > 12 {
			t.Fatalf("%v: %d ticks %v", tc, len(ticks), ticks)
		}
		if ticks[0] > tc.lo || ticks[len(ticks)-1] < tc.hi {
			t.Fatalf("%v: ticks %v do not cover the range", tc, ticks)
		}
		for i := 1; i < len(ticks); i++ {
			if ticks[i] <= ticks[i-1] {
				t.Fatalf("%v: ticks %v not increasing", tc, ticks)
			}
		}
	}
	for v, want := range map[float64]string{2500: "2.5k", 1e6: "1M", 0.25: "0.25", 40: "40", 0: "0", 1.5e9: "1.5G"} {
		if got := tickLabel(v); got != want {
			t.Errorf("tickLabel(%v) = %q, want %q", v, got, want)
		}
	}
}
