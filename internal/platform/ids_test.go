package platform

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/internal/config"
)

// pushID pushes to an offline driver through p's HTTP API and returns the
// push id (a snowflake id of p's logic node), or 0 with the HTTP status.
func pushID(t *testing.T, p *Platform) (uint64, int) {
	t.Helper()
	var res struct {
		PushID string `json:"push_id"`
	}
	code := api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{
		"to": []map[string]any{{"appcode": 101, "uid": 4242}}, "text": "x",
	}, &res)
	if code != 200 {
		return 0, code
	}
	id, err := strconv.ParseUint(res.PushID, 10, 64)
	if err != nil {
		t.Fatalf("push id %q: %v", res.PushID, err)
	}
	return id, code
}

func mustPushID(t *testing.T, p *Platform) uint64 {
	t.Helper()
	id, code := pushID(t, p)
	if code != 200 {
		t.Fatalf("push: HTTP %d", code)
	}
	return id
}

func nodeOf(id uint64) int64 { return int64(id>>12) & 1023 }

// TestClusterNodeIDs: logic nodes on one Redis without --node-id mint with
// different node ids; a static id that a live node holds is refused at
// start; an id handed on (clean stop, or a crash whose lease runs out)
// starts above every id minted with it before, even on a clock an hour
// behind; a node whose lease lapses (Redis unreachable past the TTL)
// mints nothing until it holds one again.
func TestClusterNodeIDs(t *testing.T) {
	rc := needRedis(t)
	fast := fastRedisCluster(rc)
	l1 := startNode(t, RoleLogic, fast)
	l2 := startNode(t, RoleLogic, fast)
	id1, id2 := mustPushID(t, l1), mustPushID(t, l2)
	if nodeOf(id1) == nodeOf(id2) {
		t.Fatalf("two logic nodes without --node-id mint with the same node id %d", nodeOf(id1))
	}

	// A static id held by a live node is refused, with a clear error.
	cfg := testConfig()
	cfg.Cluster.Split = false
	useTestStore(t, &cfg)
	fast(&cfg)
	cfg.NodeID = nodeOf(id1)
	if p, err := StartRole(RoleLogic, cfg, testLogger(t)); err == nil {
		_ = p.Shutdown(context.Background())
		t.Fatalf("a second logic node started on node id %d, held by a live one", nodeOf(id1))
	} else if !strings.Contains(err.Error(), fmt.Sprintf("node id %d is held by a live logic node", nodeOf(id1))) {
		t.Fatalf("refusal does not say why: %v", err)
	}

	// Clean stop, then a restart on the same id with the clock an hour
	// back: the new ids are above the old.
	static := func(id int64, clock func() time.Time) func(*config.Config) {
		return func(c *config.Config) { fast(c); c.NodeID = id; c.Clock = clock }
	}
	l3 := startNode(t, RoleLogic, static(5, nil))
	before := mustPushID(t, l3)
	if nodeOf(before) != 5 {
		t.Fatalf("static node id 5 minted %d", nodeOf(before))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = l3.Shutdown(ctx)
	hourBack := func() time.Time { return time.Now().Add(-time.Hour) }
	l4 := startNode(t, RoleLogic, static(5, hourBack))
	if after := mustPushID(t, l4); after <= before || nodeOf(after) != 5 {
		t.Fatalf("after a restart on node id 5 with the clock an hour back: %d (%v), before %d (%v)", after, das.MsgTime(after), before, das.MsgTime(before))
	}

	// A crash (no release): the next holder waits for the lease to run
	// out, and starts above the ceiling the crashed node wrote.
	l5 := startNode(t, RoleLogic, static(6, nil))
	before = mustPushID(t, l5)
	l5.members.cancel() // the process "dies": no more renewals, no release
	<-l5.members.done
	l6 := startNode(t, RoleLogic, static(6, hourBack))
	if after := mustPushID(t, l6); after <= before || nodeOf(after) != 6 {
		t.Fatalf("after a crash on node id 6: %d, before %d", after, before)
	}
	// ... and the crashed node, still running, mints nothing with it.
	if _, code := pushID(t, l5); code != 503 {
		t.Fatalf("a node whose lease ran out pushed: HTTP %d", code)
	}

	// Redis away for longer than the TTL: the node stops minting, then
	// mints again once a heartbeat holds the lease again.
	l1.members.paused.Store(true)
	time.Sleep(900 * time.Millisecond) // > node TTL (600ms)
	if _, code := pushID(t, l1); code != 503 {
		t.Fatalf("push with a lapsed node id lease: HTTP %d, want 503", code)
	}
	l1.members.paused.Store(false)
	eventually(t, 5*time.Second, "the node to mint again with a lease", func() bool {
		_, code := pushID(t, l1)
		return code == 200
	})
	if again := mustPushID(t, l1); again <= id1 || nodeOf(again) == nodeOf(id2) {
		t.Fatalf("after the lapse: %d (node %d), first %d", again, nodeOf(again), id1)
	}
}
