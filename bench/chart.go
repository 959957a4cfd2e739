package bench

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Point is one (x, y) sample of a Series.
type Point struct {
	X float64 `json:"x"`
	Y float64 `json:"y"`
}

// Series is one line of a Chart.
type Series struct {
	Name   string  `json:"name"`
	Points []Point `json:"points"`
	// Dashed draws the line dashed and without markers (a goal or a
	// reference rather than a measurement).
	Dashed bool `json:"dashed,omitempty"`
}

// Chart is a line chart rendered as a standalone SVG document, with no
// tool but this package: axes with round ticks, one polyline with point
// markers per series, and a legend. Points whose coordinates are NaN or
// infinite (or not positive on a logarithmic axis) are left out.
type Chart struct {
	Title    string
	Subtitle string // a second, smaller title line (host, command, ...)
	XLabel   string
	YLabel   string
	Series   []Series
	// LogY puts the y axis on a log10 scale (latencies that span decades).
	LogY bool
	// Width and Height in pixels; 0 means 860 by 520.
	Width, Height int
}

// palette holds distinguishable line colours, used in series order.
var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"}

// Margins around the plot area, in pixels.
const (
	marginLeft   = 78
	marginRight  = 215 // the legend sits right of the plot
	marginTop    = 58
	marginBottom = 56
)

func usable(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// SVG renders the chart.
func (c *Chart) SVG() []byte {
	w, h := c.Width, c.Height
	if w <= 0 {
		w = 860
	}
	if h <= 0 {
		h = 520
	}
	pw, ph := float64(w-marginLeft-marginRight), float64(h-marginTop-marginBottom)

	// Data ranges over every usable point.
	xmin, xmax := math.Inf(1), math.Inf(-1)
	ymin, ymax := math.Inf(1), math.Inf(-1)
	for _, s := range c.Series {
		for _, p := range s.Points {
			if !c.ok(p) {
				continue
			}
			xmin, xmax = math.Min(xmin, p.X), math.Max(xmax, p.X)
			ymin, ymax = math.Min(ymin, p.Y), math.Max(ymax, p.Y)
		}
	}
	if xmin > xmax { // no data
		xmin, xmax, ymin, ymax = 0, 1, 1, 10
	}
	// Linear axes start at 0 when the data are all positive, so slopes
	// read as proportions.
	if xmin > 0 {
		xmin = 0
	}
	xticks := niceTicks(xmin, xmax, 6)
	xlo, xhi := xticks[0], xticks[len(xticks)-1]
	var yticks []float64
	var ylo, yhi float64
	if c.LogY {
		ylo = math.Pow(10, math.Floor(math.Log10(ymin)))
		yhi = math.Pow(10, math.Ceil(math.Log10(ymax)))
		if yhi <= ylo {
			yhi = ylo * 10
		}
		decades := math.Round(math.Log10(yhi / ylo))
		for v := ylo; v <= yhi*1.0001; v *= 10 {
			yticks = append(yticks, v)
			if decades <= 3 && v*10 <= yhi*1.0001 {
				yticks = append(yticks, 2*v, 5*v) // 1-2-5 steps when there is room
			}
		}
	} else {
		if ymin > 0 {
			ymin = 0
		}
		yticks = niceTicks(ymin, ymax, 6)
		ylo, yhi = yticks[0], yticks[len(yticks)-1]
	}
	px := func(x float64) float64 { return marginLeft + (x-xlo)/(xhi-xlo)*pw }
	py := func(y float64) float64 {
		if c.LogY {
			return marginTop + ph - (math.Log10(y)-math.Log10(ylo))/(math.Log10(yhi)-math.Log10(ylo))*ph
		}
		return marginTop + ph - (y-ylo)/(yhi-ylo)*ph
	}

	var b bytes.Buffer
	fmt.Fprintf(&b, `<?xml version="1.0" encoding="UTF-8"?>`+"\n")
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", w, h, w, h)
	fmt.Fprintf(&b, `<title>%s</title>`+"\n", esc(c.Title))
	fmt.Fprintf(&b, `<rect x="0" y="0" width="%d" height="%d" fill="#ffffff"/>`+"\n", w, h)
	fmt.Fprintf(&b, `<text x="%d" y="24" font-size="16" font-weight="bold">%s</text>`+"\n", marginLeft, esc(c.Title))
	if c.Subtitle != "" {
		fmt.Fprintf(&b, `<text x="%d" y="42" font-size="11" fill="#555555">%s</text>`+"\n", marginLeft, esc(c.Subtitle))
	}

	// Grid and ticks.
	b.WriteString(`<g class="grid" stroke="#e0e0e0" stroke-width="1">` + "\n")
	for _, t := range xticks {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%.1f"/>`+"\n", px(t), marginTop, px(t), marginTop+ph)
	}
	for _, t := range yticks {
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f"/>`+"\n", marginLeft, py(t), marginLeft+pw, py(t))
	}
	b.WriteString("</g>\n")
	b.WriteString(`<g class="ticks" fill="#333333">` + "\n")
	for _, t := range xticks {
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", px(t), marginTop+ph+18, esc(tickLabel(t)))
	}
	for _, t := range yticks {
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", marginLeft-8, py(t)+4, esc(tickLabel(t)))
	}
	b.WriteString("</g>\n")
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%.1f" fill="none" stroke="#333333"/>`+"\n", marginLeft, marginTop, pw, ph)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", marginLeft+pw/2, h-14, esc(c.XLabel))
	fmt.Fprintf(&b, `<text x="18" y="%.1f" text-anchor="middle" transform="rotate(-90 18 %.1f)">%s</text>`+"\n",
		marginTop+ph/2, marginTop+ph/2, esc(c.YLabel))

	// Series, then the legend.
	for i, s := range c.Series {
		color := palette[i%len(palette)]
		fmt.Fprintf(&b, `<g class="series" data-name="%s">`+"\n", esc(s.Name))
		var pts []string
		for _, p := range s.Points {
			if c.ok(p) {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(p.X), py(p.Y)))
			}
		}
		dash := ""
		if s.Dashed {
			dash = ` stroke-dasharray="6 4"`
		}
		if len(pts) > 1 {
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>`+"\n", color, dash, strings.Join(pts, " "))
		}
		if !s.Dashed {
			for _, p := range s.Points {
				if c.ok(p) {
					fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s: %s, %s</title></circle>`+"\n",
						px(p.X), py(p.Y), color, esc(s.Name), esc(valueLabel(p.X)), esc(valueLabel(p.Y)))
				}
			}
		}
		b.WriteString("</g>\n")
	}
	lx := float64(w-marginRight) + 16
	for i, s := range c.Series {
		color := palette[i%len(palette)]
		y := float64(marginTop) + 10 + float64(i)*20
		dash := ""
		if s.Dashed {
			dash = ` stroke-dasharray="6 4"`
		}
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"%s/>`+"\n", lx, y, lx+22, y, color, dash)
		fmt.Fprintf(&b, `<text class="legend" x="%.1f" y="%.1f">%s</text>`+"\n", lx+28, y+4, esc(s.Name))
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

func (c *Chart) ok(p Point) bool {
	return usable(p.X) && usable(p.Y) && (!c.LogY || p.Y > 0)
}

// WriteFile writes the SVG to path, creating its folder.
func (c *Chart) WriteFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, c.SVG(), 0o644)
}

// esc escapes s for XML text and attribute values.
func esc(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

// niceTicks returns about n round tick values (steps of 1, 2 or 5 times a
// power of ten) from at or below lo to at or above hi.
func niceTicks(lo, hi float64, n int) []float64 {
	if hi <= lo {
		if lo == 0 {
			hi = 1
		} else {
			lo, hi = lo-math.Abs(lo)/2, hi+math.Abs(hi)/2
		}
	}
	raw := (hi - lo) / float64(max(n-1, 1))
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	start := math.Floor(lo/step) * step
	end := math.Ceil(hi/step) * step
	var ticks []float64
	for i := 0; ; i++ {
		v := start + float64(i)*step
		if v > end+step/1e6 {
			break
		}
		if math.Abs(v) < step/1e9 {
			v = 0
		}
		ticks = append(ticks, v)
	}
	if len(ticks) < 2 {
		ticks = append(ticks, start+step)
	}
	return ticks
}

// tickLabel prints a tick value short: 2500 -> 2.5k, 1e6 -> 1M, 0.25.
func tickLabel(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e9:
		return trimFloat(v/1e9) + "G"
	case a >= 1e6:
		return trimFloat(v/1e6) + "M"
	case a >= 1e3:
		return trimFloat(v/1e3) + "k"
	}
	return trimFloat(v)
}

func trimFloat(v float64) string { return strconv.FormatFloat(v, 'g', 4, 64) }

// valueLabel prints a point's value for its tooltip.
func valueLabel(v float64) string {
	if math.Abs(v) >= 100 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}
