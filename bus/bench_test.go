package bus

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkProduce measures Produce from many concurrent callers (as logic
// calls it: one record per call, waiting for the ack) with 200-byte values
// and uid keys: records/s and the p50 and p99 latency of one call, by
// partition count of the topic and number of callers. Against the embedded
// broker with fsync (the default) and without, and against the real Kafka
// when IMD_TEST_KAFKA is set (which, like Kafka by default, does not fsync
// each batch).
//
//	go test -run '^$' -bench Produce -benchtime 20000x -count 3 ./bus/
func BenchmarkProduce(b *testing.B) {
	type broker struct {
		name string
		tg   func(b *testing.B) target
	}
	embedded := func(noSync bool) func(b *testing.B) target {
		return func(b *testing.B) target {
			br, err := StartBroker(BrokerConfig{Addr: "127.0.0.1:0", DataDir: b.TempDir(), NoSync: noSync})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(br.Close)
			return target{name: "embedded", brokers: br.Addrs()}
		}
	}
	brokers := []broker{{"embedded", embedded(false)}, {"embedded-nosync", embedded(true)}}
	if tg, ok := realKafka(b); ok {
		brokers = append(brokers, broker{"kafka", func(*testing.B) target { return tg }})
	}
	for _, br := range brokers {
		b.Run(br.name, func(b *testing.B) {
			for _, parts := range []int32{1, 4} {
				for _, callers := range []int{64, 512} {
					b.Run(fmt.Sprintf("p%d/c%d", parts, callers), func(b *testing.B) {
						tg := br.tg(b)
						benchProduce(b, tg, newTopic(b, tg, parts, nil), callers)
					})
				}
			}
		})
	}
}

func benchProduce(b *testing.B, tg target, topic string, callers int) {
	p := newProducer(b, tg, ProducerConfig{})
	value := make([]byte, 200)
	ctx := context.Background()
	if _, err := p.Produce(ctx, &Record{Topic: topic, Value: value}); err != nil { // metadata, producer id
		b.Fatal(err)
	}
	var (
		mu   sync.Mutex
		lats []time.Duration
		uid  atomic.Int64
	)
	b.SetParallelism(max(1, callers/runtime.GOMAXPROCS(0)))
	b.SetBytes(int64(len(value)))
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		local := make([]time.Duration, 0, 1024)
		for pb.Next() {
			key := fmt.Appendf(nil, "%d", uid.Add(1)%10000)
			t0 := time.Now()
			if _, err := p.Produce(ctx, &Record{Topic: topic, Key: key, Value: value}); err != nil {
				b.Error(err)
				return
			}
			local = append(local, time.Since(t0))
		}
		mu.Lock()
		lats = append(lats, local...)
		mu.Unlock()
	})
	elapsed := time.Since(start)
	b.StopTimer()
	if len(lats) == 0 {
		return
	}
	slices.Sort(lats)
	b.ReportMetric(float64(len(lats))/elapsed.Seconds(), "records/s")
	b.ReportMetric(float64(lats[len(lats)/2].Microseconds())/1000, "p50_ms")
	b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds())/1000, "p99_ms")
}
