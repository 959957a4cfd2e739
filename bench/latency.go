// Package bench holds the pieces imbench's scenarios share: a mergeable
// latency histogram, a reader of a process's memory from /proc, a scraper
// of a few Prometheus metrics, and helpers for the machine's limits (open
// files, ephemeral ports). None of it needs a running server.
package bench

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"time"
)

// Histogram buckets: values below linearMax nanoseconds are exact; above,
// each power of two is cut into subBuckets equal parts, so a bucket is at
// most 1/subBuckets (1.6%) of its value wide. 3712 counters cover every
// int64 duration in 29 KiB.
const (
	subBits    = 6
	subBuckets = 1 << subBits // 64
	linearMax  = 2 * subBuckets
	nBuckets   = linearMax + (64-subBits-2)*subBuckets
)

// Histogram records durations with a bounded relative error (1/64) in fixed
// memory. Histograms from several goroutines or processes merge exactly.
// The zero value is ready to use. A Histogram is not safe for concurrent
// use.
type Histogram struct {
	counts   []uint64 // len nBuckets once anything is recorded
	n        uint64
	sum      int64 // ns
	min, max int64 // ns
}

func bucketOf(v int64) int {
	if v < linearMax {
		return int(v)
	}
	shift := bits.Len64(uint64(v)) - subBits - 1 // >= 1
	m := int(v >> shift)                         // in [subBuckets, 2*subBuckets)
	return linearMax + (shift-1)*subBuckets + m - subBuckets
}

// bucketBounds returns the smallest and largest value that fall in bucket i.
func bucketBounds(i int) (lo, hi int64) {
	if i < linearMax {
		return int64(i), int64(i)
	}
	shift := (i-linearMax)/subBuckets + 1
	m := int64((i-linearMax)%subBuckets + subBuckets)
	lo = m << shift
	return lo, lo + (int64(1)<<shift - 1)
}

// Record adds one duration; negative ones count as zero.
func (h *Histogram) Record(d time.Duration) {
	v := int64(d)
	if v < 0 {
		v = 0
	}
	if h.counts == nil {
		h.counts = make([]uint64, nBuckets)
	}
	h.counts[bucketOf(v)]++
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.n++
	h.sum += v
}

// Merge adds every sample of o to h.
func (h *Histogram) Merge(o *Histogram) {
	if o == nil || o.n == 0 {
		return
	}
	if h.counts == nil {
		h.counts = make([]uint64, nBuckets)
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.n += o.n
	h.sum += o.sum
}

// Count returns the number of samples.
func (h *Histogram) Count() uint64 { return h.n }

// Min, Max and Mean are exact.
func (h *Histogram) Min() time.Duration { return time.Duration(h.min) }

// Max returns the largest sample.
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean returns the average sample, 0 when there is none.
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / int64(h.n))
}

// Quantile returns the nearest-rank q-quantile (0 <= q <= 1): the smallest
// recorded value v such that at least q of the samples are <= v, reported
// as the upper bound of its bucket (clamped to the observed min and max),
// so it is never below the exact answer and at most 1/64 above it.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	q = min(max(q, 0), 1)
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = max(rank, 1)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			_, hi := bucketBounds(i)
			return time.Duration(min(max(hi, h.min), h.max))
		}
	}
	return time.Duration(h.max)
}

// Summary is the usual digest of a Histogram, in milliseconds.
type Summary struct {
	Count  uint64  `json:"count"`
	MinMs  float64 `json:"min_ms"`
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"p50_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P99Ms  float64 `json:"p99_ms"`
	P999Ms float64 `json:"p999_ms"`
	MaxMs  float64 `json:"max_ms"`
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// Summary digests h.
func (h *Histogram) Summary() Summary {
	return Summary{
		Count:  h.n,
		MinMs:  ms(h.Min()),
		MeanMs: ms(h.Mean()),
		P50Ms:  ms(h.Quantile(0.50)),
		P90Ms:  ms(h.Quantile(0.90)),
		P99Ms:  ms(h.Quantile(0.99)),
		P999Ms: ms(h.Quantile(0.999)),
		MaxMs:  ms(h.Max()),
	}
}

type histogramJSON struct {
	N       uint64      `json:"n"`
	SumNs   int64       `json:"sum_ns"`
	MinNs   int64       `json:"min_ns"`
	MaxNs   int64       `json:"max_ns"`
	Buckets [][2]uint64 `json:"buckets"` // [index, count] of the non-empty buckets
}

// MarshalJSON encodes the non-empty buckets, so a histogram can travel
// between processes and be merged on the other side.
func (h Histogram) MarshalJSON() ([]byte, error) {
	j := histogramJSON{N: h.n, SumNs: h.sum, MinNs: h.min, MaxNs: h.max, Buckets: [][2]uint64{}}
	for i, c := range h.counts {
		if c > 0 {
			j.Buckets = append(j.Buckets, [2]uint64{uint64(i), c})
		}
	}
	return json.Marshal(j)
}

// UnmarshalJSON decodes what MarshalJSON wrote and checks that it adds up.
func (h *Histogram) UnmarshalJSON(b []byte) error {
	var j histogramJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	out := Histogram{n: j.N, sum: j.SumNs, min: j.MinNs, max: j.MaxNs}
	var total uint64
	for _, bc := range j.Buckets {
		if bc[0] >= nBuckets {
			return fmt.Errorf("bench: histogram bucket %d out of range", bc[0])
		}
		if out.counts == nil {
			out.counts = make([]uint64, nBuckets)
		}
		out.counts[bc[0]] += bc[1]
		total += bc[1]
	}
	if total != j.N {
		return errors.New("bench: histogram buckets do not add up to n")
	}
	*h = out
	return nil
}
