package bench

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func exactQuantile(sorted []int64, q float64) int64 {
	rank := int(math.Ceil(q * float64(len(sorted))))
	rank = max(rank, 1)
	return sorted[rank-1]
}

func TestBucketBoundsContainTheirValues(t *testing.T) {
	vals := []int64{0, 1, 63, 127, 128, 129, 255, 256, 1000, 999_999, 1 << 40, math.MaxInt64 - 1, math.MaxInt64}
	r := rand.New(rand.NewPCG(1, 2))
	for range 10000 {
		vals = append(vals, r.Int64N(1<<uint(r.IntN(62)+1)))
	}
	for _, v := range vals {
		i := bucketOf(v)
		if i < 0 || i >= nBuckets {
			t.Fatalf("bucketOf(%d) = %d, out of [0,%d)", v, i, nBuckets)
		}
		lo, hi := bucketBounds(i)
		if v < lo || v > hi {
			t.Fatalf("value %d in bucket %d with bounds [%d,%d]", v, i, lo, hi)
		}
		if v >= linearMax && float64(hi-lo+1)/float64(lo) > 1.0/subBuckets+1e-12 {
			t.Fatalf("bucket %d [%d,%d] wider than 1/%d of its value", i, lo, hi, subBuckets)
		}
	}
	// buckets tile the line: each starts right after the previous ends
	for i := 1; i < nBuckets; i++ {
		_, prevHi := bucketBounds(i - 1)
		lo, _ := bucketBounds(i)
		if lo != prevHi+1 {
			t.Fatalf("bucket %d starts at %d, previous ends at %d", i, lo, prevHi)
		}
	}
}

func TestQuantileMatchesExactWithinBucketError(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int{1, 2, 10, 999, 20000} {
		var h Histogram
		raw := make([]int64, n)
		for i := range raw {
			// log-normal-ish latencies from 10us to ~1s
			raw[i] = int64(math.Exp(r.Float64()*11.5) * 10_000)
			h.Record(time.Duration(raw[i]))
		}
		slices.Sort(raw)
		if h.Count() != uint64(n) {
			t.Fatalf("n=%d: Count = %d", n, h.Count())
		}
		if int64(h.Min()) != raw[0] || int64(h.Max()) != raw[n-1] {
			t.Fatalf("n=%d: min/max = %v/%v, want %v/%v", n, h.Min(), h.Max(), raw[0], raw[n-1])
		}
		for _, q := range []float64{0, 0.01, 0.5, 0.9, 0.99, 0.999, 1} {
			want := exactQuantile(raw, q)
			got := int64(h.Quantile(q))
			if got < want || float64(got-want) > float64(want)/subBuckets+1 {
				t.Errorf("n=%d q=%v: got %d, exact %d (allowed +%.1f%%)", n, q, got, want, 100.0/subBuckets)
			}
		}
	}
}

func TestQuantileSmallExactValues(t *testing.T) {
	var h Histogram
	for _, v := range []time.Duration{5, 1, 4, 2, 3} {
		h.Record(v)
	}
	for q, want := range map[float64]time.Duration{0: 1, 0.2: 1, 0.21: 2, 0.5: 3, 0.8: 4, 0.81: 5, 1: 5} {
		if got := h.Quantile(q); got != want {
			t.Errorf("Quantile(%v) = %v, want %v", q, got, want)
		}
	}
	if h.Mean() != 3 {
		t.Errorf("Mean = %v, want 3ns", h.Mean())
	}
	var empty Histogram
	if empty.Quantile(0.5) != 0 || empty.Mean() != 0 || empty.Summary().Count != 0 {
		t.Error("empty histogram should report zeros")
	}
	h.Record(-time.Second)
	if h.Min() != 0 {
		t.Errorf("negative sample should count as 0, min = %v", h.Min())
	}
}

func TestMergeAndJSONRoundTrip(t *testing.T) {
	var a, b, all Histogram
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 5000 {
		d := time.Duration(r.Int64N(int64(50 * time.Millisecond)))
		all.Record(d)
		if i%3 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
	}
	buf, err := json.Marshal(&b)
	if err != nil {
		t.Fatal(err)
	}
	var b2 Histogram
	if err := json.Unmarshal(buf, &b2); err != nil {
		t.Fatal(err)
	}
	var m Histogram
	m.Merge(&a)
	m.Merge(&b2)
	m.Merge(nil)
	m.Merge(&Histogram{})
	if m.Summary() != all.Summary() {
		t.Fatalf("merged summary %+v differs from direct %+v", m.Summary(), all.Summary())
	}
	if !slices.Equal(m.counts, all.counts) {
		t.Fatal("merged buckets differ")
	}

	for _, bad := range []string{
		`{"n":2,"buckets":[[1,1]]}`,
		`{"n":1,"buckets":[[99999,1]]}`,
		`[1,2]`,
	} {
		var h Histogram
		if err := json.Unmarshal([]byte(bad), &h); err == nil {
			t.Errorf("Unmarshal(%s) accepted a bad histogram", bad)
		}
	}
}

func TestSummaryInMilliseconds(t *testing.T) {
	var h Histogram
	for range 100 {
		h.Record(2 * time.Millisecond)
	}
	s := h.Summary()
	if s.Count != 100 || s.MinMs != 2 || s.MaxMs != 2 || s.P50Ms != 2 || s.P99Ms != 2 || s.MeanMs != 2 {
		t.Fatalf("summary %+v, want every figure 2ms", s)
	}
}
