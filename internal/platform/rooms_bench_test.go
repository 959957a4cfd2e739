package platform

import (
	"context"
	"encoding/binary"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// BenchmarkTwoDCC2C: durable c2c between two DCs linked through a proxy
// that holds each segment IMD_WAN_DELAY (default 20ms) each way, against
// c2c within one DC, on the same platforms at the same time. Eight
// senders in DC1 send to a recipient in DC1 and to one in DC2, in turn,
// each waiting for "stored"; the latency is from the send call to the
// recipient's OnC2C. Reports the p50/p99 of both and the bytes that
// crossed the WAN per cross-DC message (the notify, the ack relayed to
// the storing DC when the recipient's store lacks the message, the
// receipt, and the session changes).
//
//	go test -run '^$' -bench TwoDCC2C -benchtime 2000x ./internal/platform/
func BenchmarkTwoDCC2C(b *testing.B) {
	delay := 20 * time.Millisecond
	if v := os.Getenv("IMD_WAN_DELAY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatal(err)
		}
		delay = d
	}
	w := startTwoDCsWAN(b, delay)
	const pairs = 8
	var mu sync.Mutex
	var same, cross bench.Histogram
	var delivered atomic.Int64
	on := func(h *bench.Histogram) func(*pb.C2CMessage) {
		return func(m *pb.C2CMessage) {
			sent := time.Unix(0, int64(binary.BigEndian.Uint64(m.Content)))
			mu.Lock()
			h.Record(time.Since(sent))
			mu.Unlock()
			delivered.Add(1)
		}
	}
	senders := make([]*sdk.Client, pairs)
	for i := range pairs {
		senders[i] = login(b, w.dc1, 101, uint64(100+i), nil)
		login(b, w.dc1, 101, uint64(1100+i), func(o *sdk.Options) { o.OnC2C = on(&same) })
		login(b, w.dc2, 101, uint64(2100+i), func(o *sdk.Options) { o.OnC2C = on(&cross) })
	}
	eventually(b, 10*time.Second, "DC1 sees every DC2 recipient", func() bool {
		for i := range pairs {
			ss, err := w.dc1.Router.Lookup(context.Background(), routerUser(1, uint64(2100+i)))
			if err != nil || len(ss) != 1 {
				return false
			}
		}
		return true
	})
	time.Sleep(200 * time.Millisecond) // the logins' own traffic settles
	wan0 := w.to1.Bytes.Load() + w.to2.Bytes.Load()
	var next atomic.Int64
	b.ResetTimer()
	var wg sync.WaitGroup
	for i := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			content := make([]byte, 100)
			for k := next.Add(1); k <= int64(b.N); k = next.Add(1) {
				to := uint64(1100 + i)
				if k%2 == 0 {
					to = uint64(2100 + i)
				}
				binary.BigEndian.PutUint64(content, uint64(time.Now().UnixNano()))
				if _, err := senders[i].SendC2C(context.Background(), &pb.User{Account: 1, Uid: to}, 0, content); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for delivered.Load() < int64(b.N) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	b.StopTimer()
	time.Sleep(500 * time.Millisecond) // acks and receipts cross too
	if delivered.Load() != int64(b.N) {
		b.Fatalf("%d of %d delivered", delivered.Load(), b.N)
	}
	wan := w.to1.Bytes.Load() + w.to2.Bytes.Load() - wan0
	mu.Lock()
	defer mu.Unlock()
	b.ReportMetric(float64(same.Quantile(0.5).Microseconds())/1000, "same-p50-ms")
	b.ReportMetric(float64(same.Quantile(0.99).Microseconds())/1000, "same-p99-ms")
	b.ReportMetric(float64(cross.Quantile(0.5).Microseconds())/1000, "cross-p50-ms")
	b.ReportMetric(float64(cross.Quantile(0.99).Microseconds())/1000, "cross-p99-ms")
	b.ReportMetric(float64(wan)/float64(cross.Count()), "wan-B/cross-msg")
}
