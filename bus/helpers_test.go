package bus

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// target is a broker the shared tests run against: the embedded one or a
// real Kafka at IMD_TEST_KAFKA.
type target struct {
	name    string
	brokers []string
	// broker is the embedded broker, nil for a real Kafka; a restart
	// replaces it.
	broker *Broker
	// restart stops the broker, calls whileDown, and starts it again on
	// the same address and data; nil where a test may not restart it.
	restart func(t *testing.T, whileDown func())
}

// targets returns the embedded broker (always) and the real Kafka when
// IMD_TEST_KAFKA answers. A set but unreachable IMD_TEST_KAFKA skips the
// real one, or fails the test under CI=true.
func targets(t *testing.T) []target {
	t.Helper()
	ts := []target{embeddedTarget(t)}
	if real, ok := realKafka(t); ok {
		ts = append(ts, real)
	}
	return ts
}

func embeddedTarget(t *testing.T) target {
	t.Helper()
	dir := t.TempDir()
	b := startBroker(t, BrokerConfig{Addr: "127.0.0.1:0", DataDir: dir})
	addr := b.Addrs()[0]
	tg := target{name: "embedded", brokers: []string{addr}, broker: b}
	tg.restart = func(t *testing.T, whileDown func()) {
		b.Close()
		whileDown()
		b = startBroker(t, BrokerConfig{Addr: addr, DataDir: dir})
	}
	return tg
}

func startBroker(t *testing.T, cfg BrokerConfig) *Broker {
	t.Helper()
	var b *Broker
	var err error
	// A port just closed by a broker in this process may take a moment.
	for range 50 {
		if b, err = StartBroker(cfg); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("StartBroker: %v", err)
	}
	t.Cleanup(b.Close)
	return b
}

// realKafka returns the IMD_TEST_KAFKA target if it answers.
func realKafka(t testing.TB) (target, bool) {
	t.Helper()
	addr := os.Getenv("IMD_TEST_KAFKA")
	if addr == "" {
		t.Log("IMD_TEST_KAFKA not set: real Kafka not tested")
		return target{}, false
	}
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("IMD_TEST_KAFKA=%s does not answer under CI=true: %v", addr, err)
		}
		t.Logf("IMD_TEST_KAFKA=%s does not answer, real Kafka not tested: %v", addr, err)
		return target{}, false
	}
	c.Close()
	tg := target{name: "kafka", brokers: []string{addr}}
	if os.Getenv("IMD_TEST_KAFKA_FAULT") == "1" {
		tg.restart = func(t *testing.T, whileDown func()) {
			services(t, "down", "kafka")
			whileDown()
			services(t, "up", "kafka")
		}
	}
	return tg, true
}

// services runs scripts/services.sh.
func services(t *testing.T, args ...string) {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "..", "scripts", "services.sh")
	start := time.Now()
	out, err := exec.Command("bash", append([]string{script}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("services.sh %v: %v\n%s", args, err, out)
	}
	t.Logf("services.sh %v took %v", args, time.Since(start).Round(100*time.Millisecond))
}

var topicSeq atomic.Int64

// newTopic creates a fresh topic with the given partitions (and configs)
// and deletes it when the test ends.
func newTopic(t testing.TB, tg target, partitions int32, configs map[string]*string) string {
	t.Helper()
	name := fmt.Sprintf("imd-bus-%s-%d-%d", tg.name, time.Now().UnixNano(), topicSeq.Add(1))
	adm := newAdmin(t, tg)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := adm.CreateTopic(ctx, partitions, 1, configs, name)
	if err == nil {
		err = resp.Err
	}
	if err != nil {
		t.Fatalf("create topic %s on %s: %v", name, tg.name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cl, err := kgo.NewClient(kgo.SeedBrokers(tg.brokers...))
		if err != nil {
			return
		}
		defer cl.Close()
		kadm.NewClient(cl).DeleteTopics(ctx, name) //nolint:errcheck // best effort; the broker may be gone
	})
	return name
}

// newClient returns a plain franz-go client, independent of the producer
// under test, closed when the test ends.
func newClient(t testing.TB, tg target, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(tg.brokers...)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func newAdmin(t testing.TB, tg target) *kadm.Client {
	return kadm.NewClient(newClient(t, tg))
}

func newProducer(t testing.TB, tg target, cfg ProducerConfig) *KafkaProducer {
	t.Helper()
	cfg.Brokers = tg.brokers
	p, err := NewKafkaProducer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		p.Close(ctx) //nolint:errcheck // the test may have closed it
	})
	return p
}

// consumeAll reads every record of topic from the start up to the end
// offsets at the time of the call, with a fresh franz-go consumer.
func consumeAll(t *testing.T, tg target, topic string) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ends, err := newAdmin(t, tg).ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatalf("list end offsets of %s: %v", topic, err)
	}
	want := map[int32]int64{}
	var total int64
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			want[o.Partition] = o.Offset
			total += o.Offset
		}
	})
	cl := newClient(t, tg, kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchMaxWait(200*time.Millisecond))
	var recs []*kgo.Record
	next := map[int32]int64{}
	done := func() bool {
		for p, end := range want {
			if next[p] < end {
				return false
			}
		}
		return true
	}
	for !done() {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("consume %s: got %d of %d records before the deadline", topic, len(recs), total)
		}
		fs.EachError(func(topic string, p int32, err error) { t.Logf("fetch %s/%d: %v", topic, p, err) })
		fs.EachRecord(func(r *kgo.Record) {
			recs = append(recs, r)
			next[r.Partition] = r.Offset + 1
		})
	}
	sort.SliceStable(recs, func(i, j int) bool {
		if recs[i].Partition != recs[j].Partition {
			return recs[i].Partition < recs[j].Partition
		}
		return recs[i].Offset < recs[j].Offset
	})
	return recs
}

func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}
