package bus

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Short timeouts, so that the tests see failures while the broker is down.
const (
	testDeliveryTimeout = 1500 * time.Millisecond
	testRequestTimeout  = time.Second
	downFor             = 3 * time.Second
)

// attempt is one Produce call of a stream.
type attempt struct {
	topic      string
	key, seq   int
	start, end time.Time
	ack        Ack
	err        error
}

func (a attempt) value() string { return fmt.Sprintf("%s/%d/%08d", a.topic, a.key, a.seq) }

// stream keeps producing to topics from keys goroutines per topic, each
// key's records in sequence, and records every attempt.
type stream struct {
	p    *KafkaProducer
	stop chan struct{}
	wg   sync.WaitGroup

	mu       sync.Mutex
	attempts []attempt
}

func startStream(p *KafkaProducer, topics []string, keys int) *stream {
	s := &stream{p: p, stop: make(chan struct{})}
	for _, topic := range topics {
		for k := range keys {
			s.wg.Go(func() {
				for seq := 0; ; seq++ {
					select {
					case <-s.stop:
						return
					default:
					}
					a := attempt{topic: topic, key: k, seq: seq, start: time.Now()}
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					a.ack, a.err = p.Produce(ctx, &Record{
						Topic:   topic,
						Key:     fmt.Appendf(nil, "uid-%d", k),
						Value:   []byte(a.value()),
						Headers: []Header{{Key: "seq", Value: fmt.Appendf(nil, "%d", seq)}},
					})
					cancel()
					a.end = time.Now()
					s.mu.Lock()
					s.attempts = append(s.attempts, a)
					s.mu.Unlock()
					if a.err != nil {
						time.Sleep(50 * time.Millisecond) // some errors come at once
					}
				}
			})
		}
	}
	return s
}

func (s *stream) snapshot() []attempt {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]attempt(nil), s.attempts...)
}

// waitAcked waits until every topic and key has n records acknowledged
// after since.
func (s *stream) waitAcked(t *testing.T, topics []string, keys, n int, since time.Time, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		count := map[string]int{}
		for _, a := range s.snapshot() {
			if a.err == nil && a.start.After(since) {
				count[fmt.Sprintf("%s/%d", a.topic, a.key)]++
			}
		}
		short := ""
		for _, topic := range topics {
			for k := range keys {
				if id := fmt.Sprintf("%s/%d", topic, k); count[id] < n {
					short = fmt.Sprintf("%s has %d", id, count[id])
				}
			}
		}
		if short == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v, not %d records acknowledged for every key: %s", limit, n, short)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// probe makes n concurrent Produce calls with new keys and no deadline
// while the broker is down, and returns them once all have returned.
func probe(p *KafkaProducer, topic string, n int) []attempt {
	as := make([]attempt, n)
	var wg sync.WaitGroup
	for i := range as {
		wg.Go(func() {
			a := attempt{topic: topic, key: 100 + i, start: time.Now()}
			a.ack, a.err = p.Produce(context.Background(), &Record{
				Topic:   topic,
				Key:     fmt.Appendf(nil, "probe-%d", i),
				Value:   []byte(a.value()),
				Headers: []Header{{Key: "seq", Value: []byte("0")}},
			})
			a.end = time.Now()
			as[i] = a
		})
	}
	wg.Wait()
	return as
}

// whileDown probes the producer while the broker is down, for downFor.
func whileDown(p *KafkaProducer, topic string, from, to *time.Time, probes *[]attempt) func() {
	return func() {
		*from = time.Now()
		time.Sleep(100 * time.Millisecond)
		*probes = probe(p, topic, 8)
		time.Sleep(time.Until(from.Add(downFor)))
		*to = time.Now()
	}
}

func (s *stream) halt() []attempt {
	close(s.stop)
	s.wg.Wait()
	return s.snapshot()
}

// checkDown checks the attempts made while the broker was down: those
// that began and ended inside [from, to] failed with ErrUnavailable, and
// none took longer than bound. It returns how many there were.
func checkDown(t *testing.T, attempts []attempt, from, to time.Time, bound time.Duration) {
	t.Helper()
	inside := 0
	for _, a := range attempts {
		d := a.end.Sub(a.start)
		if d > bound {
			t.Errorf("%s took %v (bound %v): %v", a.value(), d, bound, a.err)
		}
		if a.start.Before(from) || a.end.After(to) {
			continue
		}
		inside++
		if a.err == nil {
			t.Errorf("%s acknowledged while the broker was down (%v)", a.value(), a.ack)
		} else if !errors.Is(a.err, ErrUnavailable) {
			t.Errorf("%s failed while the broker was down with %v, want ErrUnavailable", a.value(), a.err)
		}
	}
	t.Logf("%d attempts began and ended while the broker was down (%v), all ErrUnavailable", inside, to.Sub(from).Round(time.Millisecond))
	if inside == 0 {
		t.Errorf("no attempt fell inside the down window")
	}
}

// verifyStored checks that every acknowledged attempt is in its topic,
// where its ack says, and that each key's acknowledged records are in one
// partition in the order they were produced.
func verifyStored(t *testing.T, tg target, attempts []attempt, topics []string) {
	t.Helper()
	type pos struct {
		part int32
		off  int64
	}
	stored := map[string][]pos{}
	total := 0
	for _, topic := range topics {
		for _, r := range consumeAll(t, tg, topic) {
			stored[string(r.Value)] = append(stored[string(r.Value)], pos{r.Partition, r.Offset})
			seq, _ := strconv.Atoi(string(r.Value[len(r.Value)-8:]))
			if header(r, "seq") != strconv.Itoa(seq) {
				t.Errorf("%s: header seq %q", r.Value, header(r, "seq"))
			}
			total++
		}
	}
	acked, failed, failedStored, dups := 0, 0, 0, 0
	last := map[string]pos{}
	for _, a := range attempts { // in completion order; per key that is seq order
		ps := stored[a.value()]
		if len(ps) > 1 {
			dups++
		}
		if a.err != nil {
			failed++
			if len(ps) > 0 {
				failedStored++
			}
			continue
		}
		acked++
		if len(ps) == 0 {
			t.Errorf("%s acknowledged at %+v but not in the topic", a.value(), a.ack)
			continue
		}
		at := pos{a.ack.Partition, a.ack.Offset}
		if !slices.Contains(ps, at) {
			t.Errorf("%s acknowledged at %+v, stored at %+v", a.value(), a.ack, ps)
		}
		id := fmt.Sprintf("%s/%d", a.topic, a.key)
		if l, ok := last[id]; ok && (l.part != at.part || l.off >= at.off) {
			t.Errorf("%s: acknowledged at %+v after the previous acknowledged record of its key at %+v", a.value(), at, l)
		}
		last[id] = at
	}
	t.Logf("%d attempts: %d acknowledged (all stored, in order), %d failed (%d of them stored anyway), %d records stored, %d duplicated",
		len(attempts), acked, failed, failedStored, total, dups)
}

// commitOffsets commits the topics' current end offsets for group and
// returns what the broker reports as committed.
func commitOffsets(t *testing.T, tg target, group string, topics ...string) kadm.Offsets {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	adm := newAdmin(t, tg)
	ends, err := adm.ListEndOffsets(ctx, topics...)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := adm.CommitOffsets(ctx, group, ends.Offsets())
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		t.Fatalf("commit offsets: %v", err)
	}
	return fetchOffsets(t, tg, group)
}

func fetchOffsets(t *testing.T, tg target, group string) kadm.Offsets {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := newAdmin(t, tg).FetchOffsets(ctx, group)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		t.Fatalf("fetch offsets of %s: %v", group, err)
	}
	return resp.Offsets()
}

func sameOffsets(t *testing.T, got, want kadm.Offsets) {
	t.Helper()
	n := 0
	want.Each(func(o kadm.Offset) {
		n++
		g, ok := got.Lookup(o.Topic, o.Partition)
		if !ok || g.At != o.At {
			t.Errorf("committed offset of %s/%d: %+v after the restart, %d before", o.Topic, o.Partition, g, o.At)
		}
	})
	if n == 0 {
		t.Error("no committed offsets to compare")
	}
}

// TestRestart stops the broker while producers run, checks that Produce
// fails with ErrUnavailable (never nil) while it is down, restarts it on
// the same data, and checks that every acknowledged record and the
// committed group offsets are still there. The embedded broker always;
// the real Kafka only with IMD_TEST_KAFKA_FAULT=1, as it restarts a
// shared server.
func TestRestart(t *testing.T) {
	ran := false
	for _, tg := range targets(t) {
		if tg.restart == nil {
			t.Logf("%s: not restarted (set IMD_TEST_KAFKA_FAULT=1)", tg.name)
			continue
		}
		ran = true
		t.Run(tg.name, func(t *testing.T) {
			const keys = 4
			topic := newTopic(t, tg, 4, nil)
			topics := []string{topic}
			p := newProducer(t, tg, ProducerConfig{DeliveryTimeout: testDeliveryTimeout, RequestTimeout: testRequestTimeout})
			s := startStream(p, topics, keys)
			s.waitAcked(t, topics, keys, 20, time.Time{}, 30*time.Second)
			group := "imd-bus-restart-" + topic
			committed := commitOffsets(t, tg, group, topic)

			var from, to time.Time
			var probes []attempt
			tg.restart(t, whileDown(p, topic, &from, &to, &probes))
			restarted := time.Now()
			t.Logf("down for %v, restarted after %v", to.Sub(from).Round(time.Millisecond), restarted.Sub(from).Round(time.Millisecond))
			s.waitAcked(t, topics, keys, 20, restarted, 90*time.Second)
			attempts := append(s.halt(), probes...)
			checkDown(t, attempts, from, to, p.maxWait+time.Second)
			verifyStored(t, tg, attempts, topics)
			sameOffsets(t, fetchOffsets(t, tg, group), committed)
		})
	}
	if !ran {
		t.Skip("no broker to restart")
	}
}

// TestMain runs the embedded broker of TestCrash when the test binary is
// started as its child process, and the tests otherwise.
func TestMain(m *testing.M) {
	if dir := os.Getenv("IMD_BUS_CHILD_DIR"); dir != "" {
		brokerChild(dir)
		return
	}
	os.Exit(m.Run())
}

// brokerChild is the embedded broker in a child process for TestCrash.
func brokerChild(dir string) {
	b, err := StartBroker(BrokerConfig{Addr: os.Getenv("IMD_BUS_CHILD_ADDR"), DataDir: dir, Topics: []string{"c2s.pre"}})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	fmt.Println("ADDR", b.Addrs()[0])
	time.Sleep(time.Hour) // until the parent kills us
}

// startChild starts brokerChild and returns its address.
func startChild(t *testing.T, dir, addr string) (*exec.Cmd, string) {
	t.Helper()
	for try := 0; ; try++ {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "IMD_BUS_CHILD_DIR="+dir, "IMD_BUS_CHILD_ADDR="+addr)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		var lines []string
		for sc.Scan() {
			line := sc.Text()
			if a, ok := strings.CutPrefix(line, "ADDR "); ok {
				go func() {
					for sc.Scan() { // drain, so the child never blocks on stdout
					}
				}()
				t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
				return cmd, a
			}
			lines = append(lines, line)
		}
		cmd.Wait()
		if try == 20 {
			t.Fatalf("broker child did not start: %s\n%s", strings.Join(lines, "\n"), stderr.String())
		}
		time.Sleep(200 * time.Millisecond) // the port may still be held
	}
}

// TestCrash kills the embedded broker's process (SIGKILL, no Close) while
// producers run, to a topic listed in BrokerConfig.Topics and to one the
// producer has the broker create, and after a consumer group committed.
// After a restart on the same DataDir every acknowledged record, both
// topics and the committed offsets are there.
func TestCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	dir := t.TempDir()
	child, addr := startChild(t, dir, "127.0.0.1:0")
	tg := target{name: "embedded", brokers: []string{addr}}
	const keys = 3
	topics := []string{"c2s.pre", "c2s.auto"}
	p := newProducer(t, tg, ProducerConfig{DeliveryTimeout: testDeliveryTimeout, RequestTimeout: testRequestTimeout, AutoCreateTopics: true})
	s := startStream(p, topics, keys)
	s.waitAcked(t, topics, keys, 20, time.Time{}, 30*time.Second)

	// A consumer group reads some records and commits.
	group := "imd-bus-crash"
	cons := newClient(t, tg, kgo.ConsumerGroup(group), kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.DisableAutoCommit(), kgo.FetchMaxWait(200*time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for n := 0; n < 50; {
		fs := cons.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatal("consumer group got no records")
		}
		n += fs.NumRecords()
	}
	if err := cons.CommitUncommittedOffsets(ctx); err != nil {
		t.Fatal(err)
	}
	cons.Close()
	committed := fetchOffsets(t, tg, group)

	s.waitAcked(t, topics, keys, 40, time.Time{}, 30*time.Second)
	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	var from, to time.Time
	var probes []attempt
	whileDown(p, topics[0], &from, &to, &probes)()
	startChild(t, dir, addr)
	restarted := time.Now()
	s.waitAcked(t, topics, keys, 20, restarted, 60*time.Second)
	attempts := append(s.halt(), probes...)
	checkDown(t, attempts, from, to, p.maxWait+time.Second)
	verifyStored(t, tg, attempts, topics)
	sameOffsets(t, fetchOffsets(t, tg, group), committed)
}

// TestBrokerConfig: topic names are checked, and a DataDir has one broker.
func TestBrokerConfig(t *testing.T) {
	if _, err := StartBroker(BrokerConfig{Addr: "127.0.0.1:0", Topics: []string{"a/b"}}); err == nil {
		t.Fatal("invalid topic name accepted")
	}
	dir := t.TempDir()
	startBroker(t, BrokerConfig{Addr: "127.0.0.1:0", DataDir: dir})
	if b, err := StartBroker(BrokerConfig{Addr: "127.0.0.1:0", DataDir: dir}); err == nil {
		b.Close()
		t.Fatal("second broker on one DataDir started")
	}
}
