package platform

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/twmb/franz-go/pkg/kgo"
)

// IMD_TEST_BUS=kafka runs the c2s tests on the real Kafka at
// IMD_TEST_KAFKA (scripts/services.sh up kafka) instead of the embedded
// broker, with topics of their own.
var testBus = os.Getenv("IMD_TEST_BUS")

// useTestBus routes c2s of appcode 101 msgtypes 1 and 2 to fresh topics
// and returns them.
func useTestBus(t *testing.T, cfg *config.Config) (gps, events string) {
	t.Helper()
	var b [4]byte
	_, _ = rand.Read(b[:])
	sfx := hex.EncodeToString(b[:])
	gps, events = "test.gps."+sfx, "test.events."+sfx
	cfg.C2S.Routes = []logic.Route{{AppCode: 101, MsgType: 1, Topic: gps}, {AppCode: 101, MsgType: 2, Topic: events}}
	if testBus == "kafka" {
		addr := os.Getenv("IMD_TEST_KAFKA")
		if addr == "" {
			t.Fatal("IMD_TEST_BUS=kafka needs IMD_TEST_KAFKA (eval \"$(scripts/services.sh env)\")")
		}
		cfg.Bus.Brokers = []string{addr}
		cfg.Bus.AutoCreateTopics = true
	}
	return gps, events
}

// consume reads n records of topic with a plain franz-go consumer (not the
// platform's code).
func consume(t *testing.T, brokers []string, topic string, n int) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out []*kgo.Record
	for len(out) < n {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("read %d of %d records of %s", len(out), n, topic)
		}
		fs.EachError(func(_ string, _ int32, err error) { t.Logf("fetch: %v", err) })
		out = append(out, fs.Records()...)
	}
	return out
}

func header(r *kgo.Record, k string) string {
	for _, h := range r.Headers {
		if h.Key == k {
			return string(h.Value)
		}
	}
	return ""
}

// TestC2SToKafka: drivers report GPS concurrently; an app-server consumer
// reads every acknowledged report, each user's in order, keyed by uid, with
// the headers that say who sent it.
func TestC2SToKafka(t *testing.T) {
	var gps string
	p := start(t, func(c *config.Config) { gps, _ = useTestBus(t, c) })
	const drivers, each = 4, 150
	type sent struct {
		msgid     uint64
		partition int32
		offset    int64
	}
	acked := make([][]sent, drivers)
	var wg sync.WaitGroup
	for d := range drivers {
		c := login(t, p, 101, uint64(1+d), nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r, err := c.SendC2S(ctxb, 1, fmt.Appendf(nil, "%d-%04d", 1+d, i))
				if err != nil {
					t.Errorf("driver %d report %d: %v", d, i, err)
					return
				}
				acked[d] = append(acked[d], sent{r.Msgid, r.Partition, r.Offset})
			}
		}()
	}
	wg.Wait()
	recs := consume(t, p.KafkaAddrs(), gps, drivers*each)
	if len(recs) != drivers*each {
		t.Fatalf("%d records in %s, want %d", len(recs), gps, drivers*each)
	}
	next := make([]int, drivers)
	for _, r := range recs {
		uid, err := strconv.Atoi(string(r.Key))
		if err != nil || uid < 1 || uid > drivers {
			t.Fatalf("record key %q is not a driver's uid", r.Key)
		}
		d := uid - 1
		want := fmt.Sprintf("%d-%04d", uid, next[d])
		if string(r.Value) != want {
			t.Fatalf("driver %d: record %q, want %q (order or loss)", uid, r.Value, want)
		}
		a := acked[d][next[d]]
		if header(r, logic.HeaderMsgID) != strconv.FormatUint(a.msgid, 10) || r.Partition != a.partition || r.Offset != a.offset {
			t.Fatalf("record %q at %d/%d msgid %s; the client was told %d/%d msgid %d", r.Value, r.Partition, r.Offset, header(r, logic.HeaderMsgID), a.partition, a.offset, a.msgid)
		}
		if header(r, logic.HeaderAppCode) != "101" || header(r, logic.HeaderUID) != string(r.Key) || header(r, logic.HeaderMsgType) != "1" ||
			header(r, logic.HeaderAccount) != "1" || header(r, logic.HeaderLogID) == "" || header(r, logic.HeaderClientMsgID) == "" {
			t.Fatalf("record headers %+v", r.Headers)
		}
		next[d]++
	}
}

// TestC2SBadInput: each gets its status; nothing reaches the topic.
func TestC2SBadInput(t *testing.T) {
	var events string
	p := start(t, func(c *config.Config) { _, events = useTestBus(t, c); c.C2S.MaxContent = 1024 })
	c := login(t, p, 101, 1, nil)
	pc := login(t, p, 102, 1, nil)
	cases := []struct {
		name string
		c    interface {
			SendC2S(context.Context, uint32, []byte) (*pb.C2SResponse, error)
		}
		msgtype uint32
		content []byte
		want    schema.Status
	}{
		{"unmapped msgtype", c, 9, []byte("x"), schema.StatusUnmappedType},
		{"unmapped appcode", pc, 2, []byte("x"), schema.StatusUnmappedType},
		{"empty content", c, 2, nil, schema.StatusEmptyContent},
		{"oversized content", c, 2, make([]byte, 1025), schema.StatusContentTooLarge},
	}
	for _, tc := range cases {
		if _, err := tc.c.SendC2S(ctxb, tc.msgtype, tc.content); statusOf(err) != tc.want {
			t.Errorf("%s: %v, want status %d", tc.name, err, tc.want)
		}
	}
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 2, 1)
	r.writeBytes(schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdC2S, MsgType: 2, Seq: 2}, []byte{0x0a, 0x10, 'a'}))
	r.readError(schema.StatusBadBody)
	// The one good message is the only record.
	if _, err := c.SendC2S(ctxb, 2, []byte("good")); err != nil {
		t.Fatal(err)
	}
	recs := consume(t, p.KafkaAddrs(), events, 1)
	if len(recs) != 1 || string(recs[0].Value) != "good" {
		t.Fatalf("records %v", recs)
	}
}
