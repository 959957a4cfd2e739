package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
)

// Metrics is one scrape of a Prometheus text exposition: the value of every
// series, keyed by its name plus label text exactly as exposed
// (`imd_gateway_closed_total{reason="eof"}`).
type Metrics map[string]float64

// Get returns the value of the series called name with no labels.
func (m Metrics) Get(name string) (float64, bool) {
	v, ok := m[name]
	return v, ok
}

// Sum adds every series of metric name, whatever its labels (for example
// a counter broken down by reason). It reports whether any series exists.
func (m Metrics) Sum(name string) (float64, bool) {
	var s float64
	found := false
	for k, v := range m {
		if k == name || (strings.HasPrefix(k, name) && k[len(name)] == '{') {
			s += v
			found = true
		}
	}
	return s, found
}

// ParseMetrics reads the Prometheus text format (version 0.0.4): comment
// lines are skipped, every other line is `name[{labels}] value [timestamp]`.
func ParseMetrics(r io.Reader) (Metrics, error) {
	m := Metrics{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for ln := 1; sc.Scan(); ln++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		key, v, err := parseSample(line)
		if err != nil {
			return nil, fmt.Errorf("bench: metrics line %d: %w", ln, err)
		}
		m[key] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("bench: metrics: %w", err)
	}
	return m, nil
}

func parseSample(line string) (key string, v float64, err error) {
	i := strings.IndexAny(line, "{ \t")
	if i <= 0 {
		return "", 0, fmt.Errorf("no value in %q", line)
	}
	if line[i] == '{' {
		end, err := labelsEnd(line, i)
		if err != nil {
			return "", 0, err
		}
		i = end + 1
	}
	key, rest := line[:i], strings.TrimLeft(line[i:], " \t")
	if key == "" || rest == "" {
		return "", 0, fmt.Errorf("no value in %q", line)
	}
	if j := strings.IndexAny(rest, " \t"); j >= 0 {
		rest = rest[:j] // drop the optional timestamp
	}
	switch rest {
	case "+Inf":
		return key, math.Inf(1), nil
	case "-Inf":
		return key, math.Inf(-1), nil
	}
	v, err = strconv.ParseFloat(rest, 64)
	if err != nil {
		return "", 0, fmt.Errorf("value of %s: %w", key, err)
	}
	return key, v, nil
}

// labelsEnd returns the index of the '}' closing the label set that opens
// at line[open], honouring quoted values with backslash escapes.
func labelsEnd(line string, open int) (int, error) {
	inQuote := false
	for i := open + 1; i < len(line); i++ {
		switch c := line[i]; {
		case inQuote && c == '\\':
			i++
		case c == '"':
			inQuote = !inQuote
		case !inQuote && c == '}':
			return i, nil
		}
	}
	return 0, fmt.Errorf("unterminated label set in %q", line)
}

// Scrape fetches url (a /metrics endpoint) with client (nil means
// http.DefaultClient) and parses it.
func Scrape(ctx context.Context, client *http.Client, url string) (Metrics, error) {
	if client == nil {
		client = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("bench: scrape: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		return nil, fmt.Errorf("bench: scrape %s: %s", url, resp.Status)
	}
	return ParseMetrics(resp.Body)
}
