package platform

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// presRec records the presence notifies a follower's OnPresence got.
type presRec struct {
	mu  sync.Mutex
	got []*pb.PresenceNotify
}

func (r *presRec) on(n *pb.PresenceNotify) {
	r.mu.Lock()
	r.got = append(r.got, n)
	r.mu.Unlock()
}

func (r *presRec) opts(o *sdk.Options) { o.OnPresence = r.on }

// states returns the online flags recorded for uid, in arrival order, and
// fails when versions do not grow.
func (r *presRec) states(t *testing.T, uid uint64) []bool {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []bool
	var last uint64
	for _, n := range r.got {
		if n.User.GetUid() != uid {
			continue
		}
		if n.Version <= last {
			t.Fatalf("versions do not grow: %v", r.got)
		}
		last = n.Version
		out = append(out, n.Online)
	}
	return out
}

// waitStates waits for the states of uid to be want, then checks for a
// while that nothing else arrives.
func (r *presRec) waitStates(t *testing.T, uid uint64, want ...bool) {
	t.Helper()
	eventually(t, 15*time.Second, fmt.Sprintf("presence of uid %d to be %v", uid, want), func() bool {
		return len(r.states(t, uid)) >= len(want)
	})
	time.Sleep(300 * time.Millisecond)
	if got := r.states(t, uid); !slices.Equal(got, want) {
		t.Fatalf("presence of uid %d: %v, want %v", uid, got, want)
	}
}

func follow(t *testing.T, c *sdk.Client, uids ...uint64) *pb.PresenceSubscribeResponse {
	t.Helper()
	var us []*pb.User
	for _, u := range uids {
		us = append(us, &pb.User{Account: 1, Uid: u})
	}
	resp, err := c.Follow(context.Background(), us)
	if err != nil {
		t.Fatalf("follow %v: %v", uids, err)
	}
	return resp
}

// TestPresenceFollow: a follower gets the followed user's online change
// when its first terminal logs in and the offline change when its last one
// logs out, once each and in order; a second terminal and the logout of
// one of two change nothing.
func TestPresenceFollow(t *testing.T) {
	p := start(t, nil)
	var rec presRec
	fan := login(t, p, 101, 1, rec.opts)
	if st := follow(t, fan, 2).States; len(st) != 1 || st[0].Online {
		t.Fatalf("state of an offline user: %v", st)
	}
	phone := login(t, p, 101, 2, nil)
	rec.waitStates(t, 2, true)
	pc := login(t, p, 102, 2, nil)
	if st := follow(t, fan, 2).States; len(st) != 1 || !st[0].Online || len(st[0].Appcodes) != 2 {
		t.Fatalf("state with two terminals: %v", st)
	}
	if err := phone.Logout(context.Background()); err != nil {
		t.Fatal(err)
	}
	rec.waitStates(t, 2, true)
	if err := pc.Logout(context.Background()); err != nil {
		t.Fatal(err)
	}
	rec.waitStates(t, 2, true, false)
	// A lost connection (no logout) is offline too.
	c := login(t, p, 101, 2, nil)
	rec.waitStates(t, 2, true, false, true)
	_ = c.Close()
	rec.waitStates(t, 2, true, false, true, false)
}

// TestPresenceBound: a list over the bound is 4011; the bound is the
// config's.
func TestPresenceBound(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Presence.MaxFollowed = 3 })
	fan := login(t, p, 101, 1, nil)
	follow(t, fan, 2, 3, 4)
	_, err := fan.Follow(context.Background(), []*pb.User{{Account: 1, Uid: 2}, {Account: 1, Uid: 3}, {Account: 1, Uid: 4}, {Account: 1, Uid: 5}})
	if statusOf(err) != schema.StatusTooManyFollowed {
		t.Fatalf("four users over a bound of 3: %v", err)
	}
	p2 := start(t, nil)
	fan2 := login(t, p2, 101, 1, nil)
	us := make([]*pb.User, 201)
	for i := range us {
		us[i] = &pb.User{Account: 1, Uid: uint64(i + 2)}
	}
	if _, err := fan2.Follow(context.Background(), us); statusOf(err) != schema.StatusTooManyFollowed {
		t.Fatalf("201 users over the default bound: %v", err)
	}
	if _, err := fan2.Follow(context.Background(), us[:200]); err != nil {
		t.Fatalf("200 users: %v", err)
	}
}

// TestPresenceRefollow: the SDK follows again after a reconnect, and the
// change it missed while offline comes from the state it is answered.
func TestPresenceRefollow(t *testing.T) {
	p := start(t, nil)
	px := newProxy(t, p.GatewayAddr())
	var rec presRec
	fan := login(t, p, 101, 1, func(o *sdk.Options) {
		rec.opts(o)
		o.Addrs = []string{px.addr()}
	})
	follow(t, fan, 2)
	px.cut()
	eventually(t, 5*time.Second, "the follower to reconnect", func() bool { return px.dials.Load() >= 2 && fan.State() == sdk.StateOnline })
	login(t, p, 101, 2, nil)
	rec.waitStates(t, 2, true)
}

// TestPresenceGroup: group-presence pages the online members of a group
// in (account, uid) order.
func TestPresenceGroup(t *testing.T) {
	p := start(t, nil)
	var members []gtMember
	for _, u := range []uint64{9, 1, 4, 2, 7, 5} {
		members = append(members, gtUser(1, u))
	}
	id := gtCreate(t, p, members...)
	me := login(t, p, 101, 1, nil)
	for _, u := range []uint64{2, 5, 9} {
		login(t, p, 102, u, nil)
	}
	login(t, p, 101, 3, nil) // online, not a member
	var got []uint64
	var after *pb.User
	for pages := 0; ; pages++ {
		r, err := me.GroupPresence(context.Background(), id, after, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range r.Online {
			if !n.Online || n.Version == 0 || len(n.Appcodes) == 0 {
				t.Fatalf("entry %v", n)
			}
			got = append(got, n.User.GetUid())
			after = n.User
		}
		if !r.More {
			break
		}
		if pages > 3 {
			t.Fatal("the pages do not end")
		}
	}
	if !slices.Equal(got, []uint64{1, 2, 5, 9}) {
		t.Fatalf("online members %v", got)
	}
	outsider := login(t, p, 102, 3, nil)
	if _, err := outsider.GroupPresence(context.Background(), id, nil, 0); statusOf(err) != schema.StatusNotMember {
		t.Fatalf("a non-member asked: %v", err)
	}
}

// TestPresenceCluster: two `imd all` nodes sharing Redis. A change made by
// the node that serves the followed user reaches a follower on the other
// node; a second terminal on the follower's node and its logout change
// nothing; and when the followed user's gateway dies (it stops
// heartbeating: its connections are never closed cleanly) the other node
// purges it and the follower gets exactly one offline change.
func TestPresenceCluster(t *testing.T) {
	fast := fastRedisCluster(needRedis(t))
	a := startNode(t, RoleAll, fast)
	b := startNode(t, RoleAll, func(c *config.Config) { fast(c); c.NodeID = 2 })
	eventually(t, 5*time.Second, "each node's gateway to link to the other's logic", func() bool {
		return a.rpcClient.Links() == 1 && b.rpcClient.Links() == 1
	})
	var rec presRec
	fan := login(t, a, 101, 1, rec.opts)
	follow(t, fan, 2)
	login(t, b, 101, 2, nil)
	rec.waitStates(t, 2, true)
	pc := login(t, a, 102, 2, nil)
	if err := pc.Logout(context.Background()); err != nil {
		t.Fatal(err)
	}
	rec.waitStates(t, 2, true)
	if st := follow(t, fan, 2).States; len(st) != 1 || !st[0].Online {
		t.Fatalf("state across nodes: %v", st)
	}

	b.members.cancel()
	<-b.members.done
	eventually(t, 15*time.Second, "node a to purge node b's gateway", func() bool { return len(sessions(t, a, 1, 2)) == 0 })
	rec.waitStates(t, 2, true, false)
}
