package logic

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// fakeGroups is an in-memory das.GroupStore with the contract's rules, for
// logic's own tests (the engines have the conformance suite).
type fakeGroups struct {
	mu      sync.Mutex
	groups  map[uint64]*fakeGroup
	ms      map[das.User]map[uint64]*das.Membership
	cursors map[das.Terminal]map[uint64]uint64
	reads   int // Members calls
}

type fakeGroup struct {
	msgs      []*pb.C2CMessage // msgs[i].Seq == i+1
	members   map[das.User]uint64
	memberSeq uint64
	dissolved bool
}

func newFakeGroups() *fakeGroups {
	return &fakeGroups{groups: map[uint64]*fakeGroup{}, ms: map[das.User]map[uint64]*das.Membership{}, cursors: map[das.Terminal]map[uint64]uint64{}}
}

func (f *fakeGroups) appendLocked(g *fakeGroup, m *pb.C2CMessage) uint64 {
	m = proto.Clone(m).(*pb.C2CMessage)
	m.Seq = uint64(len(g.msgs) + 1)
	g.msgs = append(g.msgs, m)
	return m.Seq
}

func (f *fakeGroups) join(id uint64, u das.User, seq uint64) {
	if f.ms[u] == nil {
		f.ms[u] = map[uint64]*das.Membership{}
	}
	f.ms[u][id] = &das.Membership{GroupID: id, JoinSeq: seq}
}

func (f *fakeGroups) CreateGroup(_ context.Context, id uint64, members []das.User, maxSize int, ev *pb.C2CMessage) (das.GroupInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.groups[id] != nil {
		return das.GroupInfo{}, das.ErrGroupExists
	}
	if len(members) > maxSize {
		return das.GroupInfo{}, das.ErrGroupFull
	}
	g := &fakeGroup{members: map[das.User]uint64{}}
	f.groups[id] = g
	seq := f.appendLocked(g, ev)
	for _, u := range members {
		g.members[u] = seq
		f.join(id, u, seq)
	}
	g.memberSeq = seq
	return das.GroupInfo{ID: id, Head: seq, MemberSeq: seq, Members: len(g.members)}, nil
}

func (f *fakeGroups) AddMembers(_ context.Context, id uint64, users []das.User, maxSize int, ev *pb.C2CMessage) (uint64, []das.User, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[id]
	if g == nil || g.dissolved {
		return 0, nil, das.ErrGroupUnknown
	}
	var added []das.User
	for _, u := range users {
		if _, ok := g.members[u]; !ok && !slices.Contains(added, u) {
			added = append(added, u)
		}
	}
	if len(added) == 0 {
		return 0, nil, nil
	}
	if len(g.members)+len(added) > maxSize {
		return 0, nil, das.ErrGroupFull
	}
	seq := f.appendLocked(g, ev)
	for _, u := range added {
		g.members[u] = seq
		f.join(id, u, seq)
	}
	g.memberSeq = seq
	return seq, added, nil
}

func (f *fakeGroups) RemoveMembers(_ context.Context, id uint64, users []das.User, ev *pb.C2CMessage) (uint64, []das.User, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[id]
	if g == nil || g.dissolved {
		return 0, nil, das.ErrGroupUnknown
	}
	var removed []das.User
	for _, u := range users {
		if _, ok := g.members[u]; ok {
			removed = append(removed, u)
			delete(g.members, u)
		}
	}
	if len(removed) == 0 {
		return 0, nil, nil
	}
	seq := f.appendLocked(g, ev)
	for _, u := range removed {
		f.ms[u][id].LeftSeq = seq
	}
	g.memberSeq = seq
	return seq, removed, nil
}

func (f *fakeGroups) Dissolve(_ context.Context, id uint64, ev *pb.C2CMessage) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[id]
	if g == nil || g.dissolved {
		return 0, das.ErrGroupUnknown
	}
	seq := f.appendLocked(g, ev)
	for u := range g.members {
		f.ms[u][id].LeftSeq = seq
	}
	g.members = map[das.User]uint64{}
	g.dissolved, g.memberSeq = true, seq
	return seq, nil
}

func (f *fakeGroups) Group(_ context.Context, id uint64) (das.GroupInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[id]
	if g == nil {
		return das.GroupInfo{}, das.ErrGroupUnknown
	}
	return das.GroupInfo{ID: id, Head: uint64(len(g.msgs)), MemberSeq: g.memberSeq, Members: len(g.members), Dissolved: g.dissolved}, nil
}

func (f *fakeGroups) Members(_ context.Context, id uint64) ([]das.Member, uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	g := f.groups[id]
	if g == nil {
		return nil, 0, das.ErrGroupUnknown
	}
	var out []das.Member
	for u, s := range g.members {
		out = append(out, das.Member{User: u, JoinSeq: s})
	}
	return out, g.memberSeq, nil
}

func (f *fakeGroups) UserGroups(_ context.Context, u das.User) ([]das.Membership, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []das.Membership
	for _, m := range f.ms[u] {
		out = append(out, *m)
	}
	return out, nil
}

func (f *fakeGroups) AppendGroup(_ context.Context, m *pb.C2CMessage) (das.Appended, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[m.GroupId]
	if g == nil || g.dissolved {
		return das.Appended{}, das.ErrGroupUnknown
	}
	if _, ok := g.members[das.User{Account: m.From.GetAccount(), UID: m.From.GetUid()}]; !ok {
		return das.Appended{}, das.ErrNotMember
	}
	for _, old := range g.msgs {
		if m.ClientMsgId != "" && old.ClientMsgId == m.ClientMsgId && old.FromAppcode == m.FromAppcode && proto.Equal(old.From, m.From) {
			return das.Appended{Seq: old.Seq, Msgid: old.Msgid, Dup: true, MemberSeq: g.memberSeq}, nil
		}
	}
	seq := f.appendLocked(g, m)
	return das.Appended{Seq: seq, Msgid: m.Msgid, MemberSeq: g.memberSeq}, nil
}

func (f *fakeGroups) GroupPage(_ context.Context, id uint64, after, upTo uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.groups[id]
	if g == nil {
		return nil, false, das.ErrGroupUnknown
	}
	if upTo == 0 || upTo > uint64(len(g.msgs)) {
		upTo = uint64(len(g.msgs))
	}
	var out []*pb.C2CMessage
	for s := after + 1; s <= upTo; s++ {
		if len(out) == limit {
			return out, true, nil
		}
		out = append(out, g.msgs[s-1])
	}
	return out, false, nil
}

func (f *fakeGroups) GroupCursors(_ context.Context, t das.Terminal, ids []uint64) ([]uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]uint64, len(ids))
	for i, id := range ids {
		out[i] = f.cursors[t][id]
	}
	return out, nil
}

func (f *fakeGroups) AckGroup(_ context.Context, t das.Terminal, id uint64, seq uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cursors[t] == nil {
		f.cursors[t] = map[uint64]uint64{}
	}
	f.cursors[t][id] = max(f.cursors[t][id], seq)
	return nil
}

func (f *fakeGroups) ForgetGroup(_ context.Context, u das.User, id uint64) error { return nil }

// recGate records the pushes logic makes to one gateway.
type recGate struct {
	mu     sync.Mutex
	calls  int
	frames map[uint64][]*pb.C2CMessage // conn -> group messages pushed to it
}

func (g *recGate) Kick(context.Context, uint64, *pb.Kickout, uint64) error { return nil }

func (g *recGate) Push(_ context.Context, conns []uint64, cmd schema.Cmd, _ uint32, _ uint64, body []byte, queued []bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.calls++
	if g.frames == nil {
		g.frames = map[uint64][]*pb.C2CMessage{}
	}
	var n pb.GroupNotify
	if cmd == schema.CmdGroupNotify {
		_ = proto.Unmarshal(body, &n)
	}
	for i, c := range conns {
		g.frames[c] = append(g.frames[c], n.Messages...)
		queued[i] = true
	}
	return nil
}

func (g *recGate) got(conn uint64) []*pb.C2CMessage {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.frames[conn]
}

type groupFixture struct {
	t     *testing.T
	s     *Service
	gs    *fakeGroups
	gates map[string]*recGate
	app   *App
	conn  uint64
}

func newGroupFixture(t *testing.T) *groupFixture {
	t.Helper()
	secret := []string{"0123456789abcdef0123"}
	gs := newFakeGroups()
	s, err := New(Options{Router: router.NewMemory(), GroupStore: gs, Groups: Groups{MaxSize: 5}, Apps: []App{
		{AppCode: 101, Account: 1, Secrets: secret, APIKeys: []string{"key-a-0123456789abcdef"}},
		{AppCode: 102, Account: 1, Secrets: secret},
		{AppCode: 201, Account: 2, Secrets: secret},
	}})
	if err != nil {
		t.Fatal(err)
	}
	f := &groupFixture{t: t, s: s, gs: gs, gates: map[string]*recGate{}, app: s.App(101)}
	for _, id := range []string{"gate-a", "gate-b"} {
		f.gates[id] = &recGate{}
		s.AttachGate(id, f.gates[id])
	}
	return f
}

// online registers a session of (appcode, uid) on gate and returns it.
func (f *groupFixture) online(gate string, account, appcode uint32, uid uint64) router.Session {
	f.t.Helper()
	f.conn++
	ss := router.Session{Account: account, AppCode: appcode, UID: uid, Gate: gate, Conn: f.conn, Epoch: f.conn}
	if _, err := f.s.router.Register(context.Background(), ss, 1); err != nil {
		f.t.Fatal(err)
	}
	return ss
}

func (f *groupFixture) send(sess router.Session, group uint64, content string) (*pb.C2CSendResponse, error) {
	body, _ := proto.Marshal(&pb.C2CSendRequest{GroupId: group, Content: []byte(content), ClientMsgId: content})
	out, err := f.s.Handle(context.Background(), sess, &schema.Header{Cmd: schema.CmdC2CSend, LogID: 7}, body)
	if err != nil {
		return nil, err
	}
	var resp pb.C2CSendResponse
	if err := proto.Unmarshal(out, &resp); err != nil {
		f.t.Fatal(err)
	}
	return &resp, nil
}

func (f *groupFixture) request(sess router.Session, cmd schema.Cmd, req, resp proto.Message) error {
	body, _ := proto.Marshal(req)
	out, err := f.s.Handle(context.Background(), sess, &schema.Header{Cmd: cmd}, body)
	if err != nil {
		return err
	}
	return proto.Unmarshal(out, resp)
}

func members(us ...uint64) []GroupMember {
	out := make([]GroupMember, len(us))
	for i, u := range us {
		out[i] = GroupMember{UID: u}
	}
	return out
}

func wantStatus(t *testing.T, err error, st schema.Status) {
	t.Helper()
	if got := statusOf(err); got != st {
		t.Fatalf("err %v (status %v), want %v", err, got, st)
	}
}

func statusOf(err error) schema.Status {
	if se, ok := err.(*schema.Error); ok {
		return se.Status
	}
	return 0
}

func contents(ms []*pb.C2CMessage) []string {
	var out []string
	for _, m := range ms {
		if m.Event == nil {
			out = append(out, string(m.Content))
		}
	}
	return out
}

// TestGroupFanOutOnePushPerGateway: a group message reaches every online
// terminal of its members, including the sender's other terminal and a
// member of another account system, with one Gate.Push per gateway, and
// not the sending terminal.
func TestGroupFanOutOnePushPerGateway(t *testing.T) {
	f := newGroupFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateGroup(ctx, f.app, 900, []GroupMember{{UID: 1}, {UID: 2}, {Account: 2, UID: 3}}, 1); err != nil {
		t.Fatal(err)
	}
	phone := f.online("gate-a", 1, 101, 1)
	pc := f.online("gate-b", 1, 102, 1)
	two := f.online("gate-a", 1, 101, 2)
	three := f.online("gate-b", 2, 201, 3)
	outsider := f.online("gate-a", 1, 101, 4)
	callsA, callsB := f.gates["gate-a"].calls, f.gates["gate-b"].calls

	resp, err := f.send(phone, 900, "hello")
	if err != nil {
		t.Fatal(err)
	}
	if resp.Seq != 2 { // 1 is the CREATED event
		t.Fatalf("seq %d, want 2", resp.Seq)
	}
	if a, b := f.gates["gate-a"].calls-callsA, f.gates["gate-b"].calls-callsB; a != 1 || b != 1 {
		t.Fatalf("pushes per gateway: a %d, b %d; want one each", a, b)
	}
	for _, ss := range []router.Session{pc, two, three} {
		if got := contents(f.gates[ss.Gate].got(ss.Conn)); !slices.Equal(got, []string{"hello"}) {
			t.Fatalf("uid %d appcode %d got %q", ss.UID, ss.AppCode, got)
		}
	}
	if got := f.gates["gate-a"].got(phone.Conn); len(contents(got)) != 0 {
		t.Fatalf("the sending terminal got its own message: %v", got)
	}
	if got := f.gates["gate-a"].got(outsider.Conn); len(got) != 0 {
		t.Fatalf("a non-member got %v", got)
	}
	// A retry with the same client message id: the same seq, no new one.
	again, err := f.send(phone, 900, "hello")
	if err != nil || again.Seq != 2 || !again.Duplicate || again.Msgid != resp.Msgid {
		t.Fatalf("retry: %+v %v", again, err)
	}
}

// TestGroupSendRefusals: a non-member, an unknown and a dissolved group
// get their statuses, and nothing is stored.
func TestGroupSendRefusals(t *testing.T) {
	f := newGroupFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateGroup(ctx, f.app, 901, members(1, 2), 1); err != nil {
		t.Fatal(err)
	}
	_, err := f.send(f.online("gate-a", 1, 101, 9), 901, "x")
	wantStatus(t, err, schema.StatusNotMember)
	one := f.online("gate-a", 1, 101, 1)
	_, err = f.send(one, 4242, "x")
	wantStatus(t, err, schema.StatusUnknownGroup)
	if _, err := f.s.DissolveGroup(ctx, f.app, 901, 1); err != nil {
		t.Fatal(err)
	}
	_, err = f.send(one, 901, "x")
	wantStatus(t, err, schema.StatusUnknownGroup)
	_, err = f.s.CreateGroup(ctx, f.app, 902, members(1, 2, 3, 4, 5, 6), 1)
	wantStatus(t, err, schema.StatusGroupFull)
	if _, err := f.s.CreateGroup(ctx, f.app, 903, members(1), 1); err != nil {
		t.Fatal(err)
	}
	_, err = f.s.CreateGroup(ctx, f.app, 903, members(1), 1)
	wantStatus(t, err, schema.StatusGroupExists)
	_, err = f.s.AddGroupMembers(ctx, f.app, 903, members(2, 3, 4, 5, 6), 1)
	wantStatus(t, err, schema.StatusGroupFull)
	if g := f.gs.groups[901]; len(g.msgs) != 2 { // CREATED, DISSOLVED
		t.Fatalf("group 901 holds %d messages, want 2", len(g.msgs))
	}
}

// TestGroupStaleCacheReloads: a member added by another logic node (the
// store changed, this node's cache not invalidated) gets the next message:
// the append's membership version is newer than the cache's.
func TestGroupStaleCacheReloads(t *testing.T) {
	f := newGroupFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateGroup(ctx, f.app, 910, members(1, 2), 1); err != nil {
		t.Fatal(err)
	}
	one := f.online("gate-a", 1, 101, 1)
	if _, err := f.send(one, 910, "first"); err != nil {
		t.Fatal(err)
	}
	reads := f.gs.reads
	if _, err := f.send(one, 910, "cached"); err != nil {
		t.Fatal(err)
	}
	if f.gs.reads != reads {
		t.Fatalf("a second message read the members again (%d reads): the cache did not serve it", f.gs.reads-reads)
	}
	// Another node adds uid 3: straight into the store.
	ev := &pb.C2CMessage{Msgid: 99, From: &pb.User{}, To: &pb.User{}, GroupId: 910, Event: &pb.GroupEvent{Kind: pb.GroupEventKind_GROUP_EVENT_JOINED}}
	if _, _, err := f.gs.AddMembers(ctx, 910, []das.User{{Account: 1, UID: 3}}, 5, ev); err != nil {
		t.Fatal(err)
	}
	three := f.online("gate-b", 1, 101, 3)
	if _, err := f.send(one, 910, "after the join"); err != nil {
		t.Fatal(err)
	}
	if got := contents(f.gates["gate-b"].got(three.Conn)); !slices.Equal(got, []string{"after the join"}) {
		t.Fatalf("the member added elsewhere got %q", got)
	}
}

// TestGroupPullAndAckBounds: a member pulls from its join on and up to its
// removal; acks move the cursor forward only and not beyond what the member
// may see; a non-member cannot pull or ack.
func TestGroupPullAndAckBounds(t *testing.T) {
	f := newGroupFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateGroup(ctx, f.app, 920, members(1, 2), 1); err != nil {
		t.Fatal(err)
	}
	one := f.online("gate-a", 1, 101, 1)
	f.send(one, 920, "before")                             // seq 2
	f.s.AddGroupMembers(ctx, f.app, 920, members(3), 1)    // seq 3
	f.send(one, 920, "while 3 is in")                      // seq 4
	f.s.RemoveGroupMembers(ctx, f.app, 920, members(3), 1) // seq 5
	f.send(one, 920, "after 3 left")                       // seq 6
	three := f.online("gate-b", 1, 101, 3)

	var page pb.GroupPullResponse
	if err := f.request(three, schema.CmdGroupPull, &pb.GroupPullRequest{GroupId: 920}, &page); err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for _, m := range page.Messages {
		seqs = append(seqs, m.Seq)
	}
	if !slices.Equal(seqs, []uint64{3, 4, 5}) || page.HeadSeq != 5 || page.More {
		t.Fatalf("uid 3 pulled seqs %v head %d more %v; want 3, 4, 5 (its join to its removal)", seqs, page.HeadSeq, page.More)
	}
	var ack pb.GroupAckResponse
	err := f.request(three, schema.CmdGroupAck, &pb.GroupAckRequest{Cursors: []*pb.GroupCursor{{GroupId: 920, Seq: 6}}}, &ack)
	wantStatus(t, err, schema.StatusBadArgument)
	if err := f.request(three, schema.CmdGroupAck, &pb.GroupAckRequest{Cursors: []*pb.GroupCursor{{GroupId: 920, Seq: 4}}}, &ack); err != nil {
		t.Fatal(err)
	}
	if err := f.request(three, schema.CmdGroupAck, &pb.GroupAckRequest{Cursors: []*pb.GroupCursor{{GroupId: 920, Seq: 3}}}, &ack); err != nil {
		t.Fatal(err)
	}
	var sync pb.GroupSyncResponse
	if err := f.request(three, schema.CmdGroupSync, &pb.GroupSyncRequest{}, &sync); err != nil {
		t.Fatal(err)
	}
	if len(sync.Groups) != 1 || sync.Groups[0].AckedSeq != 4 || sync.Groups[0].HeadSeq != 5 || sync.Groups[0].LeftSeq != 5 || sync.Groups[0].JoinSeq != 3 {
		t.Fatalf("sync of uid 3: %v; want cursor 4 (never backwards), head 5, join 3, left 5", sync.Groups)
	}
	// Acked to its removal: the group leaves this terminal's sync.
	if err := f.request(three, schema.CmdGroupAck, &pb.GroupAckRequest{Cursors: []*pb.GroupCursor{{GroupId: 920, Seq: 5}}}, &ack); err != nil {
		t.Fatal(err)
	}
	if err := f.request(three, schema.CmdGroupSync, &pb.GroupSyncRequest{}, &sync); err != nil || len(sync.Groups) != 0 {
		t.Fatalf("sync after acking to the removal: %v %v; want no group", sync.Groups, err)
	}
	outsider := f.online("gate-a", 1, 101, 8)
	wantStatus(t, f.request(outsider, schema.CmdGroupPull, &pb.GroupPullRequest{GroupId: 920}, &page), schema.StatusNotMember)
	wantStatus(t, f.request(outsider, schema.CmdGroupAck, &pb.GroupAckRequest{Cursors: []*pb.GroupCursor{{GroupId: 920, Seq: 1}}}, &ack), schema.StatusNotMember)
	wantStatus(t, f.request(one, schema.CmdGroupPull, &pb.GroupPullRequest{GroupId: 920, PageSize: 100000}, &page), schema.StatusBadArgument)
}

// TestGroupRemovedMemberGetsNothingAfter: the removal event reaches the
// removed member; later messages do not.
func TestGroupRemovedMemberGetsNothingAfter(t *testing.T) {
	f := newGroupFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateGroup(ctx, f.app, 930, members(1, 2), 1); err != nil {
		t.Fatal(err)
	}
	one := f.online("gate-a", 1, 101, 1)
	two := f.online("gate-b", 1, 101, 2)
	f.send(one, 930, "before")
	if _, err := f.s.RemoveGroupMembers(ctx, f.app, 930, members(2), 1); err != nil {
		t.Fatal(err)
	}
	f.send(one, 930, "after")
	got := f.gates["gate-b"].got(two.Conn)
	var kinds []string
	for _, m := range got {
		if m.Event != nil {
			kinds = append(kinds, m.Event.Kind.String())
		} else {
			kinds = append(kinds, string(m.Content))
		}
	}
	if !slices.Equal(kinds, []string{"before", "GROUP_EVENT_LEFT"}) {
		t.Fatalf("the removed member got %q", kinds)
	}
}
