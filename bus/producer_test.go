package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// TestProduceConsume produces records for several keys concurrently (each
// key's records in sequence, as logic does for one uid) and reads them
// back with a separate franz-go consumer: every record exactly once, each
// key in one partition and in order, headers and values intact, and the
// acks pointing at the records.
func TestProduceConsume(t *testing.T) {
	for _, tg := range targets(t) {
		t.Run(tg.name, func(t *testing.T) {
			const keys, perKey = 8, 150
			topic := newTopic(t, tg, 4, nil)
			var produceReqs atomic.Int64
			if tg.broker != nil {
				tg.broker.c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
					produceReqs.Add(1)
					return nil, nil, false
				})
			}
			p := newProducer(t, tg, ProducerConfig{})
			acks := make([][]Ack, keys)
			var wg sync.WaitGroup
			errs := make(chan error, keys)
			for k := range keys {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
					defer cancel()
					for i := range perKey {
						ack, err := p.Produce(ctx, &Record{
							Topic: topic,
							Key:   fmt.Appendf(nil, "uid-%d", k),
							Value: fmt.Appendf(nil, "uid-%d/%06d/%s", k, i, strings.Repeat("x", k*10)),
							Headers: []Header{
								{Key: "seq", Value: fmt.Appendf(nil, "%d", i)},
								{Key: "logid", Value: fmt.Appendf(nil, "%d-%d", k, i)},
							},
						})
						if err != nil {
							errs <- fmt.Errorf("key %d record %d: %w", k, i, err)
							return
						}
						acks[k] = append(acks[k], ack)
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}

			recs := consumeAll(t, tg, topic)
			if len(recs) != keys*perKey {
				t.Fatalf("consumed %d records, produced %d", len(recs), keys*perKey)
			}
			byKey := map[string][]*kgo.Record{}
			for _, r := range recs {
				byKey[string(r.Key)] = append(byKey[string(r.Key)], r)
			}
			for k := range keys {
				key := fmt.Sprintf("uid-%d", k)
				rs := byKey[key]
				if len(rs) != perKey {
					t.Fatalf("%s: %d records, want %d", key, len(rs), perKey)
				}
				for i, r := range rs {
					want := fmt.Sprintf("uid-%d/%06d/%s", k, i, strings.Repeat("x", k*10))
					if string(r.Value) != want {
						t.Fatalf("%s record %d: value %q, want %q (out of order?)", key, i, r.Value, want)
					}
					if r.Partition != rs[0].Partition {
						t.Fatalf("%s is in partitions %d and %d", key, rs[0].Partition, r.Partition)
					}
					if header(r, "seq") != fmt.Sprint(i) || header(r, "logid") != fmt.Sprintf("%d-%d", k, i) || len(r.Headers) != 2 {
						t.Fatalf("%s record %d: headers %v", key, i, r.Headers)
					}
					if a := acks[k][i]; a.Partition != r.Partition || a.Offset != r.Offset {
						t.Fatalf("%s record %d: ack %+v, stored at %d/%d", key, i, a, r.Partition, r.Offset)
					}
				}
			}
			if tg.broker != nil {
				n := produceReqs.Load()
				t.Logf("%d records in %d produce requests", keys*perKey, n)
				if n > keys*perKey/2 {
					t.Errorf("%d produce requests for %d records from %d concurrent producers: not batching", n, keys*perKey, keys)
				}
			}
		})
	}
}

// TestTooLarge: a record over BatchMaxBytes fails in the client, one over
// the topic's max.message.bytes fails in the broker; both are ErrTooLarge
// and the producer carries on.
func TestTooLarge(t *testing.T) {
	for _, tg := range targets(t) {
		t.Run(tg.name, func(t *testing.T) {
			limit := "65536"
			topic := newTopic(t, tg, 1, map[string]*string{"max.message.bytes": &limit})
			p := newProducer(t, tg, ProducerConfig{})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for _, size := range []int{2 << 20, 100 << 10} {
				_, err := p.Produce(ctx, &Record{Topic: topic, Key: []byte("k"), Value: make([]byte, size)})
				if !errors.Is(err, ErrTooLarge) {
					t.Fatalf("%d-byte record: err %v, want ErrTooLarge", size, err)
				}
				t.Logf("%d bytes: %v", size, err)
				if _, err := p.Produce(ctx, &Record{Topic: topic, Key: []byte("k"), Value: []byte("small")}); err != nil {
					t.Fatalf("small record after a %d-byte one: %v", size, err)
				}
			}
		})
	}
}

// TestUnknownTopic: without AutoCreateTopics a missing topic is a clear,
// final error, even where the broker would create topics.
func TestUnknownTopic(t *testing.T) {
	for _, tg := range targets(t) {
		t.Run(tg.name, func(t *testing.T) {
			p := newProducer(t, tg, ProducerConfig{})
			topic := fmt.Sprintf("imd-bus-missing-%d", time.Now().UnixNano())
			start := time.Now()
			_, err := p.Produce(context.Background(), &Record{Topic: topic, Value: []byte("v")})
			if !errors.Is(err, ErrUnknownTopic) || errors.Is(err, ErrUnavailable) {
				t.Fatalf("err %v, want ErrUnknownTopic", err)
			}
			t.Logf("after %v: %v", time.Since(start).Round(time.Millisecond), err)
			if d := time.Since(start); d > 15*time.Second {
				t.Fatalf("took %v", d)
			}
		})
	}
}

// TestAutoCreate: with AutoCreateTopics the embedded broker creates the
// topic with its configured partition count.
func TestAutoCreate(t *testing.T) {
	b := startBroker(t, BrokerConfig{Addr: "127.0.0.1:0", DataDir: t.TempDir(), Partitions: 3})
	tg := target{name: "embedded", brokers: b.Addrs()}
	p := newProducer(t, tg, ProducerConfig{AutoCreateTopics: true})
	start := time.Now()
	if _, err := p.Produce(context.Background(), &Record{Topic: "c2s.auto", Key: []byte("1"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	t.Logf("first produce to a new topic took %v", time.Since(start).Round(time.Millisecond))
	if n := len(b.c.PartitionInfos("c2s.auto")); n != 3 {
		t.Fatalf("%d partitions, want 3", n)
	}
	if info := b.c.TopicInfo("c2s.auto"); info == nil || info.Configs["retention.ms"] == nil || *info.Configs["retention.ms"] != "86400000" {
		t.Fatalf("topic info %+v, want retention.ms 24h", info)
	}
	// Invalid names are not created.
	_, err := p.Produce(context.Background(), &Record{Topic: "bad/name", Value: []byte("v")})
	if !errors.Is(err, ErrUnknownTopic) {
		t.Fatalf("invalid topic: %v, want ErrUnknownTopic", err)
	}
}

// TestClose: Close flushes what is buffered; Produce after Close is
// ErrClosed; Close is idempotent.
func TestClose(t *testing.T) {
	tg := embeddedTarget(t)
	topic := newTopic(t, tg, 2, nil)
	p := newProducer(t, tg, ProducerConfig{Linger: 50 * time.Millisecond})
	const n = 200
	var wg sync.WaitGroup
	var acked, closed atomic.Int64
	started := make(chan struct{}, n)
	for i := range n {
		wg.Go(func() {
			started <- struct{}{}
			_, err := p.Produce(context.Background(), &Record{Topic: topic, Key: fmt.Appendf(nil, "%d", i%7), Value: fmt.Appendf(nil, "%d", i)})
			switch {
			case err == nil:
				acked.Add(1)
			case errors.Is(err, ErrClosed):
				closed.Add(1)
			default:
				t.Errorf("record %d: %v", i, err)
			}
		})
	}
	for range n / 2 {
		<-started
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	t.Logf("%d acknowledged, %d ErrClosed", acked.Load(), closed.Load())
	if got := len(consumeAll(t, tg, topic)); int64(got) != acked.Load() {
		t.Fatalf("topic has %d records, %d acknowledged", got, acked.Load())
	}
	if _, err := p.Produce(ctx, &Record{Topic: topic, Value: []byte("late")}); !errors.Is(err, ErrClosed) {
		t.Fatalf("produce after Close: %v, want ErrClosed", err)
	}
	if err := p.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// deadAddr returns a local address that refuses connections.
func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestUnavailable: with no broker, Produce fails with ErrUnavailable within
// DeliveryTimeout, or the caller's deadline if that is sooner, and at once
// when the buffer is full.
func TestUnavailable(t *testing.T) {
	tg := target{name: "dead", brokers: []string{deadAddr(t)}}
	reg := prometheus.NewRegistry()
	p := newProducer(t, tg, ProducerConfig{DeliveryTimeout: time.Second, MaxBufferedRecords: 1, Registry: reg})
	rec := &Record{Topic: "t", Key: []byte("k"), Value: []byte("v")}

	first := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := p.Produce(context.Background(), rec)
		first <- err
	}()
	// The buffer holds one record: once it is in, a second fails at once.
	for p.cl.BufferedProduceRecords() == 0 && time.Since(start) < 500*time.Millisecond {
		time.Sleep(time.Millisecond)
	}
	t0 := time.Now()
	_, err := p.Produce(context.Background(), rec)
	if !errors.Is(err, kgo.ErrMaxBuffered) || !errors.Is(err, ErrUnavailable) || time.Since(t0) > 100*time.Millisecond {
		t.Fatalf("full buffer: %v after %v, want ErrUnavailable (ErrMaxBuffered) at once", err, time.Since(t0))
	}
	err = <-first
	d := time.Since(start)
	t.Logf("no deadline: %v after %v", err, d.Round(time.Millisecond))
	if !errors.Is(err, ErrUnavailable) || d > 5*time.Second {
		t.Fatalf("no deadline: %v after %v, want ErrUnavailable within ~1s", err, d)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start = time.Now()
	_, err = p.Produce(ctx, rec)
	d = time.Since(start)
	t.Logf("200ms deadline: %v after %v", err, d.Round(time.Millisecond))
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) || d > 2*time.Second {
		t.Fatalf("200ms deadline: %v after %v", err, d)
	}
	if err := p.Ping(ctx); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Ping: %v", err)
	}
	if n := metricValue(t, p.m.errors.WithLabelValues(kindUnavailable)); n < 3 {
		t.Fatalf("unavailable errors counted: %v", n)
	}

	// Close with records pending and no deadline still returns.
	pending := make(chan error, 1)
	go func() {
		_, err := p.Produce(context.Background(), rec)
		pending <- err
	}()
	for p.cl.BufferedProduceRecords() == 0 {
		time.Sleep(time.Millisecond)
	}
	start = time.Now()
	err = p.Close(context.Background())
	t.Logf("Close with a record pending: %v after %v; the record: %v", err, time.Since(start).Round(time.Millisecond), <-pending)
	if d := time.Since(start); d > p.maxWait+time.Second {
		t.Fatalf("Close took %v", d)
	}
}

func TestMetrics(t *testing.T) {
	tg := embeddedTarget(t)
	topic := newTopic(t, tg, 1, nil)
	reg := prometheus.NewRegistry()
	p := newProducer(t, tg, ProducerConfig{Registry: reg})
	for i := range 3 {
		if _, err := p.Produce(context.Background(), &Record{Topic: topic, Value: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Produce(context.Background(), &Record{Topic: topic, Value: make([]byte, 2<<20)}); !errors.Is(err, ErrTooLarge) {
		t.Fatal(err)
	}
	if n := metricValue(t, p.m.produced); n != 3 {
		t.Fatalf("produced_total %v", n)
	}
	if n := metricValue(t, p.m.errors.WithLabelValues(kindTooLarge)); n != 1 {
		t.Fatalf("too_large %v", n)
	}
	var m dto.Metric
	if err := p.m.latency.Write(&m); err != nil || m.GetHistogram().GetSampleCount() != 3 {
		t.Fatalf("histogram: %v %v", m.GetHistogram(), err)
	}
	// A second producer on the same registry is refused, not a panic.
	if _, err := NewKafkaProducer(ProducerConfig{Brokers: tg.brokers, Registry: reg}); err == nil {
		t.Fatal("duplicate registration accepted")
	}
}

func TestProducerConfig(t *testing.T) {
	for _, cfg := range []ProducerConfig{
		{},
		{Brokers: []string{"x:1"}, Compression: "brotli"},
		{Brokers: []string{"x:1"}, BatchMaxBytes: 100},
		{Brokers: []string{"x:1"}, DeliveryTimeout: time.Millisecond, Linger: time.Second},
	} {
		if p, err := NewKafkaProducer(cfg); err == nil {
			p.Close(context.Background())
			t.Errorf("%+v accepted", cfg)
		}
	}
	p, err := NewKafkaProducer(ProducerConfig{Brokers: []string{"x:1"}, Compression: "zstd", Linger: -1})
	if err != nil {
		t.Fatal(err)
	}
	if p.cfg.Linger != 0 || p.cfg.DeliveryTimeout != 10*time.Second || p.cfg.MaxBufferedRecords != 50000 {
		t.Fatalf("defaults: %+v", p.cfg)
	}
	p.Close(context.Background())
	if _, err := p.Produce(context.Background(), &Record{}); err == nil {
		t.Fatal("record without topic accepted")
	}
}

// TestRecordCopied: Produce does not keep the caller's buffers.
func TestRecordCopied(t *testing.T) {
	r := &Record{Topic: "t", Key: []byte("key"), Value: []byte("value"), Headers: []Header{{Key: "h", Value: []byte("hv")}, {Key: "n"}}}
	kr := toKgoRecord(r)
	copy(r.Key, "XXX")
	copy(r.Value, "XXXXX")
	copy(r.Headers[0].Value, "XX")
	if string(kr.Key) != "key" || string(kr.Value) != "value" || string(kr.Headers[0].Value) != "hv" || kr.Headers[1].Value != nil {
		t.Fatalf("%q %q %v", kr.Key, kr.Value, kr.Headers)
	}
	kr.Key = append(kr.Key, '!') // capacity is clipped: must not overwrite Value
	if !bytes.Equal(kr.Value, []byte("value")) {
		t.Fatal("key and value overlap")
	}
}

func metricValue(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestMetadataObserverRenewal: the broker renews its metadata observer
// every 1024 requests (kfake's per-connection memory); it must still see
// every request exactly once, and still create topics.
func TestMetadataObserverRenewal(t *testing.T) {
	b := startBroker(t, BrokerConfig{Addr: "127.0.0.1:0"})
	cl := newClient(t, target{brokers: b.Addrs()})
	const n = 2100
	for i := range n {
		req := kmsg.NewPtrMetadataRequest()
		req.AllowAutoTopicCreation = true
		rt := kmsg.NewMetadataRequestTopic()
		rt.Topic = kmsg.StringPtr(fmt.Sprintf("renew-%d", i%3))
		req.Topics = append(req.Topics, rt)
		resp, err := req.RequestWith(context.Background(), cl)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Topics) != 1 || resp.Topics[0].ErrorCode != 0 || len(resp.Topics[0].Partitions) != 1 {
			t.Fatalf("request %d: %+v", i, resp.Topics)
		}
	}
	// The client may add a metadata request of its own; a duplicated
	// observer would count most requests twice.
	if got := b.metaCalls.Load(); got < n || got > n+50 {
		t.Fatalf("observer ran %d times for %d metadata requests", got, n)
	}
}

// TestRetention: the broker drops expired records, also after a restart
// (where kfake's own retention pass would not run).
func TestRetention(t *testing.T) {
	dir := t.TempDir()
	cfg := BrokerConfig{Addr: "127.0.0.1:0", DataDir: dir, Retention: 500 * time.Millisecond, Topics: []string{"r"}}
	b := startBroker(t, cfg)
	b.Close()
	b = startBroker(t, cfg)
	tg := target{name: "embedded", brokers: b.Addrs()}
	p := newProducer(t, tg, ProducerConfig{})
	for i := range 10 {
		if _, err := p.Produce(context.Background(), &Record{Topic: "r", Value: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		pi := b.c.PartitionInfo("r", 0)
		if pi.HighWatermark == 10 && pi.LogStartOffset == 10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("records not dropped: %+v", pi)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
