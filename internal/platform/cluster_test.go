package platform

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// startNode runs one node of a many-process deployment in this process,
// on its own ports, and stops it at cleanup.
func startNode(t *testing.T, role string, mod func(*config.Config)) *Platform {
	t.Helper()
	cfg := testConfig()
	cfg.Cluster.Split = false
	cfg.Cluster.Redis = config.Redis{}
	if role != RoleGateway {
		useTestStore(t, &cfg)
	}
	if mod != nil {
		mod(&cfg)
	}
	p, err := StartRole(role, cfg, testLogger(t))
	if err != nil {
		t.Fatalf("start %s: %v", role, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return p
}

var redisPrefixes atomic.Int64

// needRedis returns the test Redis (testenv.Redis) under a prefix of the
// test's own.
func needRedis(t *testing.T) config.Redis {
	t.Helper()
	r := config.Redis{Addrs: []string{testenv.Redis(t)}, Prefix: testRedis.Prefix}
	r.Prefix = fmt.Sprintf("%s%d:", r.Prefix, redisPrefixes.Add(1))
	return r
}

// fastRedisCluster puts a node on the test Redis with heartbeats fast
// enough for a test to see a node die.
func fastRedisCluster(rc config.Redis) func(*config.Config) {
	return func(c *config.Config) {
		c.Cluster.Redis = rc
		c.Cluster.Heartbeat = 100 * time.Millisecond
		c.Cluster.NodeTTL = 600 * time.Millisecond
	}
}

// TestClusterStaticLogic: one logic node (in-process router) and two
// gateways that dial it. Chat, kicks and pushes cross gateways over the
// internal RPC, and a gateway's drain unregisters its sessions.
func TestClusterStaticLogic(t *testing.T) {
	lg := startNode(t, RoleLogic, nil)
	gw := func() *Platform {
		return startNode(t, RoleGateway, func(c *config.Config) { c.Cluster.LogicAddrs = []string{lg.RPCAddr()} })
	}
	g1, g2 := gw(), gw()
	if lg.Gateway != nil || g1.Logic != nil || g1.Store != nil || g1.Broker != nil {
		t.Fatal("a role started tiers that are not its own")
	}
	clusterChat(t, lg, g1, g2)

	// A gateway's HTTP port serves operators, not app-servers.
	if code := api(t, g1, "GET", "/readyz", "", nil, nil); code != 200 {
		t.Fatalf("gateway /readyz: %d", code)
	}
	if code := api(t, g1, "POST", "/v1/push", testAPIKey, map[string]any{}, nil); code != 404 {
		t.Fatalf("gateway /v1/push: %d, want 404", code)
	}

	// Both sides count the internal RPC.
	metric := func(p *Platform, line string) bool {
		resp, err := http.Get("http://" + p.HTTPAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(b), line)
	}
	for _, want := range []struct {
		p    *Platform
		line string
	}{
		{g1, `imd_rpc_links{side="gateway"} 1`},
		{lg, `imd_rpc_links{side="logic"} 2`},
		{lg, `imd_rpc_served_total{cmd="rpc-login",status="ok"}`},
		{g1, `imd_rpc_calls_total{cmd="rpc-handle",status="ok"}`},
		{g1, `imd_rpc_disconnects_waiting 0`},
	} {
		if !metric(want.p, want.line) {
			t.Errorf("/metrics of the %s node lacks %s", want.p.Role, want.line)
		}
	}

	// Draining a gateway unregisters its sessions at logic.
	login(t, g2, 102, 77, nil)
	if n := len(sessions(t, lg, 1, 77)); n != 1 {
		t.Fatalf("sessions before the drain: %d", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = g2.Shutdown(ctx)
	eventually(t, 5*time.Second, "the drained gateway's sessions to go", func() bool { return len(sessions(t, lg, 1, 77)) == 0 })
}

// clusterChat checks chat, kicks and pushes between users on gateways g1
// and g2, all served by the logic behind lg.
func clusterChat(t *testing.T, lg, g1, g2 *Platform) {
	t.Helper()
	var toBob received
	alice := login(t, g1, 101, 1, nil)
	chatter(t, g2, 102, 2, &toBob, nil, nil)
	for i := range 20 {
		if _, err := alice.SendC2C(ctxb, acct1(2), 0, fmt.Appendf(nil, "m%03d", i)); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	eventually(t, 5*time.Second, "bob to get 20 messages across gateways", func() bool { return toBob.len() == 20 })
	checkOnceInOrder(t, toBob.contents(), map[string]int{"m": 20})

	// The same terminal logging in on the other gateway kicks the first.
	kicked := make(chan *pb.Kickout, 1)
	login(t, g1, 101, 3, func(o *sdk.Options) {
		o.DeviceID = "old"
		o.OnKickout = func(k *pb.Kickout) { kicked <- k }
	})
	login(t, g2, 101, 3, func(o *sdk.Options) { o.DeviceID = "new" })
	select {
	case k := <-kicked:
		if k.Reason != pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE {
			t.Fatalf("kickout %+v", k)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the session on the other gateway was not kicked")
	}
	eventually(t, 5*time.Second, "one session of uid 3, on the second gateway", func() bool {
		ss := sessions(t, lg, 1, 3)
		return len(ss) == 1 && ss[0].Gate == g2.Gateway.ID()
	})

	// One push to drivers on both gateways.
	var p1, p2 pushes
	driver(t, g1, 101, 11, &p1)
	driver(t, g2, 101, 12, &p2)
	var res struct {
		Online int `json:"online"`
		Result []struct {
			Pushed int `json:"pushed"`
		} `json:"results"`
	}
	code := api(t, lg, "POST", "/v1/push", testAPIKey, map[string]any{
		"to":   []map[string]any{{"appcode": 101, "uid": 11}, {"appcode": 101, "uid": 12}},
		"text": "order 42",
	}, &res)
	if code != 200 || res.Online != 2 || len(res.Result) != 2 || res.Result[0].Pushed != 1 || res.Result[1].Pushed != 1 {
		t.Fatalf("push: %d %+v", code, res)
	}
	eventually(t, 5*time.Second, "both drivers to get the push", func() bool { return p1.len() == 1 && p2.len() == 1 })
}

// TestClusterRedis: two logic nodes and two gateways that find each other
// through the Redis membership and share the router in Redis. Every
// gateway links to both logic nodes; a push through either logic node
// reaches users on either gateway; a gateway that stops heartbeating has
// its sessions purged; a logic node that leaves is dropped by gateways.
func TestClusterRedis(t *testing.T) {
	fast := fastRedisCluster(needRedis(t))
	l1 := startNode(t, RoleLogic, fast)
	// In production logic nodes share one Cassandra; on the embedded store
	// each has its own here, so c2c across them is checked on Cassandra only.
	l2 := startNode(t, RoleLogic, func(c *config.Config) {
		fast(c)
		c.NodeID = 2
	})
	g1, g2 := startNode(t, RoleGateway, fast), startNode(t, RoleGateway, fast)
	for _, g := range []*Platform{g1, g2} {
		eventually(t, 5*time.Second, "each gateway to link to both logic nodes", func() bool { return g.rpcClient.Links() == 2 })
	}
	if testStore != "cassandra" {
		var p1, p2 pushes
		driver(t, g1, 101, 11, &p1)
		driver(t, g2, 101, 12, &p2)
		for i, lg := range []*Platform{l1, l2} {
			var res struct {
				Online int `json:"online"`
			}
			code := api(t, lg, "POST", "/v1/push", testAPIKey, map[string]any{
				"to":   []map[string]any{{"appcode": 101, "uid": 11}, {"appcode": 101, "uid": 12}},
				"text": "order",
			}, &res)
			if code != 200 || res.Online != 2 {
				t.Fatalf("push through logic %d: %d %+v", i+1, code, res)
			}
		}
		eventually(t, 5*time.Second, "both drivers to get both pushes", func() bool { return p1.len() == 2 && p2.len() == 2 })
	} else {
		clusterChat(t, l1, g1, g2)
	}

	// A gateway that stops heartbeating (a crash, as far as the cluster
	// can tell) has its sessions purged by logic.
	login(t, g2, 102, 88, nil)
	eventually(t, 5*time.Second, "the session in the shared router", func() bool { return len(sessions(t, l2, 1, 88)) == 1 })
	g2.members.cancel()
	<-g2.members.done
	eventually(t, 5*time.Second, "the silent gateway's sessions to be purged", func() bool { return len(sessions(t, l1, 1, 88)) == 0 })
	st, err := l1.Router.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []uint64{88} {
		if ss, _ := l1.Router.Lookup(context.Background(), router.User{Account: 1, UID: u}); len(ss) != 0 {
			t.Fatalf("uid %d still has %+v (stats %+v)", u, ss, st)
		}
	}

	// A gateway whose heartbeats lapse while it lives (Redis away for
	// longer than the TTL: here its heartbeat key is deleted) is purged by
	// logic, sees it at its next heartbeat and announces its sessions again.
	login(t, g1, 101, 66, nil)
	eventually(t, 5*time.Second, "the session in the shared router", func() bool { return len(sessions(t, l1, 1, 66)) == 1 })
	g1.members.paused.Store(true)
	time.Sleep(300 * time.Millisecond) // a round under way ends
	if err := l1.redis.Retire(context.Background(), router.Node{ID: g1.Gateway.ID(), Role: memberGateway}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "logic to purge the silent gateway's sessions", func() bool { return len(sessions(t, l1, 1, 66)) == 0 })
	g1.members.paused.Store(false)
	eventually(t, 5*time.Second, "the gateway to announce its sessions again", func() bool { return g1.members.reannounced.Load() == 1 })
	if ss := sessions(t, l1, 1, 66); len(ss) != 1 || ss[0].Gate != g1.Gateway.ID() {
		t.Fatalf("after the lapse the router holds %+v", ss)
	}

	// A logic node that leaves is dropped by the gateways at once, and
	// requests go on through the other.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = l2.Shutdown(ctx)
	eventually(t, 5*time.Second, "gateway 1 to keep one logic link", func() bool { return g1.rpcClient.Links() == 1 })
	c := login(t, g1, 101, 99, nil)
	if _, err := c.Keepalive(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(sessions(t, l1, 1, 99)) != 1 {
		t.Fatal("login through the remaining logic node is not in the router")
	}
}

// TestClusterAllNodes: two `imd all` nodes that share Redis reach each
// other's gateways: a push through one node's API arrives at a driver on
// the other node, and a login on one node kicks the same terminal on the
// other.
func TestClusterAllNodes(t *testing.T) {
	fast := fastRedisCluster(needRedis(t))
	a := startNode(t, RoleAll, fast)
	b := startNode(t, RoleAll, func(c *config.Config) { fast(c); c.NodeID = 2 })
	eventually(t, 5*time.Second, "each node's gateway to link to the other's logic", func() bool {
		return a.rpcClient.Links() == 1 && b.rpcClient.Links() == 1
	})
	var onB pushes
	driver(t, b, 101, 21, &onB)
	var res struct {
		Online int `json:"online"`
	}
	if code := api(t, a, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 21}}, "text": "order"}, &res); code != 200 || res.Online != 1 {
		t.Fatalf("push through node a: %d %+v", code, res)
	}
	eventually(t, 5*time.Second, "the driver on node b to get the push from node a", func() bool { return onB.len() == 1 })

	kicked := make(chan *pb.Kickout, 1)
	login(t, b, 101, 22, func(o *sdk.Options) {
		o.DeviceID = "old"
		o.OnKickout = func(k *pb.Kickout) { kicked <- k }
	})
	login(t, a, 101, 22, func(o *sdk.Options) { o.DeviceID = "new" })
	select {
	case <-kicked:
	case <-time.After(5 * time.Second):
		t.Fatal("a login on node a did not kick the same terminal on node b")
	}
}
