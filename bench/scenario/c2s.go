package scenario

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/sdk"
	"github.com/twmb/franz-go/pkg/kgo"
)

// C2SSynopsis describes the c2s scenario (the command's help).
const C2SSynopsis = `Client messages into the bus at a fixed offered rate: --clients SDK
clients send GPS-sized JSON reports with SendC2S, which the server produces
to the Kafka topic of (appcode, msgtype) and acknowledges once the broker
stored it (acks=all). A server imbench starts gets the route to --topic and
its embedded Kafka-protocol broker on a free loopback port, or
--kafka-brokers (loopback only). The load is open loop (report g is due at
start + g/rate; each client keeps --inflight sends outstanding at most);
latency runs from the scheduled send time to the acknowledgement. A report
is about 120 bytes of JSON; --size pads it to at least that many. With
--verify (the default) imbench then reads the topic from the start with a
Kafka consumer and checks that every acknowledged report is there. The run
fails (exit 1) when a send fails or an acknowledged report is missing.`

type c2sSetup struct {
	Clients    int      `json:"clients"`
	Inflight   int      `json:"inflight_per_client"`
	MsgType    uint32   `json:"msgtype"`
	Topic      string   `json:"topic"`
	Brokers    []string `json:"kafka_brokers,omitempty"` // empty: imd's embedded broker
	Partitions int      `json:"embedded_partitions,omitempty"`
	Size       int      `json:"content_bytes"`
	UIDs       string   `json:"uids"`
}

// C2S is the c2s scenario: client reports into the Kafka bus at an offered
// rate, then read back from the topic.
type C2S struct {
	Load    LoadOptions
	Clients int    // clients sending reports
	MsgType uint32 // msgtype of the reports (routed to Topic)
	Topic   string // Kafka topic of the route
	// KafkaBrokers (loopback only): a started imd produces there instead of
	// its embedded broker; with an attached server, where Verify reads.
	KafkaBrokers []string
	Partitions   int  // partitions per topic of a started imd's embedded broker (0: imd's default)
	Verify       bool // read the topic afterwards and check every acknowledged report is in it
}

// NewC2S returns the scenario with the command line's defaults.
func NewC2S() *C2S {
	return &C2S{Load: DefaultLoadOptions(3000, 0, 32), Clients: 64, MsgType: 1, Topic: "imbench.gps", Verify: true}
}

// Validate checks the options (and fills Load.Rates from Load.Rate).
func (c *C2S) Validate() error {
	errs := c.Load.validate(0)
	if c.Clients < 1 || c.Load.Inflight < 1 {
		errs = append(errs, errors.New("--clients and --inflight must be >= 1"))
	}
	if c.Topic == "" || c.Partitions < 0 {
		errs = append(errs, errors.New("--topic must not be empty, --partitions >= 0"))
	}
	for _, b := range c.KafkaBrokers {
		if err := CheckLoopback(b); err != nil {
			errs = append(errs, fmt.Errorf("--kafka-brokers: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Run runs the scenario on the server l gives. A report comes back with an
// error when the scenario ran but a send failed or an acknowledged report
// is not in the topic.
func (o *C2S) Run(ctx context.Context, l Launcher, env Env) (*LoadReport, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	f := &o.Load
	raw := make([]byte, 6)
	_, _ = rand.Read(raw)
	c := &c2s{f: f, n: o.Clients, msgtype: o.MsgType, topic: o.Topic, nonce: hex.EncodeToString(raw), runs: map[uint32]*runState{}}
	setup := c2sSetup{Clients: o.Clients, Inflight: f.Inflight, MsgType: o.MsgType, Topic: o.Topic, Brokers: o.KafkaBrokers,
		Partitions: o.Partitions, Size: len(c.content(1, 1)), UIDs: fmt.Sprintf("%d..%d", f.UIDBase, f.UIDBase+uint64(o.Clients)-1)}
	needs := ServerNeeds{Route: &Route{MsgType: o.MsgType, Topic: o.Topic}, KafkaBrokers: o.KafkaBrokers}
	if len(o.KafkaBrokers) == 0 {
		// A port of its own, so the broker never meets a Kafka on 9092 and
		// the verification knows where to read.
		needs.EmbeddedKafka, needs.KafkaPartitions = true, o.Partitions
	}
	sc := &loadScenario{
		name: "c2s", opUnit: "msgs", deliveryUnit: "acks", senders: o.Clients, inflight: f.Inflight, perOp: 1, setup: setup,
		needs:   needs,
		prepare: c.prepare,
		begin: func(rs *runState) {
			c.mu.Lock()
			c.runs[rs.id] = rs
			c.mu.Unlock()
		},
		op:    c.op,
		close: func() { closeClients(c.clients) },
	}
	log := env.log()
	if o.Verify {
		sc.finish = func(ctx context.Context, rep *LoadReport) (any, error) {
			bl := o.KafkaBrokers
			if len(bl) == 0 {
				bl = rep.Server.Kafka
			}
			if len(bl) == 0 {
				fmt.Fprintln(log, "imbench c2s: not verifying: give --kafka-brokers to read the topic of an attached server")
				return nil, nil
			}
			return c.verify(ctx, bl, rep, log)
		}
	}
	return runLoad(ctx, sc, f, l, env)
}

type c2s struct {
	f       *LoadOptions
	n       int
	msgtype uint32
	topic   string
	nonce   string // marks this invocation's reports in the topic

	clients []*sdk.Client
	mu      sync.Mutex
	runs    map[uint32]*runState
}

func (c *c2s) prepare(ctx context.Context, t *Target, stderr io.Writer) error {
	var err error
	c.clients, err = loginClients(ctx, t, uidRange(c.f.UIDBase, c.n), c.f.LoginConc,
		func(int) sdk.Options { return sdk.Options{NoReconnect: true} }, stderr, "clients")
	return err
}

// report is the JSON of one GPS report; Run and Seq let --verify find it.
type report struct {
	Run     string  `json:"run"`
	Seq     int64   `json:"seq"`
	Lat     float64 `json:"lat"`
	Lng     float64 `json:"lng"`
	Speed   float64 `json:"speed"`
	Heading int     `json:"heading"`
	TS      int64   `json:"ts"`
	Pad     string  `json:"pad,omitempty"`
}

func (c *c2s) content(run uint32, g int64) []byte {
	r := report{Run: c.nonce + "-" + strconv.FormatUint(uint64(run), 10), Seq: g,
		Lat: 31.2304 + float64(g%1000)/1e5, Lng: 121.4737, Speed: 42.5, Heading: int(g % 360), TS: time.Now().UnixMilli()}
	b, _ := json.Marshal(&r)
	if len(b) < c.f.Size {
		r.Pad = strings.Repeat("x", max(0, c.f.Size-len(b)-len(`,"pad":""`)))
		b, _ = json.Marshal(&r)
	}
	return b
}

func (c *c2s) op(ctx context.Context, rs *runState, s int, g int64, at int64) error {
	content := c.content(rs.id, g)
	sent := mono()
	if _, err := c.clients[s].SendC2S(ctx, c.msgtype, content); err != nil {
		return err
	}
	rs.expected.Add(1)
	rs.deliver(s, g, at, sent)
	return nil
}

// C2SVerify is what reading the topic back found (the report's extra).
type C2SVerify struct {
	Topic      string   `json:"topic"`
	Brokers    []string `json:"brokers"`
	Read       int64    `json:"records_read"` // every record of the topic
	Ours       int64    `json:"records_ours"` // this invocation's, warm-up included
	Acked      int64    `json:"acked"`        // acknowledged sends of the measured runs
	Found      int64    `json:"found"`        // ... found in the topic
	Missing    int64    `json:"missing"`
	Duplicates int64    `json:"duplicates"` // reports stored twice (a retried send)
	Seconds    float64  `json:"seconds"`
	OK         bool     `json:"ok"`
}

// verify reads the topic from its start until every acknowledged report of
// the measured runs was seen, or nothing new came for a few seconds.
func (c *c2s) verify(ctx context.Context, brokers []string, rep *LoadReport, stderr io.Writer) (*C2SVerify, error) {
	v := &C2SVerify{Topic: c.topic, Brokers: brokers}
	t0 := time.Now()
	c.mu.Lock()
	runs := c.runs
	c.mu.Unlock()
	found := map[uint32][]uint64{}
	for id, rs := range runs {
		found[id] = make([]uint64, len(rs.seen))
		if !rs.warmup {
			v.Acked += rs.ok.Load()
		}
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(c.topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(500*time.Millisecond))
	if err != nil {
		return v, fmt.Errorf("verify: kafka client: %w", err)
	}
	defer cl.Close()
	prefix := c.nonce + "-"
	idleSince := time.Now()
	stop := watch(stderr, time.Second, func() string {
		return fmt.Sprintf("  verify: read %d records of %s, found %d of %d acknowledged", atomic.LoadInt64(&v.Read), c.topic, atomic.LoadInt64(&v.Found), v.Acked)
	})
	defer stop()
	for atomic.LoadInt64(&v.Found) < v.Acked && time.Since(idleSince) < 5*time.Second && time.Since(t0) < 2*time.Minute {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		fetches := cl.PollFetches(pctx)
		cancel()
		if ctx.Err() != nil {
			return v, ctx.Err()
		}
		for _, fe := range fetches.Errors() {
			if !errors.Is(fe.Err, context.DeadlineExceeded) && !errors.Is(fe.Err, context.Canceled) {
				fmt.Fprintf(stderr, "imbench c2s: verify: fetch %s/%d: %v\n", fe.Topic, fe.Partition, fe.Err)
			}
		}
		fetches.EachRecord(func(r *kgo.Record) {
			idleSince = time.Now()
			atomic.AddInt64(&v.Read, 1)
			var rp report
			if json.Unmarshal(r.Value, &rp) != nil || !strings.HasPrefix(rp.Run, prefix) {
				return
			}
			v.Ours++
			id, err := strconv.ParseUint(rp.Run[len(prefix):], 10, 32)
			rs := runs[uint32(id)]
			if err != nil || rs == nil || rp.Seq < 0 || rp.Seq >= rs.slots {
				return
			}
			bits := found[uint32(id)]
			mask := uint64(1) << (rp.Seq % 64)
			if bits[rp.Seq/64]&mask != 0 {
				v.Duplicates++
				return
			}
			bits[rp.Seq/64] |= mask
			if !rs.warmup && rs.isDelivered(rp.Seq) {
				atomic.AddInt64(&v.Found, 1)
			}
		})
	}
	v.Missing = v.Acked - v.Found
	v.Seconds = time.Since(t0).Seconds()
	v.OK = v.Missing == 0
	rep.Notes = append(rep.Notes, fmt.Sprintf("verify: %d of %d acknowledged reports found in topic %s (%d records read, %d of this run, %d stored twice) in %.1fs",
		v.Found, v.Acked, c.topic, v.Read, v.Ours, v.Duplicates, v.Seconds))
	if !v.OK {
		return v, fmt.Errorf("verify: %d of %d acknowledged reports are not in topic %s", v.Missing, v.Acked, c.topic)
	}
	fmt.Fprintf(stderr, "imbench c2s: verified: all %d acknowledged reports are in %s (%d records read, %d duplicates) in %.1fs\n",
		v.Acked, c.topic, v.Read, v.Duplicates, v.Seconds)
	return v, nil
}
