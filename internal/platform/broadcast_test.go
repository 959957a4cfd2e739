package platform

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// term is a raw client terminal that records every s2c notify frame it
// reads (the SDK would hide a duplicate: it shows each push id once) and,
// when ack is set, acknowledges each.
type term struct {
	r   *raw
	ack bool

	mu  sync.Mutex
	got []*pb.S2CNotify
}

func rawTerm(t *testing.T, p *Platform, appcode uint32, uid uint64, ack bool) *term {
	t.Helper()
	tm := &term{r: dialRaw(t, p.GatewayAddr()), ack: ack}
	tm.r.login(appcode, uid, 1)
	go tm.loop()
	return tm
}

func (tm *term) loop() {
	_ = tm.r.nc.SetReadDeadline(time.Time{})
	for {
		var f schema.Frame
		if err := tm.r.dec.ReadFrame(&f); err != nil {
			return
		}
		if f.Cmd == schema.CmdS2C && f.Kind() == schema.KindNotify {
			var n pb.S2CNotify
			if proto.Unmarshal(f.Body, &n) == nil {
				tm.mu.Lock()
				tm.got = append(tm.got, &n)
				tm.mu.Unlock()
				if tm.ack {
					h := schema.Header{Cmd: schema.CmdS2CAck}
					h.SetKind(schema.KindNotify)
					b, _ := proto.Marshal(&pb.S2CAck{PushIds: []uint64{n.PushId}})
					_ = tm.r.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
					_, _ = tm.r.nc.Write(schema.AppendFrame(nil, &h, b))
				}
			}
		}
		f.Release()
	}
}

// count returns how many notifies of push id the terminal got.
func (tm *term) count(id string) int {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	n := 0
	for _, x := range tm.got {
		if fmt.Sprint(x.PushId) == id {
			n++
		}
	}
	return n
}

func (tm *term) total() int {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	return len(tm.got)
}

type broadcastResult struct {
	PushID      string `json:"push_id"`
	AppCode     uint32 `json:"appcode"`
	Terminal    string `json:"terminal"`
	Recipients  int    `json:"recipients"`
	Online      int    `json:"online"`
	Unreachable int    `json:"unreachable"`
	Gates       int    `json:"gates"`
	DCs         []struct {
		DC          string `json:"dc"`
		Recipients  int    `json:"recipients"`
		Online      int    `json:"online"`
		Unreachable int    `json:"unreachable"`
		Gates       int    `json:"gates"`
		Error       string `json:"error"`
	} `json:"dcs"`
}

type broadcastStats struct {
	Recipients, Online, Stored, Dropped, Acked int
	Broadcast                                  bool
	AppCode                                    uint32 `json:"appcode"`
}

// waitStats polls GET /v1/push/{id} on p until acked reaches want.
func waitStats(t *testing.T, p *Platform, id string, want int) broadcastStats {
	t.Helper()
	var st broadcastStats
	eventually(t, 10*time.Second, fmt.Sprintf("%d acks of push %s", want, id), func() bool {
		st = broadcastStats{}
		return api(t, p, "GET", "/v1/push/"+id, testAPIKey, nil, &st) == http.StatusOK && st.Acked >= want
	})
	return st
}

// broadcastWorld starts a logic node and two gateways: with the
// in-process router (the gateways dial the logic node), or, with
// IMD_TEST_SHAPE=split and IMD_TEST_REDIS, the router and the membership
// in Redis.
func broadcastWorld(t *testing.T, mod func(*config.Config)) (lg, g1, g2 *Platform) {
	t.Helper()
	if testShape == "split" && len(testRedis.Addrs) > 0 {
		fast := fastRedisCluster(needRedis(t))
		lg = startNode(t, RoleLogic, func(c *config.Config) {
			fast(c)
			if mod != nil {
				mod(c)
			}
		})
		g1, g2 = startNode(t, RoleGateway, fast), startNode(t, RoleGateway, fast)
		if lg.redis == nil {
			t.Fatal("the split shape with IMD_TEST_REDIS runs without Redis")
		}
	} else {
		lg = startNode(t, RoleLogic, mod)
		gw := func() *Platform {
			return startNode(t, RoleGateway, func(c *config.Config) { c.Cluster.LogicAddrs = []string{lg.RPCAddr()} })
		}
		g1, g2 = gw(), gw()
	}
	for _, g := range []*Platform{g1, g2} {
		eventually(t, 5*time.Second, "each gateway to link to the logic node", func() bool { return g.rpcClient.Links() == 1 })
	}
	return lg, g1, g2
}

// TestBroadcast: one call reaches every online terminal of an appcode on
// two gateways exactly once (in pages of a few connections per gateway
// call), not the appcode's offline terminals (then or at their next
// login) nor other appcodes' terminals, and the push's statistics add up
// after the acks.
func TestBroadcast(t *testing.T) {
	lg, g1, g2 := broadcastWorld(t, func(c *config.Config) { c.S2C.BroadcastBatch = 7 })
	const perGate = 20
	var drivers []*term
	for i := range 2 * perGate {
		g := g1
		if i >= perGate {
			g = g2
		}
		drivers = append(drivers, rawTerm(t, g, 101, uint64(1+i), i != 0)) // driver 0 does not ack
	}
	pcs := []*term{rawTerm(t, g1, 102, 1, true), rawTerm(t, g2, 102, 500, true)} // same account, another appcode
	// A driver that went offline before the broadcast.
	gone := rawTerm(t, g2, 101, 300, true)
	gone.r.send(schema.Header{Cmd: schema.CmdLogout, Seq: 2}, &pb.LogoutRequest{})
	eventually(t, 5*time.Second, "the logged-out driver to leave the router", func() bool { return len(sessions(t, lg, 1, 300)) == 0 })
	eventually(t, 5*time.Second, "every driver in the router", func() bool { return len(sessions(t, lg, 1, 2*perGate)) == 1 })

	var res broadcastResult
	code := api(t, lg, "POST", "/v1/broadcast", testAPIKey, map[string]any{"appcode": 101, "msgtype": 9, "text": "maintenance at 02:00"}, &res)
	if code != http.StatusOK || res.Recipients != 2*perGate || res.Online != 2*perGate || res.Unreachable != 0 || res.Gates != 2 ||
		res.AppCode != 101 || res.Terminal != "freight-android" || len(res.DCs) != 1 || res.DCs[0].Online != 2*perGate {
		t.Fatalf("broadcast: HTTP %d %+v", code, res)
	}
	for i, d := range drivers {
		eventually(t, 5*time.Second, fmt.Sprintf("driver %d to get the broadcast", i), func() bool { return d.count(res.PushID) >= 1 })
	}
	st := waitStats(t, lg, res.PushID, 2*perGate-1)
	time.Sleep(200 * time.Millisecond) // a duplicate, were there one, would be in by now
	for i, d := range drivers {
		if n := d.total(); n != 1 {
			t.Errorf("driver %d got %d notifies, want the broadcast once", i, n)
		}
		d.mu.Lock()
		n := d.got[0]
		d.mu.Unlock()
		if string(n.Content) != "maintenance at 02:00" || n.Msgtype != 9 || !n.NeedAck {
			t.Errorf("driver %d got %+v", i, n)
		}
	}
	for i, pc := range pcs {
		if n := pc.total(); n != 0 {
			t.Errorf("terminal %d of appcode 102 got %d notifies", i, n)
		}
	}
	if gone.total() != 0 {
		t.Error("a driver that logged out got the broadcast")
	}
	st = waitStats(t, lg, res.PushID, 2*perGate-1)
	if !st.Broadcast || st.AppCode != 101 || st.Recipients != 2*perGate || st.Online != 2*perGate || st.Stored != 0 || st.Dropped != 0 || st.Acked != 2*perGate-1 {
		t.Fatalf("stats %+v", st)
	}
	// The offline driver comes back: a broadcast is not kept for it.
	back := rawTerm(t, g1, 101, 300, true)
	time.Sleep(300 * time.Millisecond)
	if back.total() != 0 {
		t.Fatal("a driver offline at the broadcast got it at its next login")
	}

	// No appcode: the key's own (101); the terminal that came back and
	// every driver get this one.
	var res2 broadcastResult
	if code := api(t, lg, "POST", "/v1/broadcast", testAPIKey, map[string]any{"content": []byte("second")}, &res2); code != http.StatusOK || res2.AppCode != 101 || res2.Online != 2*perGate+1 {
		t.Fatalf("second broadcast: HTTP %d %+v", code, res2)
	}
	eventually(t, 5*time.Second, "the second broadcast everywhere", func() bool {
		for _, d := range append(drivers, back) {
			if d.count(res2.PushID) != 1 {
				return false
			}
		}
		return true
	})
	// Appcode 102 of the same account system: its two terminals only.
	var res3 broadcastResult
	if code := api(t, lg, "POST", "/v1/broadcast", testAPIKey, map[string]any{"appcode": 102, "text": "pc update"}, &res3); code != http.StatusOK || res3.Online != 2 || res3.Gates != 2 {
		t.Fatalf("broadcast to 102: HTTP %d %+v", code, res3)
	}
	eventually(t, 5*time.Second, "the PCs to get theirs", func() bool { return pcs[0].count(res3.PushID) == 1 && pcs[1].count(res3.PushID) == 1 })
}

// TestBroadcastBadRequests: each gets a clear 4xx and pushes nothing.
func TestBroadcastBadRequests(t *testing.T) {
	p := start(t, func(c *config.Config) { c.S2C.MaxContent = 100 })
	d := rawTerm(t, p, 101, 1, true)
	cases := []struct {
		name   string
		key    string
		method string
		body   any
		code   int
		status int
		says   string
	}{
		{"no key", "", "POST", map[string]any{"text": "x"}, 401, 0, "Authorization"},
		{"GET", testAPIKey, "GET", nil, 405, 0, "POST"},
		{"bad JSON", testAPIKey, "POST", `{"text": `, 400, 1004, "bad JSON"},
		{"a recipients list", testAPIKey, "POST", map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 1}}, "text": "x"}, 400, 1004, "POST /v1/push"},
		{"unknown field", testAPIKey, "POST", map[string]any{"txt": "x"}, 400, 1004, "unknown field"},
		{"store_offline", testAPIKey, "POST", map[string]any{"text": "x", "store_offline": true}, 400, 4003, "not stored"},
		{"unknown appcode", testAPIKey, "POST", map[string]any{"appcode": 999, "text": "x"}, 400, 2004, "not configured"},
		{"another account system", testAPIKey, "POST", map[string]any{"appcode": 201, "text": "x"}, 400, 4001, "another account system"},
		{"empty content", testAPIKey, "POST", map[string]any{"appcode": 101}, 400, 4002, "empty"},
		{"content over the limit", testAPIKey, "POST", map[string]any{"text": strings.Repeat("x", 101)}, 413, 4005, "maximum"},
		{"content and text", testAPIKey, "POST", map[string]any{"text": "x", "content": []byte("y")}, 400, 4003, "not both"},
		{"a DC in one DC", testAPIKey, "POST", map[string]any{"text": "x", "dcs": []string{"dc9"}}, 400, 4003, "dcs"},
	}
	for _, tc := range cases {
		var e struct {
			Error struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		code := api(t, p, tc.method, "/v1/broadcast", tc.key, tc.body, &e)
		if code != tc.code || e.Error.Code != tc.status || !strings.Contains(e.Error.Message, tc.says) {
			t.Errorf("%s: HTTP %d code %d %q, want HTTP %d code %d saying %q", tc.name, code, e.Error.Code, e.Error.Message, tc.code, tc.status, tc.says)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n := d.total(); n != 0 {
		t.Fatalf("a bad request pushed %d notifies", n)
	}
	// Another account system's key broadcasts to its own terminals only,
	// and cannot read this push's statistics.
	var res broadcastResult
	if code := api(t, p, "POST", "/v1/broadcast", testAPIKey2, map[string]any{"text": "support news"}, &res); code != http.StatusOK || res.AppCode != 201 || res.Online != 0 {
		t.Fatalf("account 2's broadcast: HTTP %d %+v", code, res)
	}
	if code := api(t, p, "GET", "/v1/push/"+res.PushID, testAPIKey, nil, nil); code != http.StatusNotFound {
		t.Fatalf("another account's broadcast stats: HTTP %d, want 404", code)
	}
	time.Sleep(100 * time.Millisecond)
	if n := d.total(); n != 0 {
		t.Fatalf("account 2's broadcast reached account 1's terminal (%d notifies)", n)
	}
}

// TestPushStatsBound: a logic node without Redis keeps the statistics of
// its newest s2c.stats_max pushes; an older push's answer says they
// expired, a newer one's are there.
func TestPushStatsBound(t *testing.T) {
	p := start(t, func(c *config.Config) { c.S2C.StatsMax = 32 })
	if p.redis != nil {
		t.Skip("statistics are in Redis: bounded by s2c.stats_ttl only")
	}
	var ids []string
	for i := range 300 {
		var res pushResult
		if code := api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 1 + i}}, "text": "x"}, &res); code != http.StatusOK {
			t.Fatalf("push %d: HTTP %d", i, code)
		}
		ids = append(ids, res.PushID)
	}
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if code := api(t, p, "GET", "/v1/push/"+ids[0], testAPIKey, nil, &e); code != http.StatusNotFound || !strings.Contains(e.Error.Message, "statistics expired") || !strings.Contains(e.Error.Message, "stats_max") {
		t.Fatalf("the oldest push's stats: HTTP %d %q, want 404 saying they expired (stats_max)", code, e.Error.Message)
	}
	var st pushStats
	if code := api(t, p, "GET", "/v1/push/"+ids[len(ids)-1], testAPIKey, nil, &st); code != http.StatusOK || st.Recipients != 1 || st.Dropped != 1 {
		t.Fatalf("the newest push's stats: HTTP %d %+v", code, st)
	}
	if n := p.Logic.PushStatsKept(); n > 32 {
		t.Fatalf("the node keeps %d pushes' statistics, over s2c.stats_max 32", n)
	}
}

// TestBroadcastTwoDCs: a broadcast through one DC's API reaches the
// terminals online in both DCs, each exactly once from its own DC (not
// through the other DC's mirror of it), and each DC counts the acks of
// its own terminals under the same push id. One naming a DC reaches that
// DC's terminals only.
func TestBroadcastTwoDCs(t *testing.T) {
	w := startTwoDCs(t)
	var in1, in2 []*term
	for i := range 5 {
		in1 = append(in1, rawTerm(t, w.dc1, 101, uint64(100+i), true))
		in2 = append(in2, rawTerm(t, w.dc2, 101, uint64(200+i), true))
	}
	ctx := context.Background()
	eventually(t, 10*time.Second, "each DC to mirror the other's drivers", func() bool {
		a, err1 := w.dc1.Router.Lookup(ctx, routerUser(1, 204))
		b, err2 := w.dc2.Router.Lookup(ctx, routerUser(1, 104))
		return err1 == nil && err2 == nil && len(a) == 1 && logic.IsMirror(&a[0]) && len(b) == 1 && logic.IsMirror(&b[0])
	})
	var res broadcastResult
	if code := api(t, w.dc1, "POST", "/v1/broadcast", testAPIKey, map[string]any{"text": "both DCs"}, &res); code != http.StatusOK ||
		res.Online != 10 || res.Recipients != 10 || len(res.DCs) != 2 || res.DCs[0].DC != "dc1" || res.DCs[0].Online != 5 || res.DCs[1].DC != "dc2" || res.DCs[1].Online != 5 {
		t.Fatalf("broadcast through dc1: HTTP %d %+v", code, res)
	}
	all := append(append([]*term(nil), in1...), in2...)
	eventually(t, 5*time.Second, "every driver in both DCs", func() bool {
		for _, d := range all {
			if d.count(res.PushID) < 1 {
				return false
			}
		}
		return true
	})
	for dc, p := range map[string]*Platform{"dc1": w.dc1, "dc2": w.dc2} {
		st := waitStats(t, p, res.PushID, 5)
		if !st.Broadcast || st.Recipients != 5 || st.Online != 5 || st.Acked != 5 {
			t.Errorf("%s's part of the statistics: %+v", dc, st)
		}
	}
	// Only DC2, through DC1's API.
	var res2 broadcastResult
	if code := api(t, w.dc1, "POST", "/v1/broadcast", testAPIKey, map[string]any{"text": "dc2 only", "dcs": []string{"dc2"}}, &res2); code != http.StatusOK ||
		res2.Online != 5 || len(res2.DCs) != 1 || res2.DCs[0].DC != "dc2" {
		t.Fatalf("broadcast to dc2 through dc1: HTTP %d %+v", code, res2)
	}
	eventually(t, 5*time.Second, "DC2's drivers", func() bool {
		for _, d := range in2 {
			if d.count(res2.PushID) != 1 {
				return false
			}
		}
		return true
	})
	time.Sleep(200 * time.Millisecond)
	for i, d := range all {
		want := 2
		if i < len(in1) {
			want = 1
		}
		if n := d.total(); n != want {
			t.Errorf("driver %d got %d notifies, want %d", i, n, want)
		}
	}
	// The link cut: DC1's part goes out, DC2's fails and says so.
	w.to2.Cut()
	eventually(t, 10*time.Second, "dc1 to see the link down", func() bool { return !w.dc1.Rooms().Links()["dc2"] })
	var res3 broadcastResult
	if code := api(t, w.dc1, "POST", "/v1/broadcast", testAPIKey, map[string]any{"text": "cut"}, &res3); code != http.StatusOK ||
		res3.Online != 5 || len(res3.DCs) != 2 || res3.DCs[1].Error == "" || res3.DCs[1].Online != 0 {
		t.Fatalf("broadcast with the link cut: HTTP %d %+v", code, res3)
	}
}
