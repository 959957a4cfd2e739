package scenario

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// maxDistinctErrors bounds how many different error texts are kept.
const maxDistinctErrors = 20

var selfPID = os.Getpid()

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// watch prints line() to w every interval until the returned stop is
// called (stop waits for the printer to finish).
func watch(w io.Writer, every time.Duration, line func() string) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintln(w, line())
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// loadavg is the 1, 5 and 15 minute load average of the machine.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// sortedKeys returns the keys of m in order (for stable output).
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// MinMedMax returns the smallest, median and largest of v (zeros when v
// is empty).
func MinMedMax(v []float64) [3]float64 {
	if len(v) == 0 {
		return [3]float64{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return [3]float64{s[0], med, s[len(s)-1]}
}

// uidRange returns n consecutive uids from first.
func uidRange(first uint64, n int) []uint64 {
	u := make([]uint64, n)
	for i := range u {
		u[i] = first + uint64(i)
	}
	return u
}

// HostInfo describes the machine a report comes from.
type HostInfo struct {
	Hostname   string `json:"hostname"`
	NumCPU     int    `json:"num_cpu"`
	GoVersion  string `json:"go_version"`
	OpenFiles  uint64 `json:"open_files_limit"`
	PortRange  string `json:"ephemeral_port_range"`
	LoadBefore string `json:"loadavg_before"`
	LoadAfter  string `json:"loadavg_after"`
}
