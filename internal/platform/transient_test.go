package platform

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// transients collects what OnTransient delivered.
type transients struct {
	mu sync.Mutex
	ns []*pb.TransientNotify
}

func (t *transients) on(n *pb.TransientNotify) {
	t.mu.Lock()
	t.ns = append(t.ns, n)
	t.mu.Unlock()
}

func (t *transients) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.ns)
}

// TestTransientReachesOnlineOnly: a typing notice reaches the recipient's
// online terminals and the sender's other one, once each, and is never
// stored: no inbox, no history, nothing for a terminal that logs in later,
// and no ack or retry.
func TestTransientReachesOnlineOnly(t *testing.T) {
	p := start(t, nil)
	var phone2, bPhone, bPC transients
	a := login(t, p, 101, 601, nil)
	login(t, p, 102, 601, func(o *sdk.Options) { o.OnTransient = phone2.on })
	login(t, p, 101, 602, func(o *sdk.Options) { o.OnTransient = bPhone.on })
	bPCc := login(t, p, 102, 602, func(o *sdk.Options) { o.OnTransient = bPC.on })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := a.SendTransient(ctx, &pb.User{Account: 1, Uid: 602}, 0, 9, []byte("typing"))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Delivered != 3 || resp.Msgid != 0 {
		t.Fatalf("answer %+v, want delivered 3 and no msgid", resp)
	}
	eventually(t, 5*time.Second, "the three terminals", func() bool {
		return bPhone.len() == 1 && bPC.len() == 1 && phone2.len() == 1
	})
	if n := bPhone.ns[0]; string(n.Content) != "typing" || n.From.GetUid() != 601 || n.To.GetUid() != 602 || n.Msgtype != 9 {
		t.Fatalf("notify %+v", n)
	}
	// Nothing was stored: the recipient's inbox and history are empty, and
	// a terminal that logs in later gets nothing.
	if c, err := bPCc.OfflineCount(ctx); err != nil || c.Count != 0 {
		t.Fatalf("inbox after a transient message: %v %v", c, err)
	}
	if h, err := bPCc.SyncHistory(ctx, nil, 0, 10); err != nil || len(h.Messages) != 0 {
		t.Fatalf("history after a transient message: %v %v", h, err)
	}
	got := newCollector()
	var late transients
	login(t, p, 301, 602, func(o *sdk.Options) { o.OnC2C = got.on; o.OnTransient = late.on })
	time.Sleep(300 * time.Millisecond)
	if got.len() != 0 || late.len() != 0 || bPhone.len() != 1 || bPC.len() != 1 {
		t.Fatalf("after the fact: %d stored, %d transient to the late terminal, %d/%d to the others", got.len(), late.len(), bPhone.len(), bPC.len())
	}
	// To nobody online: delivered 0, still no error and nothing kept.
	resp, err = a.SendTransient(ctx, &pb.User{Account: 1, Uid: 699}, 0, 9, []byte("typing"))
	if err != nil || resp.Delivered != 1 { // the sender's PC
		t.Fatalf("to an offline user: %+v %v", resp, err)
	}
}

// TestTransientGroup: a typing notice to a group reaches its online
// members; a non-member is refused.
func TestTransientGroup(t *testing.T) {
	p := start(t, nil)
	var res struct {
		GroupID string `json:"group_id"`
	}
	if code := api(t, p, "POST", "/v1/groups", testAPIKey, map[string]any{"group_id": "4711", "members": []map[string]any{{"uid": 611}, {"uid": 612}, {"account": 2, "uid": 613}}}, &res); code != 200 {
		t.Fatalf("create group: %d", code)
	}
	var two, three transients
	a := login(t, p, 101, 611, nil)
	login(t, p, 101, 612, func(o *sdk.Options) { o.OnTransient = two.on })
	login(t, p, 201, 613, func(o *sdk.Options) { o.OnTransient = three.on })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := a.SendTransient(ctx, nil, 4711, 0, []byte("typing"))
	if err != nil || resp.Delivered != 2 {
		t.Fatalf("group transient: %+v %v", resp, err)
	}
	eventually(t, 5*time.Second, "both members", func() bool { return two.len() == 1 && three.len() == 1 })
	if three.ns[0].GroupId != 4711 {
		t.Fatalf("notify %+v", three.ns[0])
	}
	outsider := login(t, p, 101, 619, nil)
	if _, err := outsider.SendTransient(ctx, nil, 4711, 0, []byte("typing")); statusOf(err) != schema.StatusNotMember {
		t.Fatalf("a non-member's transient: %v, want 4008", err)
	}
}

// TestTransientFloodIsRateLimited: a flood of typing notices is bounded by
// the per-user rate (3001 beyond the bucket), not by storage, and the
// recipient gets exactly those that were answered.
func TestTransientFloodIsRateLimited(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Transient.Rate, c.Transient.Burst = 10, 20 })
	var b transients
	a := login(t, p, 101, 621, nil)
	login(t, p, 101, 622, func(o *sdk.Options) { o.OnTransient = b.on })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	began := time.Now()
	ok, limited := 0, 0
	for range 200 {
		_, err := a.SendTransient(ctx, &pb.User{Account: 1, Uid: 622}, 0, 0, []byte("typing"))
		switch {
		case err == nil:
			ok++
		case statusOf(err) == schema.StatusRateLimited:
			limited++
		default:
			t.Fatal(err)
		}
	}
	elapsed := time.Since(began)
	if max := 20 + int(10*elapsed.Seconds()) + 1; ok > max || limited == 0 {
		t.Fatalf("%d sent and %d limited in %v: want at most %d sent", ok, limited, elapsed, max)
	}
	eventually(t, 5*time.Second, "every answered notice", func() bool { return b.len() == ok })
	time.Sleep(100 * time.Millisecond)
	if b.len() != ok {
		t.Fatalf("the recipient got %d, %d were answered", b.len(), ok)
	}
	if n := metricValue(t, p.Registry, "imd_logic_transient_total", "result", "rate_limited"); int(n) != limited {
		t.Fatalf("imd_logic_transient_total{rate_limited} = %v, want %d", n, limited)
	}
}
