package platform

import (
	"context"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// BenchmarkC2CEndToEnd: durable c2c messages through the SDK, the gateway,
// logic and the embedded store, to an online recipient. 32 senders send
// concurrently (each waits for "stored" before its next message); the
// latency is from the send call to the recipient's OnC2C. Reports
// msgs/s and the send->delivered p50/p99.
//
//	go test -run '^$' -bench C2CEndToEnd -benchtime 20000x ./internal/platform/
func BenchmarkC2CEndToEnd(b *testing.B) {
	const pairs = 32
	p := start(b, nil)
	var mu sync.Mutex
	var hist bench.Histogram
	var delivered atomic.Int64
	done := make(chan struct{})
	var target atomic.Int64
	onMsg := func(m *pb.C2CMessage) {
		sent := time.Unix(0, int64(binary.BigEndian.Uint64(m.Content)))
		mu.Lock()
		hist.Record(time.Since(sent))
		mu.Unlock()
		if delivered.Add(1) == target.Load() {
			close(done)
		}
	}
	senders := make([]*sdk.Client, pairs)
	for i := range pairs {
		senders[i] = login(b, p, 101, uint64(1+i), nil)
		login(b, p, 101, uint64(1001+i), func(o *sdk.Options) { o.OnC2C = onMsg })
	}
	target.Store(int64(b.N))
	var next atomic.Int64
	b.ResetTimer()
	began := time.Now()
	var wg sync.WaitGroup
	for i := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			content := make([]byte, 100)
			for next.Add(1) <= int64(b.N) {
				binary.BigEndian.PutUint64(content, uint64(time.Now().UnixNano()))
				if _, err := senders[i].SendC2C(context.Background(), &pb.User{Account: 1, Uid: uint64(1001 + i)}, 0, content); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatalf("%d of %d delivered", delivered.Load(), b.N)
	}
	el := time.Since(began)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
	b.ReportMetric(float64(hist.Quantile(0.50))/1e6, "p50-ms")
	b.ReportMetric(float64(hist.Quantile(0.99))/1e6, "p99-ms")
}
