package platform

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// skewClock is a wall clock a test steps.
type skewClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *skewClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *skewClock) step(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// sendAfter sends one c2c message with the sender's order floor set as
// the SDK sets it (the highest msgid this terminal was answered), and
// returns the new floor.
func sendAfter(t *testing.T, c *sdk.Client, to *pb.User, content string, floor uint64) uint64 {
	t.Helper()
	var resp pb.C2CSendResponse
	req := &pb.C2CSendRequest{To: to, Content: []byte(content), ClientMsgId: content, AfterMsgid: floor}
	if err := c.Request(context.Background(), schema.CmdC2CSend, 0, req, &resp); err != nil {
		t.Fatalf("send %s: %v", content, err)
	}
	if resp.Msgid <= floor {
		t.Fatalf("send %s: msgid %d not above the floor %d", content, resp.Msgid, floor)
	}
	return max(floor, resp.Msgid)
}

// TestC2COrderClockSkew: one sender's consecutive messages keep their
// order in the recipient's offline pull (sorted by msgid) whatever the
// clocks of the logic nodes that store them. On Cassandra two logic nodes
// share the store and the router, node B's clock 10s behind node A's, and
// the sender's messages alternate between them; on the embedded store
// (one node) the node's clock steps back 10s between sends.
func TestC2COrderClockSkew(t *testing.T) {
	const n = 10
	var sendOn [2]*Platform
	var steps *skewClock
	var pullOn *Platform
	if testStore == "cassandra" {
		fast := fastRedisCluster(needRedis(t))
		a := startNode(t, RoleAll, fast)
		b := startNode(t, RoleAll, func(c *config.Config) {
			fast(c)
			c.Clock = func() time.Time { return time.Now().Add(-10 * time.Second) }
		})
		eventually(t, 5*time.Second, "each node's gateway to link to the other's logic", func() bool {
			return a.rpcClient.Links() == 1 && b.rpcClient.Links() == 1
		})
		sendOn, pullOn = [2]*Platform{a, b}, a
	} else {
		steps = &skewClock{}
		p := start(t, func(c *config.Config) { c.Clock = steps.now })
		sendOn, pullOn = [2]*Platform{p, p}, p
	}
	// One terminal of the sender (appcode 301 allows two sessions), on
	// both nodes; with one node, both connections reach the same one.
	var senders [2]*sdk.Client
	for i, p := range sendOn {
		senders[i] = login(t, p, 301, 5, nil)
	}
	to := acct1(9)
	var floor uint64
	for i := range n {
		floor = sendAfter(t, senders[i%2], to, fmt.Sprintf("m%02d", i), floor)
		if steps != nil {
			steps.step(-10 * time.Second)
		}
	}
	var got received
	chatter(t, pullOn, 101, 9, &got, nil, nil)
	eventually(t, 10*time.Second, "the recipient to pull every message", func() bool { return got.len() >= n })
	c := got.contents()
	for i := range n {
		if c[i] != fmt.Sprintf("m%02d", i) {
			t.Fatalf("offline pull order %v: one sender's order broken", c)
		}
	}
}
