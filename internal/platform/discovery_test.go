package platform

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// gatewaysAnswer is the JSON of GET /v1/gateways.
type gatewaysAnswer struct {
	DC       string              `json:"dc"`
	Gateways []logic.GatewayInfo `json:"gateways"`
}

// discoverGateways asks p's HTTP API for the gateways, without an API key.
func discoverGateways(t *testing.T, p *Platform, query string) gatewaysAnswer {
	t.Helper()
	resp, err := http.Get("http://" + p.HTTPAddr() + "/v1/gateways" + query)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ans gatewaysAnswer
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/gateways%s: HTTP %d, %v", query, resp.StatusCode, err)
	}
	return ans
}

func (a gatewaysAnswer) addrs() []string {
	out := make([]string, len(a.Gateways))
	for i, g := range a.Gateways {
		out[i] = g.Addr
	}
	return out
}

// TestDiscoveryTwoDCs: each DC's logic node lists its own DC's gateways
// first, the other DC's after (asked over the DC link), with their
// addresses and load; ?dc= puts another DC first; a client given only
// the discovery URL logs in and chats across the DCs; a gateway leaves
// the answer before it sends its clients away, and stays live (its
// sessions kept) while it drains.
func TestDiscoveryTwoDCs(t *testing.T) {
	w := startTwoDCs(t)
	gw1, gw2 := w.dc1.GatewayAddr(), w.dc2.GatewayAddr()
	var ans gatewaysAnswer
	eventually(t, 10*time.Second, "DC1 lists both DCs' gateways", func() bool {
		ans = discoverGateways(t, w.dc1, "")
		return len(ans.Gateways) == 2 && !ans.Gateways[1].Stale
	})
	if ans.DC != "dc1" || !slices.Equal(ans.addrs(), []string{gw1, gw2}) || ans.Gateways[0].DC != "dc1" || ans.Gateways[1].DC != "dc2" {
		t.Fatalf("DC1's answer %+v, want its gateway %s, then DC2's %s", ans, gw1, gw2)
	}
	if g := ans.Gateways[0]; g.ID != w.dc1.Gateway.ID() || g.WebAddr != w.dc1.Gateway.WebAddr().String() || g.TLSAddr != "" || g.Weight != 100 {
		t.Fatalf("DC1's gateway listed as %+v", g)
	}
	if ans = discoverGateways(t, w.dc1, "?dc=dc2"); !slices.Equal(ans.addrs(), []string{gw2, gw1}) || ans.DC != "dc1" {
		t.Fatalf("DC1's answer with ?dc=dc2: %+v, want DC2's gateway first", ans)
	}
	eventually(t, 10*time.Second, "DC2 lists its gateway first", func() bool {
		ans = discoverGateways(t, w.dc2, "")
		return ans.DC == "dc2" && slices.Equal(ans.addrs(), []string{gw2, gw1})
	})
	if ans = discoverGateways(t, w.dc1, "?limit=1"); !slices.Equal(ans.addrs(), []string{gw1}) {
		t.Fatalf("?limit=1: %+v", ans)
	}

	// A client that knows only DC2's discovery URL logs in on DC2's
	// gateway and chats with a user in DC1; the load shows in the answer.
	var recA, recB received
	a := chatter(t, w.dc1, 101, 1001, &recA, nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := sdk.Dial(ctx, sdk.Options{DiscoveryURL: "http://" + w.dc2.HTTPAddr() + "/v1/gateways", OnC2C: recB.on,
		RequestTimeout: 5 * time.Second, BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	info, err := b.Login(ctx, creds(101, 2001))
	if err != nil {
		t.Fatal(err)
	}
	if info.GateId != w.dc2.Gateway.ID() {
		t.Fatalf("the discovered client logged in on %s, want DC2's gateway %s", info.GateId, w.dc2.Gateway.ID())
	}
	eventually(t, 5*time.Second, "DC1 sees B online", func() bool {
		ss, err := w.dc1.Router.Lookup(ctx, routerUser(1, 2001))
		return err == nil && len(ss) == 1
	})
	if _, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 2001}, 1, []byte("to dc2")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.SendC2C(ctx, &pb.User{Account: 1, Uid: 1001}, 1, []byte("to dc1")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "both messages", func() bool { return recA.len() == 1 && recB.len() == 1 })
	eventually(t, 10*time.Second, "each gateway's load in DC1's answer", func() bool {
		ans = discoverGateways(t, w.dc1, "")
		return len(ans.Gateways) == 2 && ans.Gateways[0].Load == 1 && ans.Gateways[1].Load == 1
	})

	// A second gateway in DC1, with a client that ignores GoAway: the
	// gateway is listed, then drains.
	redis := testenv.Redis(t)
	extra := startNode(t, RoleGateway, func(c *config.Config) {
		c.Cluster.DC = "dc1"
		c.Cluster.Redis = config.Redis{Addrs: []string{redis}, Prefix: w.prefix1}
		c.Cluster.Heartbeat, c.Cluster.NodeTTL = 200*time.Millisecond, 2*time.Second
		c.Cluster.Secret = "two-dc-test-secret-0123456789"
	})
	gw3 := extra.GatewayAddr()
	eventually(t, 10*time.Second, "DC1 and DC2 list the new gateway", func() bool {
		return slices.Contains(discoverGateways(t, w.dc1, "").addrs(), gw3) && slices.Contains(discoverGateways(t, w.dc2, "").addrs(), gw3)
	})
	r := dialRaw(t, gw3)
	r.login(101, 4001, 1)
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		drained <- extra.Shutdown(ctx)
	}()
	// By the time its clients hear GoAway, its heartbeat says draining.
	h, _ := r.read()
	if h.Cmd != schema.CmdGoAway {
		t.Fatalf("the draining gateway sent %s, want a GoAway", h.Cmd)
	}
	nodes, err := w.dc1.redis.Live(ctx, memberGateway)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(nodes, func(n router.Node) bool { return n.ID == extra.Gateway.ID() })
	if i < 0 || !nodes[i].Draining {
		t.Fatalf("at the GoAway the membership holds %+v, want the gateway live and draining", nodes)
	}
	start := time.Now()
	eventually(t, 5*time.Second, "the draining gateway out of DC1's answer", func() bool {
		return !slices.Contains(discoverGateways(t, w.dc1, "").addrs(), gw3)
	})
	t.Logf("out of DC1's answer %s after the GoAway", time.Since(start).Round(time.Millisecond))
	eventually(t, 10*time.Second, "the draining gateway out of DC2's answer", func() bool {
		return !slices.Contains(discoverGateways(t, w.dc2, "").addrs(), gw3)
	})
	// Past the node TTL it still heartbeats: logic keeps the session of
	// the client it has not moved yet.
	time.Sleep(2500*time.Millisecond - time.Since(start))
	if ss, err := w.dc1.Router.Lookup(ctx, routerUser(1, 4001)); err != nil || len(ss) != 1 {
		t.Fatalf("the draining gateway's session after the node TTL: %v %v, want it kept", ss, err)
	}
	_ = r.nc.Close()
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("drain: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the gateway did not finish draining once its client left")
	}
	eventually(t, 10*time.Second, "the stopped gateway's session gone", func() bool {
		ss, err := w.dc1.Router.Lookup(ctx, routerUser(1, 4001))
		return err == nil && len(ss) == 0
	})
}

// TestDiscoveryMembership: the membership's gateways are listed but for
// draining ones and those that announce no client address (an older
// version's), read again at most every gatewaysFresh, and served stale
// for a while when Redis does not answer.
func TestDiscoveryMembership(t *testing.T) {
	rc := needRedis(t)
	rr, err := router.NewRedis(router.RedisOptions{Addrs: rc.Addrs, Prefix: rc.Prefix})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	beat := func(n router.Node) {
		t.Helper()
		if _, err := rr.Heartbeat(ctx, n, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	beat(router.Node{ID: "g1", Role: memberGateway, DC: "dc1", Addr: "g1:7070", TCPAddr: "g1:7070", WebAddr: "g1:7072", Load: 5})
	beat(router.Node{ID: "g2", Role: memberGateway, DC: "dc1", Addr: "g2:7443", TLSAddr: "g2:7443", Load: 9})
	beat(router.Node{ID: "g3", Role: memberGateway, DC: "dc1", Addr: "g3:7070", TCPAddr: "g3:7070", Draining: true})
	beat(router.Node{ID: "old", Role: memberGateway, DC: "dc1", Addr: "old:7070"})
	beat(router.Node{ID: "logic/x:7071", Role: memberLogic, DC: "dc1", Addr: "x:7071"})
	p := &Platform{redis: rr, log: slog.New(slog.DiscardHandler)}
	gws, fresh, err := p.memberGateways(ctx)
	want := []logic.GatewayInfo{
		{DC: "dc1", ID: "g1", Addr: "g1:7070", WebAddr: "g1:7072", Load: 5},
		{DC: "dc1", ID: "g2", TLSAddr: "g2:7443", Load: 9},
	}
	if err != nil || !fresh || !slices.Equal(gws, want) {
		t.Fatalf("memberGateways: %+v %v %v, want %+v", gws, fresh, err, want)
	}
	// g1 drains: this node's read of a moment ago still lists it, the
	// next read does not.
	beat(router.Node{ID: "g1", Role: memberGateway, DC: "dc1", Addr: "g1:7070", TCPAddr: "g1:7070", Draining: true})
	if gws, _, _ = p.memberGateways(ctx); len(gws) != 2 {
		t.Fatalf("read again within gatewaysFresh: %+v", gws)
	}
	p.disc.asked = time.Time{}
	if gws, _, _ = p.memberGateways(ctx); !slices.Equal(gws, want[1:]) {
		t.Fatalf("after g1 started draining: %+v, want %+v", gws, want[1:])
	}
	// Redis gone: the last read, stale; and the DC link's answer is an
	// error, so that the other DC marks it stale itself.
	rr.Close()
	p.disc.asked = time.Time{}
	gws, fresh, err = p.memberGateways(ctx)
	if err != nil || fresh || len(gws) != 1 || !gws[0].Stale {
		t.Fatalf("with Redis gone: %+v %v %v, want the last read, stale", gws, fresh, err)
	}
	p.disc.asked = time.Time{}
	if _, err := p.dcGatewaysOf("dc1")(ctx); err == nil {
		t.Fatal("the DC link's answer with Redis gone: no error")
	}
	p.disc.asked, p.disc.at = time.Time{}, time.Now().Add(-gatewaysStale-time.Second)
	if _, _, err := p.memberGateways(ctx); err == nil {
		t.Fatal("with Redis gone past gatewaysStale: no error")
	}
}

// TestGatewaysOneProcess: a node alone lists its own gateway (without
// Redis, or from its membership with IMD_TEST_SHAPE=split and
// IMD_TEST_REDIS), until it drains.
func TestGatewaysOneProcess(t *testing.T) {
	p := start(t, nil)
	ans := discoverGateways(t, p, "")
	if len(ans.Gateways) != 1 || ans.Gateways[0].Addr != p.GatewayAddr() || ans.Gateways[0].ID != p.Gateway.ID() {
		t.Fatalf("answer %+v, want this node's gateway %s", ans, p.GatewayAddr())
	}
	p.leaveDiscovery()
	if ans = discoverGateways(t, p, ""); len(ans.Gateways) != 0 {
		t.Fatalf("after leaveDiscovery: %+v", ans)
	}
}
