package logic

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// presGate is a fake gateway that records the presence notifies pushed to
// each connection and the number of Push calls; connections in gone are
// reported closed.
type presGate struct {
	mu    sync.Mutex
	calls int
	got   map[uint64][]*pb.PresenceNotify
	gone  map[uint64]bool
}

func (g *presGate) Kick(context.Context, uint64, *pb.Kickout, uint64) error { return nil }

func (g *presGate) Push(_ context.Context, conns []uint64, cmd schema.Cmd, _ uint32, _ uint64, body []byte, queued []bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.calls++
	if g.got == nil {
		g.got = map[uint64][]*pb.PresenceNotify{}
	}
	for i, c := range conns {
		if g.gone[c] {
			continue
		}
		queued[i] = true
		if cmd == schema.CmdPresenceNotify {
			var n pb.PresenceNotify
			_ = proto.Unmarshal(body, &n)
			g.got[c] = append(g.got[c], &n)
		}
	}
	return nil
}

func (g *presGate) notifies(conn uint64) []*pb.PresenceNotify {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.got[conn])
}

const presSecret = "0123456789abcdef0123"

type presFixture struct {
	t     *testing.T
	s     *Service
	r     *router.Memory
	gs    *fakeGroups
	gates map[string]*presGate
	conn  uint64
}

func newPresFixture(t *testing.T, max int) *presFixture {
	t.Helper()
	r := router.NewMemory()
	gs := newFakeGroups()
	s, err := New(Options{Router: r, GroupStore: gs, Presence: Presence{MaxFollowed: max}, Apps: []App{
		{AppCode: 101, Account: 1, Secrets: []string{presSecret}},
		{AppCode: 102, Account: 1, Secrets: []string{presSecret}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	f := &presFixture{t: t, s: s, r: r, gs: gs, gates: map[string]*presGate{}}
	for _, id := range []string{"gate-a", "gate-b"} {
		f.gates[id] = &presGate{gone: map[uint64]bool{}}
		s.AttachGate(id, f.gates[id])
	}
	return f
}

// login logs (appcode, uid) in on gate through Service.Login.
func (f *presFixture) login(gate string, appcode uint32, uid uint64) router.Session {
	f.t.Helper()
	f.conn++
	res, err := f.s.Login(context.Background(), LoginInput{
		AppCode: appcode, UID: uid, Gate: gate, Conn: f.conn,
		Token: MintToken(presSecret, appcode, uid, time.Now().Add(time.Hour)),
	})
	if err != nil {
		f.t.Fatal(err)
	}
	return res.Session
}

func (f *presFixture) follow(sess router.Session, uids ...uint64) (*pb.PresenceSubscribeResponse, error) {
	req := &pb.PresenceSubscribeRequest{}
	for _, u := range uids {
		req.Users = append(req.Users, &pb.User{Account: 1, Uid: u})
	}
	var resp pb.PresenceSubscribeResponse
	body, _ := proto.Marshal(req)
	out, err := f.s.Handle(context.Background(), sess, &schema.Header{Cmd: schema.CmdPresenceSubscribe}, body)
	if err != nil {
		return nil, err
	}
	return &resp, proto.Unmarshal(out, &resp)
}

func (f *presFixture) notifies(sess router.Session) []*pb.PresenceNotify {
	return f.gates[sess.Gate].notifies(sess.Conn)
}

// wantNotifies checks that sess got exactly the states online (true) and
// offline (false) of uid, in that order and with growing versions.
func (f *presFixture) wantNotifies(sess router.Session, uid uint64, want ...bool) []*pb.PresenceNotify {
	f.t.Helper()
	got := f.notifies(sess)
	var states []bool
	var last uint64
	for _, n := range got {
		if n.User.GetUid() != uid {
			f.t.Fatalf("notify about %v, want only uid %d", n.User, uid)
		}
		if n.Version <= last {
			f.t.Fatalf("versions do not grow: %v", got)
		}
		last = n.Version
		states = append(states, n.Online)
	}
	if !slices.Equal(states, want) {
		f.t.Fatalf("notifies %v, want online states %v", got, want)
	}
	return got
}

// TestPresenceLifecycle: a follower gets one online notify when the
// followed user's first terminal logs in and one offline notify when its
// last one leaves, nothing for a second terminal or the first of two
// leaving, each with a greater version than the state the subscribe
// answered.
func TestPresenceLifecycle(t *testing.T) {
	f := newPresFixture(t, 0)
	fan := f.login("gate-a", 101, 1)
	resp, err := f.follow(fan, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.States) != 2 || resp.States[0].Online || resp.States[0].User.GetUid() != 2 || resp.States[1].User.GetUid() != 3 {
		t.Fatalf("subscribe answered %v", resp.States)
	}
	phone := f.login("gate-b", 101, 2)
	got := f.wantNotifies(fan, 2, true)
	if !slices.Equal(got[0].Appcodes, []uint32{101}) || got[0].AtMs == 0 {
		t.Fatalf("online notify %v", got[0])
	}
	pc := f.login("gate-a", 102, 2)
	f.wantNotifies(fan, 2, true)
	again, _ := f.follow(fan, 2)
	if st := again.States[0]; !st.Online || st.Version != got[0].Version || !slices.Equal(st.Appcodes, []uint32{101, 102}) {
		t.Fatalf("state now %v, want online at version %d on both terminals", st, got[0].Version)
	}
	if err := f.s.Logout(context.Background(), phone); err != nil {
		t.Fatal(err)
	}
	f.wantNotifies(fan, 2, true)
	f.s.Disconnected(context.Background(), pc)
	f.wantNotifies(fan, 2, true, false)
	// The list was replaced by the second subscribe: uid 3 is not followed.
	f.login("gate-b", 101, 3)
	f.wantNotifies(fan, 2, true, false)
}

// TestPresenceBound: a list over the bound is 4011 and keeps the previous
// list; duplicates count once.
func TestPresenceBound(t *testing.T) {
	f := newPresFixture(t, 3)
	fan := f.login("gate-a", 101, 1)
	if _, err := f.follow(fan, 2, 3, 4, 2, 3); err != nil {
		t.Fatalf("three distinct users with duplicates: %v", err)
	}
	_, err := f.follow(fan, 2, 3, 4, 5)
	wantStatus(t, err, schema.StatusTooManyFollowed)
	f.login("gate-b", 101, 4)
	f.wantNotifies(fan, 4, true)
	_, err = f.s.Handle(context.Background(), fan, &schema.Header{Cmd: schema.CmdPresenceSubscribe}, mustMarshal(&pb.PresenceSubscribeRequest{Users: []*pb.User{{Account: 1}}}))
	wantStatus(t, err, schema.StatusBadRecipient)
}

func mustMarshal(m proto.Message) []byte {
	b, _ := proto.Marshal(m)
	return b
}

// TestPresenceEndsWithSession: a session's subscriptions end with it
// (logout, a connection gone during a push, the eviction by a newer login
// of the terminal); one left behind is dropped at the next change.
func TestPresenceEndsWithSession(t *testing.T) {
	f := newPresFixture(t, 0)
	ctx := context.Background()
	star := router.User{Account: 1, UID: 9}
	fan := f.login("gate-a", 101, 1)
	f.follow(fan, 9)
	f.s.Disconnected(ctx, fan)
	if ss, _ := f.r.Followers(ctx, star); len(ss) != 0 {
		t.Fatalf("followers after the follower's disconnect: %+v", ss)
	}

	// Replaced by a newer login of the same terminal.
	old := f.login("gate-a", 101, 2)
	f.follow(old, 9)
	f.login("gate-b", 101, 2)
	if ss, _ := f.r.Followers(ctx, star); len(ss) != 0 {
		t.Fatalf("followers after the follower was evicted: %+v", ss)
	}

	// A follower whose connection is gone: the push finds it stale, drops
	// the session and its subscription, and its own user goes offline
	// (pushed to that user's followers).
	lost := f.login("gate-a", 101, 3)
	f.follow(lost, 9)
	watcher := f.login("gate-b", 102, 4)
	f.follow(watcher, 3)
	f.gates["gate-a"].mu.Lock()
	f.gates["gate-a"].gone[lost.Conn] = true
	f.gates["gate-a"].mu.Unlock()
	starSess := f.login("gate-b", 101, 9)
	if ss, _ := f.r.Lookup(ctx, lost.User()); len(ss) != 0 {
		t.Fatalf("the stale follower is still in the router: %+v", ss)
	}
	if ss, _ := f.r.Followers(ctx, star); len(ss) != 0 {
		t.Fatalf("followers after the stale follower was dropped: %+v", ss)
	}
	f.wantNotifies(watcher, 3, false)

	// A subscription whose session the router no longer holds (its end
	// was not seen by presence) is dropped at the next change.
	ghost := router.Session{Account: 1, AppCode: 101, UID: 5, Gate: "gate-a", Conn: 999, Epoch: 1}
	if err := f.r.Follow(ctx, ghost, []router.User{star}); err != nil {
		t.Fatal(err)
	}
	calls := f.gates["gate-a"].calls
	f.s.Disconnected(ctx, starSess)
	if ss, _ := f.r.Followers(ctx, star); len(ss) != 0 {
		t.Fatalf("the ghost subscription is left: %+v", ss)
	}
	if f.gates["gate-a"].calls != calls {
		t.Fatal("pushed to a session the router does not hold")
	}
}

// TestPresenceDetachGate: a gateway that died takes its users offline:
// one offline notify per user that had no session elsewhere, pushed with
// one Push per gateway of the followers.
func TestPresenceDetachGate(t *testing.T) {
	f := newPresFixture(t, 0)
	fan1 := f.login("gate-a", 101, 1)
	fan2 := f.login("gate-a", 102, 1)
	f.follow(fan1, 2, 3)
	f.follow(fan2, 2, 3)
	f.login("gate-b", 101, 2)
	f.login("gate-b", 101, 3)
	f.login("gate-a", 102, 3)
	calls := f.gates["gate-a"].calls
	f.s.DetachGate(context.Background(), "gate-b")
	for _, s := range []router.Session{fan1, fan2} {
		got := f.notifies(s)
		if len(got) != 3 || got[2].Online || got[2].User.GetUid() != 2 {
			t.Fatalf("after the gate died %d/%d got %v; want online 2, online 3, offline 2", s.AppCode, s.UID, got)
		}
	}
	if n := f.gates["gate-a"].calls - calls; n != 1 {
		t.Fatalf("%d pushes to gate-a for one change, want 1", n)
	}
}

// TestGroupPresence: the online members of a group in (account, uid)
// order, paged after the cursor; only members may ask.
func TestGroupPresence(t *testing.T) {
	f := newPresFixture(t, 0)
	var us []das.User
	for _, u := range []uint64{7, 1, 5, 2, 3, 6} {
		us = append(us, das.User{Account: 1, UID: u})
	}
	if _, err := f.gs.CreateGroup(context.Background(), 40, us, 100, &pb.C2CMessage{}); err != nil {
		t.Fatal(err)
	}
	me := f.login("gate-a", 101, 1)
	for _, u := range []uint64{3, 5, 7} {
		f.login("gate-b", 101, u)
	}
	f.login("gate-a", 101, 8) // not a member
	page := func(sess router.Session, after uint64, size uint32) (*pb.GroupPresenceResponse, error) {
		req := &pb.GroupPresenceRequest{GroupId: 40, PageSize: size}
		if after != 0 {
			req.After = &pb.User{Account: 1, Uid: after}
		}
		out, err := f.s.Handle(context.Background(), sess, &schema.Header{Cmd: schema.CmdGroupPresence}, mustMarshal(req))
		if err != nil {
			return nil, err
		}
		var resp pb.GroupPresenceResponse
		return &resp, proto.Unmarshal(out, &resp)
	}
	uids := func(r *pb.GroupPresenceResponse) []uint64 {
		var out []uint64
		for _, n := range r.Online {
			if !n.Online || n.Version == 0 {
				t.Fatalf("entry %v", n)
			}
			out = append(out, n.User.GetUid())
		}
		return out
	}
	var all []uint64
	after := uint64(0)
	for i := 0; ; i++ {
		r, err := page(me, after, 2)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, uids(r)...)
		if !r.More {
			break
		}
		after = all[len(all)-1]
		if i > 3 {
			t.Fatal("pages do not end")
		}
	}
	if !slices.Equal(all, []uint64{1, 3, 5, 7}) {
		t.Fatalf("online members %v", all)
	}
	if r, _ := page(me, 5, 0); !slices.Equal(uids(r), []uint64{7}) || r.More {
		t.Fatalf("after 5: %v more=%v", uids(r), r.More)
	}
	_, err := page(f.login("gate-a", 102, 8), 0, 2)
	wantStatus(t, err, schema.StatusNotMember)
	_, err = page(me, 0, 100000)
	wantStatus(t, err, schema.StatusBadArgument)
	_, err = f.s.Handle(context.Background(), me, &schema.Header{Cmd: schema.CmdGroupPresence}, mustMarshal(&pb.GroupPresenceRequest{GroupId: 41}))
	wantStatus(t, err, schema.StatusUnknownGroup)
}

// plainRouter hides the Presence methods of a router.
type plainRouter struct{ router.Router }

// TestPresenceWithoutRouterSupport: a router without presence keeps
// logins working and answers the presence commands 5002.
func TestPresenceWithoutRouterSupport(t *testing.T) {
	s, err := New(Options{Router: plainRouter{router.NewMemory()}, Apps: []App{{AppCode: 101, Account: 1, Secrets: []string{presSecret}}}})
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.Login(context.Background(), LoginInput{AppCode: 101, UID: 1, Gate: "g", Conn: 1, Token: MintToken(presSecret, 101, 1, time.Now().Add(time.Hour))})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Handle(context.Background(), res.Session, &schema.Header{Cmd: schema.CmdPresenceSubscribe}, nil)
	wantStatus(t, err, schema.StatusUnavailable)
	if err := s.Logout(context.Background(), res.Session); err != nil {
		t.Fatal(err)
	}
}
