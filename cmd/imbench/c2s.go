package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/sdk"
	"github.com/twmb/franz-go/pkg/kgo"
)

const c2sSynopsis = `Client messages into the bus at a fixed offered rate: --clients SDK
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

func runC2S(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f loadFlags
	var clients, partitions int
	var msgtype uint
	var topic, brokers string
	var verify bool
	fs := newFlagSet("c2s", c2sSynopsis, stdout, stderr)
	f.bind(fs, "msgs", 3000, 0)
	fs.IntVar(&clients, "clients", 64, "clients sending reports")
	fs.IntVar(&f.inflight, "inflight", 32, "sends outstanding per client connection (the gateway allows 64 requests in flight)")
	fs.UintVar(&msgtype, "msgtype", 1, "msgtype of the reports (routed to --topic)")
	fs.StringVar(&topic, "topic", "imbench.gps", "Kafka topic of the route")
	fs.StringVar(&brokers, "kafka-brokers", "", "comma-separated loopback Kafka brokers: a started imd produces there instead of its embedded broker; with --addr, where --verify reads")
	fs.IntVar(&partitions, "partitions", 0, "partitions per topic of a started imd's embedded broker (0: imd's default)")
	fs.BoolVar(&verify, "verify", true, "read the topic afterwards and check every acknowledged report is in it")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	errs := f.validate(0)
	if clients < 1 || f.inflight < 1 {
		errs = append(errs, errors.New("--clients and --inflight must be >= 1"))
	}
	if topic == "" || partitions < 0 {
		errs = append(errs, errors.New("--topic must not be empty, --partitions >= 0"))
	}
	var brokerList []string
	for _, b := range strings.Split(brokers, ",") {
		if b = strings.TrimSpace(b); b != "" {
			if err := checkLoopback(b); err != nil {
				errs = append(errs, fmt.Errorf("--kafka-brokers: %w", err))
			}
			brokerList = append(brokerList, b)
		}
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "imbench c2s: %v\n", err)
		return errUsage
	}
	raw := make([]byte, 6)
	_, _ = rand.Read(raw)
	c := &c2s{f: &f, n: clients, msgtype: uint32(msgtype), topic: topic, nonce: hex.EncodeToString(raw), runs: map[uint32]*runState{}}
	setup := c2sSetup{Clients: clients, Inflight: f.inflight, MsgType: uint32(msgtype), Topic: topic, Brokers: brokerList,
		Partitions: partitions, Size: len(c.content(1, 1)), UIDs: fmt.Sprintf("%d..%d", f.uidBase, f.uidBase+uint64(clients)-1)}
	sc := &loadScenario{
		name: "c2s", opUnit: "msgs", deliveryUnit: "acks", senders: clients, inflight: f.inflight, perOp: 1, setup: setup,
		tweak: func(cfg *config.Config) error {
			cfg.C2S.Routes = []logic.Route{{AppCode: benchAppCode, MsgType: uint32(msgtype), Topic: topic}}
			if len(brokerList) > 0 {
				cfg.Bus.Brokers = brokerList
				cfg.Bus.AutoCreateTopics = true
				return nil
			}
			// A port of its own, so the broker never meets a Kafka on
			// 9092 and --verify knows where to read.
			addr, err := freeLoopbackAddr()
			if err != nil {
				return err
			}
			cfg.Bus.Embedded.Addr = addr
			cfg.Bus.Embedded.Partitions = partitions
			return nil
		},
		prepare: c.prepare,
		begin: func(rs *runState) {
			c.mu.Lock()
			c.runs[rs.id] = rs
			c.mu.Unlock()
		},
		op:    c.op,
		close: func() { closeClients(c.clients) },
	}
	if verify {
		sc.finish = func(ctx context.Context, rep *loadReport) (any, error) {
			bl := brokerList
			if len(bl) == 0 {
				bl = rep.Server.Kafka
			}
			if len(bl) == 0 {
				fmt.Fprintln(stderr, "imbench c2s: not verifying: give --kafka-brokers to read the topic of an attached server")
				return nil, nil
			}
			return c.verify(ctx, bl, rep, stderr)
		}
	}
	return runLoad(ctx, sc, &f, append([]string{"imbench", "c2s"}, args...), stdout, stderr)
}

type c2s struct {
	f       *loadFlags
	n       int
	msgtype uint32
	topic   string
	nonce   string // marks this invocation's reports in the topic

	clients []*sdk.Client
	mu      sync.Mutex
	runs    map[uint32]*runState
}

func (c *c2s) prepare(ctx context.Context, t *target, stderr io.Writer) error {
	var err error
	c.clients, err = loginClients(ctx, t, uidRange(c.f.uidBase, c.n), c.f.loginConc,
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
	if len(b) < c.f.size {
		r.Pad = strings.Repeat("x", max(0, c.f.size-len(b)-len(`,"pad":""`)))
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

// c2sVerify is what reading the topic back found.
type c2sVerify struct {
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
func (c *c2s) verify(ctx context.Context, brokers []string, rep *loadReport, stderr io.Writer) (*c2sVerify, error) {
	v := &c2sVerify{Topic: c.topic, Brokers: brokers}
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
