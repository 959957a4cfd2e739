package platform

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/internal/testnet"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// linkProxy is the WAN between the DCs, closed at cleanup.
func newLinkProxy(t testing.TB, target string, delay time.Duration) *testnet.Proxy {
	t.Helper()
	px, err := testnet.NewProxy("", target, delay)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = px.Close() })
	return px
}

// twoDCs starts DC1 and DC2 in this process: each its own router and
// membership (one Redis, two key prefixes), its own logic node and
// gateway, linked through two proxies (dc1 -> dc2 and dc2 -> dc1).
type twoDCs struct {
	dc1, dc2         *Platform
	to1, to2         *testnet.Proxy // the WAN into DC1 and into DC2
	peer1, peer2     string
	prefix1, prefix2 string
}

func startTwoDCs(t testing.TB) *twoDCs { return startTwoDCsWAN(t, 0) }

// startTwoDCsWAN is startTwoDCs with a one-way delay on the links.
func startTwoDCsWAN(t testing.TB, delay time.Duration) *twoDCs {
	t.Helper()
	redis := testenv.Redis(t)
	// Each DC's peer listener takes a port of its own (":0"), and the
	// proxy into it learns it once it listens: a port picked free and
	// closed first could be taken meanwhile (by an outgoing connection's
	// ephemeral port, as a CI run once found). Until then a dial through
	// the proxy fails, and the link dials again.
	w := &twoDCs{}
	w.to1, w.to2 = newLinkProxy(t, "127.0.0.1:1", delay), newLinkProxy(t, "127.0.0.1:1", delay)
	n := redisPrefixes.Add(1)
	w.prefix1 = fmt.Sprintf("%s2dc%d:dc1:", testRedis.Prefix, n)
	w.prefix2 = fmt.Sprintf("%s2dc%d:dc2:", testRedis.Prefix, n)
	dc := func(name, peer, prefix string, to2, to1 string) func(*config.Config) {
		return func(c *config.Config) {
			c.Cluster.DC = name
			c.Cluster.Redis = config.Redis{Addrs: []string{redis}, Prefix: prefix}
			c.Cluster.Heartbeat, c.Cluster.NodeTTL = 200*time.Millisecond, 2*time.Second
			c.Cluster.Secret = "two-dc-test-secret-0123456789"
			c.Cluster.PeerAddr = peer
			c.Cluster.Rooms = []config.Room{
				{DC: "dc1", NodeIDs: "0-511", Peers: []string{to1}},
				{DC: "dc2", NodeIDs: "512-1023", Peers: []string{to2}},
			}
		}
	}
	w.dc1 = start(t, dc("dc1", "127.0.0.1:0", w.prefix1, w.to2.Addr(), w.to1.Addr()))
	w.peer1 = w.dc1.PeerAddr()
	w.to1.SetTarget(w.peer1)
	w.dc2 = start(t, dc("dc2", "127.0.0.1:0", w.prefix2, w.to2.Addr(), w.to1.Addr()))
	w.peer2 = w.dc2.PeerAddr()
	w.to2.SetTarget(w.peer2)
	w.waitLinked(t)
	return w
}

func (w *twoDCs) waitLinked(t testing.TB) {
	t.Helper()
	eventually(t, 10*time.Second, "the DCs linked both ways", func() bool {
		return w.dc1.Rooms().Links()["dc2"] && w.dc2.Rooms().Links()["dc1"]
	})
}

// TestTwoDCsChat: users online in different DCs chat, get their receipts
// and pushes, and a second login of a terminal in the other DC kicks the
// first; every message is counted: none lost, none shown twice, each
// sender's in order.
func TestTwoDCsChat(t *testing.T) {
	w := startTwoDCs(t)
	if id := w.dc1.Logic.NodeID(); id < 0 || id > 511 {
		t.Fatalf("dc1's logic node leased node id %d, outside dc1's range 0-511", id)
	}
	if id := w.dc2.Logic.NodeID(); id < 512 || id > 1023 {
		t.Fatalf("dc2's logic node leased node id %d, outside dc2's range 512-1023", id)
	}
	var recA, recB received
	var rcA receipts
	a := chatter(t, w.dc1, 101, 1001, &recA, &rcA, nil)
	b := chatter(t, w.dc2, 101, 2001, &recB, nil, nil)
	// B's login reached DC1's router through the link.
	eventually(t, 5*time.Second, "DC1 sees B online", func() bool {
		ss, err := w.dc1.Router.Lookup(context.Background(), routerUser(1, 2001))
		return err == nil && len(ss) == 1 && logic.IsMirror(&ss[0])
	})
	const n = 200
	ctx := context.Background()
	for i := range n {
		if _, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 2001}, 1, fmt.Appendf(nil, "a%03d", i)); err != nil {
			t.Fatalf("a -> b %d: %v", i, err)
		}
		if _, err := b.SendC2C(ctx, &pb.User{Account: 1, Uid: 1001}, 1, fmt.Appendf(nil, "b%03d", i)); err != nil {
			t.Fatalf("b -> a %d: %v", i, err)
		}
	}
	eventually(t, 10*time.Second, "every message across the DCs", func() bool { return recA.len() >= n && recB.len() >= n })
	checkInOrder(t, "B (dc2) from A (dc1)", recB.contents(), "a", n)
	checkInOrder(t, "A (dc1) from B (dc2)", recA.contents(), "b", n)
	// B acked in DC2 what DC1 stored: the acks travel to DC1, which
	// sends A a delivered receipt for each.
	eventually(t, 10*time.Second, "a receipt for every message A sent", func() bool { return rcA.len() >= n })
	time.Sleep(200 * time.Millisecond)
	if got := rcA.len(); got != n {
		t.Errorf("A got %d receipts for %d messages", got, n)
	}

	// An s2c push through DC1's HTTP API reaches B in DC2.
	var ps pushes
	d := login(t, w.dc2, 101, 2002, func(o *sdk.Options) { o.OnS2C = ps.on })
	_ = d
	eventually(t, 5*time.Second, "DC1 sees the driver online", func() bool {
		ss, err := w.dc1.Router.Lookup(ctx, routerUser(1, 2002))
		return err == nil && len(ss) == 1
	})
	var res pushResult
	if code := api(t, w.dc1, "POST", "/v1/push", testAPIKey, map[string]any{
		"to": []map[string]any{{"appcode": 101, "uid": 2002}}, "msgtype": 7, "text": "order 78 near you",
	}, &res); code != http.StatusOK || res.Online != 1 {
		t.Fatalf("push through dc1: HTTP %d %+v", code, res)
	}
	eventually(t, 5*time.Second, "the push in DC2", func() bool { return ps.len() == 1 })

	// The same terminal logs in to DC1: its DC2 session is kicked.
	kicked := make(chan *pb.Kickout, 1)
	_ = login(t, w.dc2, 102, 3001, func(o *sdk.Options) {
		o.OnKickout = func(k *pb.Kickout) { kicked <- k }
	})
	eventually(t, 5*time.Second, "DC1 sees 102/3001", func() bool {
		ss, err := w.dc1.Router.Lookup(ctx, routerUser(1, 3001))
		return err == nil && len(ss) == 1
	})
	_ = login(t, w.dc1, 102, 3001, nil)
	select {
	case k := <-kicked:
		if k.Reason != pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE {
			t.Errorf("kicked with %v", k.Reason)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the DC2 session of 102/3001 was not kicked by the login in DC1")
	}
	eventually(t, 5*time.Second, "one session of 102/3001 in each router", func() bool {
		s1, err1 := w.dc1.Router.Lookup(ctx, routerUser(1, 3001))
		s2, err2 := w.dc2.Router.Lookup(ctx, routerUser(1, 3001))
		return err1 == nil && err2 == nil && len(s1) == 1 && len(s2) == 1 && !logic.IsMirror(&s1[0]) && logic.IsMirror(&s2[0])
	})
}

// TestTwoDCsPartition: with the link between the DCs cut, each DC serves
// its own users; messages to users in the other DC are kept for the link
// and delivered when it is back: none lost, none shown twice, in order.
func TestTwoDCsPartition(t *testing.T) {
	w := startTwoDCs(t)
	var recA, recB, recC received
	a := chatter(t, w.dc1, 101, 1001, &recA, nil, nil)
	_ = chatter(t, w.dc2, 101, 2001, &recB, nil, nil)
	_ = chatter(t, w.dc1, 101, 1002, &recC, nil, nil)
	ctx := context.Background()
	eventually(t, 5*time.Second, "DC1 sees B online", func() bool {
		ss, err := w.dc1.Router.Lookup(ctx, routerUser(1, 2001))
		return err == nil && len(ss) == 1
	})
	w.to1.Cut()
	w.to2.Cut()
	eventually(t, 5*time.Second, "the links down", func() bool {
		return !w.dc1.Rooms().Links()["dc2"] && !w.dc2.Rooms().Links()["dc1"]
	})
	const n = 100
	for i := range n {
		if _, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 2001}, 1, fmt.Appendf(nil, "a%03d", i)); err != nil {
			t.Fatalf("a -> b during the cut %d: %v", i, err)
		}
		// DC1 keeps serving its own users.
		if _, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 1002}, 1, fmt.Appendf(nil, "a%03d", i)); err != nil {
			t.Fatalf("a -> c during the cut %d: %v", i, err)
		}
	}
	eventually(t, 5*time.Second, "C (same DC) got everything during the cut", func() bool { return recC.len() >= n })
	if got := recB.len(); got != 0 {
		t.Fatalf("B got %d messages through a cut link", got)
	}
	w.to1.Restore()
	w.to2.Restore()
	w.waitLinked(t)
	eventually(t, 10*time.Second, "B got what was kept for the link", func() bool { return recB.len() >= n })
	time.Sleep(300 * time.Millisecond)
	checkInOrder(t, "B after the link came back", recB.contents(), "a", n)
	checkInOrder(t, "C", recC.contents(), "a", n)
}

// TestTwoDCsOfflineAcrossDCs: messages stored in DC1 for a user who is
// offline, and who then logs in to DC2 before DC2's store has them (here
// never: each DC has its own embedded store, the harshest replication
// delay), reach the user through the offline pull, in order and once;
// the acks reach DC1, which sends the receipts and empties the inbox.
func TestTwoDCsOfflineAcrossDCs(t *testing.T) {
	w := startTwoDCs(t)
	var recA received
	var rcA receipts
	a := chatter(t, w.dc1, 101, 1001, &recA, &rcA, nil)
	ctx := context.Background()
	const n = 20
	for i := range n {
		if _, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 2001}, 1, fmt.Appendf(nil, "a%03d", i)); err != nil {
			t.Fatal(err)
		}
	}
	var recB received
	_ = chatter(t, w.dc2, 101, 2001, &recB, nil, func(o *sdk.Options) { o.PageSize = 7 })
	eventually(t, 10*time.Second, "B got what DC1 stored", func() bool { return recB.len() >= n })
	time.Sleep(200 * time.Millisecond)
	checkInOrder(t, "B (dc2) from A's stored messages (dc1)", recB.contents(), "a", n)
	eventually(t, 10*time.Second, "a receipt for each", func() bool { return rcA.len() >= n })
	var recB2 received
	_ = chatter(t, w.dc2, 102, 2001, &recB2, nil, nil) // the other terminal has its own inbox
	eventually(t, 10*time.Second, "B's other terminal got them too", func() bool { return recB2.len() >= n })
	checkInOrder(t, "B's other terminal", recB2.contents(), "a", n)
}

// checkInOrder checks that got is exactly prefix000 .. prefix(n-1), once
// each and in order.
func checkInOrder(t *testing.T, who string, got []string, prefix string, n int) {
	t.Helper()
	if len(got) != n {
		t.Errorf("%s: %d messages, want %d", who, len(got), n)
	}
	seen := map[string]int{}
	for i, s := range got {
		seen[s]++
		if i < n && s != fmt.Sprintf("%s%03d", prefix, i) {
			t.Errorf("%s: message %d is %q, want %s%03d (lost, duplicated or out of order)", who, i, s, prefix, i)
			return
		}
	}
	for s, k := range seen {
		if k > 1 {
			t.Errorf("%s: %q shown %d times", who, s, k)
		}
	}
}

func routerUser(account uint32, uid uint64) router.User {
	return router.User{Account: account, UID: uid}
}
