package platform

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// metricValue sums the samples of metric name in reg whose labels include
// every pair in labels (name=value), counters and gauges alike.
func metricValue(t testing.TB, reg prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum, found := 0.0, false
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				ok := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
						ok = true
					}
				}
				if !ok {
					continue metrics
				}
			}
			found = true
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			}
		}
	}
	if !found && len(labels) == 0 {
		t.Fatalf("metric %s is not registered", name)
	}
	return sum
}

// staleSession registers in p's router a session of (appcode, uid) on gate
// whose connection does not exist: a disconnect that never reached the
// router (a dead phone, a gateway restarting, a link down).
func staleSession(t *testing.T, p *Platform, gate string, account, appcode uint32, uid uint64) router.Session {
	t.Helper()
	ss := router.Session{Account: account, AppCode: appcode, UID: uid, Gate: gate, Conn: 0xdead0000 + uid, Epoch: uint64(time.Now().UnixNano()), DeviceID: "gone", LoginMS: time.Now().UnixMilli()}
	if _, err := p.Router.Register(context.Background(), ss, 1); err != nil {
		t.Fatal(err)
	}
	return ss
}

func lookup(t *testing.T, p *Platform, account uint32, uid uint64) []router.Session {
	t.Helper()
	ss, err := p.Router.Lookup(context.Background(), router.User{Account: account, UID: uid})
	if err != nil {
		t.Fatal(err)
	}
	return ss
}

type pushAnswer struct {
	PushID      string `json:"push_id"`
	Online      int    `json:"online"`
	Stored      int    `json:"stored"`
	Dropped     int    `json:"dropped"`
	Unreachable int    `json:"unreachable"`
	Results     []struct {
		Online      bool `json:"online"`
		Pushed      int  `json:"pushed"`
		Unreachable int  `json:"unreachable"`
		Stored      bool `json:"stored"`
		Dropped     bool `json:"dropped"`
	} `json:"results"`
}

type pushStatsAnswer struct {
	Recipients int `json:"recipients"`
	Online     int `json:"online"`
	Stored     int `json:"stored"`
	Dropped    int `json:"dropped"`
	Acked      int `json:"acked"`
}

// TestPushToStaleSession: a push to a session the router still lists but
// whose connection is gone is reported by the gateway: the session leaves
// the router, the recipient counts as offline, and with store_offline the
// push waits in that terminal's inbox for its next login (delivery
// contract point 9). Without it the push is counted as dropped.
func TestPushToStaleSession(t *testing.T) {
	p := start(t, nil)
	gate := p.Gateway.ID()
	staleSession(t, p, gate, 1, 101, 501)
	staleSession(t, p, gate, 1, 101, 502)

	var kept pushAnswer
	if code := api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 501}}, "text": "order 1", "store_offline": true}, &kept); code != 200 {
		t.Fatalf("push: %d", code)
	}
	if kept.Online != 0 || kept.Stored != 1 || kept.Dropped != 0 || kept.Unreachable != 1 || !kept.Results[0].Stored || kept.Results[0].Online || kept.Results[0].Unreachable != 1 {
		t.Fatalf("push to a stale session with store_offline: %+v, want stored 1 and unreachable 1", kept)
	}
	if ss := lookup(t, p, 1, 501); len(ss) != 0 {
		t.Fatalf("the stale session is still in the router: %+v", ss)
	}
	var lost pushAnswer
	api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 502}}, "text": "order 2"}, &lost)
	if lost.Online != 0 || lost.Stored != 0 || lost.Dropped != 1 || lost.Unreachable != 1 {
		t.Fatalf("push to a stale session without store_offline: %+v, want dropped 1 and unreachable 1", lost)
	}
	if ss := lookup(t, p, 1, 502); len(ss) != 0 {
		t.Fatalf("the stale session is still in the router: %+v", ss)
	}
	if n := metricValue(t, p.Registry, "imd_logic_undelivered_total", "cmd", "s2c"); n != 2 {
		t.Fatalf("imd_logic_undelivered_total{cmd=s2c} = %v, want 2", n)
	}
	if n := metricValue(t, p.Registry, "imd_logic_stale_sessions_dropped_total"); n != 2 {
		t.Fatalf("imd_logic_stale_sessions_dropped_total = %v, want 2", n)
	}

	// The terminal logs in and gets the kept push once, from its inbox.
	var got pushes
	driver(t, p, 101, 501, &got)
	eventually(t, 5*time.Second, "the kept push after the login", func() bool { return got.len() == 1 })
	if c := string(got.ns[0].Content); c != "order 1" {
		t.Fatalf("content %q", c)
	}
	var st pushStatsAnswer
	eventually(t, 5*time.Second, "the push's arrival in its statistics", func() bool {
		api(t, p, "GET", "/v1/push/"+kept.PushID, testAPIKey, nil, &st)
		return st.Acked == 1
	})
	if st.Recipients != 1 || st.Stored != 1 || st.Online != 0 {
		t.Fatalf("statistics %+v", st)
	}
	time.Sleep(100 * time.Millisecond)
	if got.len() != 1 {
		t.Fatalf("the push arrived %d times", got.len())
	}
}

// TestPushToUnknownGate: a session on a gateway this logic node does not
// reach (its link is down, it is restarting) is not dropped by a push (the
// membership decides whether the gateway died) but the push is counted
// and kept for the terminal when asked.
func TestPushToUnknownGate(t *testing.T) {
	p := start(t, nil)
	staleSession(t, p, "gate-that-is-gone", 1, 101, 511)
	var res pushAnswer
	api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 511}}, "text": "order", "store_offline": true}, &res)
	if res.Online != 0 || res.Stored != 1 || res.Unreachable != 1 {
		t.Fatalf("push to an unknown gate: %+v, want stored 1, unreachable 1", res)
	}
	if ss := lookup(t, p, 1, 511); len(ss) != 1 {
		t.Fatalf("a session of an unknown gate was dropped by a push: %+v", ss)
	}
	var got pushes
	driver(t, p, 101, 511, &got)
	eventually(t, 5*time.Second, "the kept push after the login", func() bool { return got.len() == 1 })
}

// TestC2CToStaleSession: a c2c message to a recipient whose listed session
// is gone is safe (stored first), and the router learns: the stale session
// is dropped and counted, and the recipient gets the message at login.
func TestC2CToStaleSession(t *testing.T) {
	p := start(t, nil)
	staleSession(t, p, p.Gateway.ID(), 1, 101, 521)
	sender := login(t, p, 101, 520, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := sender.SendC2C(ctx, &pb.User{Account: 1, Uid: 521}, 0, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if ss := lookup(t, p, 1, 521); len(ss) != 0 {
		t.Fatalf("the stale session is still in the router: %+v", ss)
	}
	if n := metricValue(t, p.Registry, "imd_logic_undelivered_total", "cmd", "c2c"); n != 1 {
		t.Fatalf("imd_logic_undelivered_total{cmd=c2c} = %v, want 1", n)
	}
	rc := newCollector()
	login(t, p, 101, 521, func(o *sdk.Options) { o.OnC2C = rc.on })
	eventually(t, 5*time.Second, "the message at login", func() bool { return rc.len() == 1 })
}

// collector gathers OnC2C deliveries.
type collector struct {
	mu   sync.Mutex
	msgs []*pb.C2CMessage
}

func newCollector() *collector { return &collector{} }

func (c *collector) on(m *pb.C2CMessage) {
	c.mu.Lock()
	c.msgs = append(c.msgs, m)
	c.mu.Unlock()
}

func (c *collector) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.msgs)
}

func (c *collector) contents() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, len(c.msgs))
	for i, m := range c.msgs {
		out[i] = string(m.Content)
	}
	return out
}

// TestC2CSenderOtherTerminals: what a user sends from the phone appears on
// the same user's PC: live, exactly once and in order while the PC is
// online, and from the PC's inbox after it was away. The phone does not
// get its own messages back, and the PC's acks send no delivered receipt
// to the phone (the PC is not the recipient).
func TestC2CSenderOtherTerminals(t *testing.T) {
	p := start(t, nil)
	var receipts sync.Map
	var nReceipts, selfReceipts int32
	var rmu sync.Mutex
	phoneGot := newCollector()
	phone := login(t, p, 101, 530, func(o *sdk.Options) {
		o.OnC2C = phoneGot.on
		o.OnReceipt = func(r *pb.C2CReceipt) {
			rmu.Lock()
			defer rmu.Unlock()
			nReceipts++
			if r.By.GetUid() == 530 {
				selfReceipts++
			}
			receipts.Store(r.Msgid, r.ByAppcode)
		}
	})
	pcGot := newCollector()
	pc := login(t, p, 102, 530, func(o *sdk.Options) { o.OnC2C = pcGot.on })
	peerGot := newCollector()
	login(t, p, 101, 531, func(o *sdk.Options) { o.OnC2C = peerGot.on })

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	to := &pb.User{Account: 1, Uid: 531}
	var want []string
	for i := range 20 {
		c := fmt.Sprintf("live %02d", i)
		if _, err := phone.SendC2C(ctx, to, 0, []byte(c)); err != nil {
			t.Fatal(err)
		}
		want = append(want, c)
	}
	eventually(t, 5*time.Second, "the PC to show what the phone sent", func() bool { return pcGot.len() >= 20 })
	eventually(t, 5*time.Second, "the peer to get every message", func() bool { return peerGot.len() >= 20 })
	if got := pcGot.contents(); !slices.Equal(got, want) {
		t.Fatalf("the PC showed %q, want %q", got, want)
	}
	for _, m := range pcGot.msgs {
		if m.From.GetUid() != 530 || m.FromAppcode != 101 || m.To.GetUid() != 531 {
			t.Fatalf("the PC's copy names from %v/%d to %v", m.From, m.FromAppcode, m.To)
		}
	}

	// The PC goes away; the phone sends more; the PC comes back and pulls
	// them from its inbox, once each and in order.
	_ = pc.Close()
	eventually(t, 5*time.Second, "the PC's session to leave", func() bool {
		for _, s := range lookup(t, p, 1, 530) {
			if s.AppCode == 102 {
				return false
			}
		}
		return true
	})
	var later []string
	for i := range 5 {
		c := fmt.Sprintf("away %02d", i)
		if _, err := phone.SendC2C(ctx, to, 0, []byte(c)); err != nil {
			t.Fatal(err)
		}
		later = append(later, c)
	}
	pc2Got := newCollector()
	login(t, p, 102, 530, func(o *sdk.Options) { o.OnC2C = pc2Got.on })
	eventually(t, 5*time.Second, "the PC's pull after its login", func() bool { return pc2Got.len() >= 5 })
	time.Sleep(200 * time.Millisecond)
	if got := pc2Got.contents(); !slices.Equal(got, later) {
		t.Fatalf("the PC pulled %q, want %q", got, later)
	}
	eventually(t, 5*time.Second, "a receipt for every message", func() bool {
		rmu.Lock()
		defer rmu.Unlock()
		return nReceipts >= 25
	})
	time.Sleep(200 * time.Millisecond)
	rmu.Lock()
	defer rmu.Unlock()
	if phoneGot.len() != 0 {
		t.Fatalf("the phone got its own messages back: %q", phoneGot.contents())
	}
	if selfReceipts != 0 || nReceipts != 25 {
		t.Fatalf("receipts: %d, %d of them from the sender's own PC; want 25 from the recipient", nReceipts, selfReceipts)
	}
	if peerGot.len() != 25 {
		t.Fatalf("the recipient got %d messages, want 25", peerGot.len())
	}
}

// syncBuffer is a bytes.Buffer safe for the logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines(substr string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, l := range strings.Split(s.b.String(), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// TestTraceIDFollowsMessage: the logid a sender's frame carries follows the
// message through the gateway, logic and das log lines, into the
// recipient's notify (frame and stored message), the recipient's ack and
// the delivered receipt back to the sender; the HTTP API takes and returns
// X-Request-Id and its push carries it to the recipient's notify.
func TestTraceIDFollowsMessage(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := testConfig()
	useTestStore(t, &cfg)
	p, err := Start(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})

	got := newCollector()
	login(t, p, 101, 541, func(o *sdk.Options) { o.OnC2C = got.on })
	sender := dialRaw(t, p.GatewayAddr())
	sender.login(101, 540, 1)
	const logid = 0x5eed_cafe_f00d
	sender.send(schema.Header{Cmd: schema.CmdC2CSend, Seq: 2, LogID: logid}, &pb.C2CSendRequest{To: &pb.User{Account: 1, Uid: 541}, ClientMsgId: "trace-1", Content: []byte("traced")})
	var msgid uint64
	var receipt schema.Header
	for receipt.Cmd != schema.CmdC2CReceipt {
		h, body := sender.read()
		switch {
		case h.Cmd == schema.CmdC2CSend && h.Kind() == schema.KindResponse:
			if h.LogID != logid {
				t.Fatalf("the send's response carries logid %x, want %x", h.LogID, logid)
			}
			var resp pb.C2CSendResponse
			if err := proto.Unmarshal(body, &resp); err != nil {
				t.Fatal(err)
			}
			msgid = resp.Msgid
		case h.Cmd == schema.CmdC2CReceipt:
			receipt = h
		}
	}
	if receipt.LogID != logid {
		t.Fatalf("the delivered receipt carries logid %x, want the send's %x", receipt.LogID, logid)
	}
	if got.len() != 1 || got.msgs[0].Logid != logid || got.msgs[0].Msgid != msgid {
		t.Fatalf("the recipient got %d messages; the first carries logid %x, want %x", got.len(), got.msgs[0].GetLogid(), logid)
	}
	id := "logid=" + strconv.FormatUint(logid, 10)
	for _, want := range [][2]string{
		{"tier=gateway", `msg="request served"`},
		{"tier=logic", `msg="c2c stored"`},
		{"tier=das", "msg=stored"},
		{"tier=logic", `msg="c2c acked"`},
	} {
		if !slices.ContainsFunc(logs.lines(want[1]), func(l string) bool { return strings.Contains(l, id) && strings.Contains(l, want[0]) }) {
			t.Errorf("no %s %s log line with %s; lines: %q", want[0], want[1], id, logs.lines(want[1]))
		}
	}

	// The HTTP API: X-Request-Id in, the same back, and on the notify.
	var frames = make(chan uint64, 4)
	login(t, p, 101, 542, func(o *sdk.Options) {
		o.OnMessage = func(m sdk.Message) {
			if m.Cmd == schema.CmdS2C {
				frames <- m.LogID
			}
		}
	})
	var res pushAnswer
	code, hdr := apiWithHeader(t, p, "/v1/push", map[string]string{"X-Request-Id": "987654321"}, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 542}}, "text": "traced push"}, &res)
	if code != 200 || hdr.Get("X-Request-Id") != "987654321" {
		t.Fatalf("push: %d, X-Request-Id %q", code, hdr.Get("X-Request-Id"))
	}
	select {
	case id := <-frames:
		if id != 987654321 {
			t.Fatalf("the push's notify carries logid %d, want the request's 987654321", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no push notify")
	}
	code, hdr = apiWithHeader(t, p, "/v1/push", nil, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 542}}, "text": "untraced push"}, &res)
	if n, err := strconv.ParseUint(hdr.Get("X-Request-Id"), 10, 64); code != 200 || err != nil || n == 0 {
		t.Fatalf("a push without X-Request-Id got %q back", hdr.Get("X-Request-Id"))
	}
	if len(logs.lines("logid=987654321")) == 0 {
		t.Error("no log line carries the HTTP request's id")
	}
}

// TestOnlineMetrics: /metrics has gauges of users and sessions online and
// counters of c2c notifies and acks.
func TestOnlineMetrics(t *testing.T) {
	p := start(t, nil)
	a := login(t, p, 101, 551, nil)
	pcGot := newCollector()
	login(t, p, 102, 551, func(o *sdk.Options) { o.OnC2C = pcGot.on })
	bGot := newCollector()
	login(t, p, 101, 552, func(o *sdk.Options) { o.OnC2C = bGot.on })
	eventually(t, 5*time.Second, "the gauges", func() bool {
		return metricValue(t, p.Registry, "imd_logic_online_users") == 2 && metricValue(t, p.Registry, "imd_logic_online_sessions") == 3
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for range 3 {
		if _, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 552}, 0, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	// 3 to the recipient, 3 to the sender's PC; each acked.
	eventually(t, 5*time.Second, "the c2c counters", func() bool {
		return metricValue(t, p.Registry, "imd_logic_c2c_notifies_total") == 6 && metricValue(t, p.Registry, "imd_logic_c2c_acks_total") == 6
	})
	if bGot.len() != 3 || pcGot.len() != 3 {
		t.Fatalf("recipient %d, sender's PC %d messages; want 3 each", bGot.len(), pcGot.len())
	}
	if n := metricValue(t, p.Registry, "imd_logic_c2c_sends_total", "result", "stored"); n != 3 {
		t.Fatalf("imd_logic_c2c_sends_total{result=stored} = %v, want 3", n)
	}
	if n := metricValue(t, p.Registry, "imd_logic_logins_total", "status", "ok"); n != 3 {
		t.Fatalf("imd_logic_logins_total{status=OK} = %v, want 3", n)
	}
}

// apiWithHeader posts body as JSON to the HTTP API with the test key and
// extra request headers, decodes the answer into out and returns the
// status and the response headers.
func apiWithHeader(t *testing.T, p *Platform, path string, headers map[string]string, body any, out any) (int, http.Header) {
	t.Helper()
	raw, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest("POST", "http://"+p.HTTPAddr()+path, bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header
}

// TestPushStatsAnyNode: with two logic nodes sharing Redis, a push taken
// by node a to a driver on node b's gateway (whose ack reaches node b's
// logic) has the same, complete statistics from either node, and still
// after node a stops.
func TestPushStatsAnyNode(t *testing.T) {
	fast := fastRedisCluster(needRedis(t))
	a := startNode(t, RoleAll, fast)
	b := startNode(t, RoleAll, func(c *config.Config) { fast(c); c.NodeID = 2 })
	eventually(t, 5*time.Second, "each node's gateway to link to the other's logic", func() bool {
		return a.rpcClient.Links() == 1 && b.rpcClient.Links() == 1
	})
	var onB pushes
	driver(t, b, 101, 561, &onB)
	var res pushAnswer
	if code := api(t, a, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 561}, {"appcode": 101, "uid": 562}}, "text": "order", "store_offline": true}, &res); code != 200 || res.Online != 1 || res.Stored != 1 {
		t.Fatalf("push through node a: %d %+v", code, res)
	}
	eventually(t, 5*time.Second, "the driver on node b to get the push", func() bool { return onB.len() == 1 })
	// The offline driver logs in on node a's gateway later.
	var onA pushes
	driver(t, a, 101, 562, &onA)
	eventually(t, 5*time.Second, "the offline driver to get the kept push", func() bool { return onA.len() == 1 })
	want := pushStatsAnswer{Recipients: 2, Online: 1, Stored: 1, Acked: 2}
	for _, n := range []*Platform{a, b} {
		var st pushStatsAnswer
		eventually(t, 5*time.Second, "both acks in the statistics", func() bool {
			api(t, n, "GET", "/v1/push/"+res.PushID, testAPIKey, nil, &st)
			return st.Acked == 2
		})
		if st != want {
			t.Fatalf("statistics from node %s: %+v, want %+v", n.RPCAddr(), st, want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.Shutdown(ctx); err != nil {
		t.Logf("shutdown a: %v", err)
	}
	var st pushStatsAnswer
	if code := api(t, b, "GET", "/v1/push/"+res.PushID, testAPIKey, nil, &st); code != 200 || st != want {
		t.Fatalf("after node a stopped, node b answers %d %+v, want %+v", code, st, want)
	}
}
