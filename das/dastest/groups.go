package dastest

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// RunGroups is the conformance suite of das.GroupStore. open returns a
// store for one subtest and arranges (with t.Cleanup) to close it; it may
// return the same database each time, since every subtest uses group ids
// and users of its own (random, as Run's fixtures do). If the store has a
// Close method, the GroupClosed subtest calls it before the cleanup does,
// so it must be idempotent.
//
// Like Run, the suite counts: every check of a group's stream reads the
// whole stream and compares it message for message with what was stored,
// so a gap, a duplicate or a reordered seq fails it.
func RunGroups(t *testing.T, open func(t *testing.T) das.GroupStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, g *gfixture)
	}{
		{"GroupCreate", testGroupCreate},
		{"GroupAppend", testGroupAppend},
		{"GroupIdempotentRetry", testGroupIdempotent},
		{"GroupConcurrentAppends", testGroupConcurrent},
		{"GroupAddRemoveMembers", testGroupMembership},
		{"GroupDissolve", testGroupDissolve},
		{"GroupUserGroupsForget", testGroupUserGroups},
		{"GroupPage", testGroupPage},
		{"GroupCursors", testGroupCursors},
		{"GroupCanceledContext", testGroupCanceled},
		{"GroupClosed", testGroupClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newGroupFixture(t, open)) })
	}
}

// gfixture is one subtest's store, with users and group ids no other
// subtest uses.
type gfixture struct {
	t   *testing.T
	s   das.GroupStore
	ctx context.Context
	acc uint32
	uid uint64
	n   int
}

func newGroupFixture(t *testing.T, open func(t *testing.T) das.GroupStore) *gfixture {
	t.Helper()
	return &gfixture{
		t:   t,
		s:   open(t),
		ctx: context.Background(),
		acc: 1 + rand.Uint32N(1<<20),
		uid: rand.Uint64N(1<<50) + 1,
	}
}

func (g *gfixture) user() das.User {
	g.n++
	return das.User{Account: g.acc, UID: g.uid + uint64(g.n)}
}

// groupID returns a fresh random group id. It stays below 2^62, so that
// engines storing ids as signed 64-bit integers need no special case.
func (g *gfixture) groupID() uint64 { return rand.Uint64N(1<<62) + 1 }

// cmid returns a client message id no other call returns.
func (g *gfixture) cmid() string {
	g.n++
	return fmt.Sprintf("gcm-%d-%d", g.uid, g.n)
}

func pbUsers(us []das.User) []*pb.User {
	out := make([]*pb.User, len(us))
	for i, u := range us {
		out[i] = pbUser(u)
	}
	return out
}

// event returns an event message of group id as logic builds it: a fresh
// msgid, the zero user as sender and recipient, and no seq.
func event(id uint64, kind pb.GroupEventKind, users ...das.User) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:    NewMsgid(),
		From:     &pb.User{},
		To:       &pb.User{},
		GroupId:  id,
		SentAtMs: time.Now().UnixMilli(),
		Event:    &pb.GroupEvent{Kind: kind, Users: pbUsers(users), By: "dastest"},
	}
}

// gmsg returns a chat message of group id from terminal (from, app).
func gmsg(id uint64, from das.User, app uint32, cmid, content string) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       NewMsgid(),
		From:        pbUser(from),
		FromAppcode: app,
		To:          &pb.User{},
		GroupId:     id,
		Msgtype:     7,
		Content:     []byte(content),
		SentAtMs:    time.Now().UnixMilli(),
		ClientMsgId: cmid,
	}
}

// stored returns what m looks like once stored as seq (with users as
// the event's users when the store sets them).
func stored(m *pb.C2CMessage, seq uint64, users ...das.User) *pb.C2CMessage {
	c := proto.Clone(m).(*pb.C2CMessage)
	c.Seq = seq
	if users != nil {
		c.Event.Users = pbUsers(users)
	}
	return c
}

func (g *gfixture) create(id uint64, members []das.User, max int) *pb.C2CMessage {
	g.t.Helper()
	ev := event(id, pb.GroupEventKind_GROUP_EVENT_CREATED, members...)
	info, err := g.s.CreateGroup(g.ctx, id, members, max, proto.Clone(ev).(*pb.C2CMessage))
	if err != nil {
		g.t.Fatalf("CreateGroup(%d, %d members): %v", id, len(members), err)
	}
	want := das.GroupInfo{ID: id, Head: 1, MemberSeq: 1, Members: len(members)}
	if info != want {
		g.t.Fatalf("CreateGroup(%d) = %+v, want %+v", id, info, want)
	}
	return stored(ev, 1)
}

// send appends a new message from (from, app) and fails unless it is
// stored as seq with membership version memberSeq.
func (g *gfixture) send(id uint64, from das.User, app uint32, seq, memberSeq uint64) *pb.C2CMessage {
	g.t.Helper()
	m := gmsg(id, from, app, g.cmid(), fmt.Sprint("seq ", seq))
	got, err := g.s.AppendGroup(g.ctx, proto.Clone(m).(*pb.C2CMessage))
	if err != nil {
		g.t.Fatalf("AppendGroup(%d) from %v: %v", id, from, err)
	}
	want := das.Appended{Seq: seq, Msgid: m.Msgid, MemberSeq: memberSeq}
	if got != want {
		g.t.Fatalf("AppendGroup(%d) from %v = %+v, want %+v", id, from, got, want)
	}
	return stored(m, seq)
}

// wantErr fails unless err is target.
func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: %v, want %v", what, err, target)
	}
}

func (g *gfixture) info(id uint64) das.GroupInfo {
	g.t.Helper()
	info, err := g.s.Group(g.ctx, id)
	if err != nil {
		g.t.Fatalf("Group(%d): %v", id, err)
	}
	return info
}

func (g *gfixture) wantInfo(id uint64, want das.GroupInfo) {
	g.t.Helper()
	if got := g.info(id); got != want {
		g.t.Fatalf("Group(%d) = %+v, want %+v", id, got, want)
	}
}

func (g *gfixture) wantHead(id uint64, head uint64) {
	g.t.Helper()
	if got := g.info(id).Head; got != head {
		g.t.Fatalf("Group(%d).Head = %d, want %d", id, got, head)
	}
}

// wantMembers fails unless group id's members are exactly want (user ->
// JoinSeq) at membership version memberSeq.
func (g *gfixture) wantMembers(id uint64, memberSeq uint64, want map[das.User]uint64) {
	g.t.Helper()
	ms, v, err := g.s.Members(g.ctx, id)
	if err != nil {
		g.t.Fatalf("Members(%d): %v", id, err)
	}
	got := make(map[das.User]uint64, len(ms))
	for _, m := range ms {
		if _, dup := got[m.User]; dup {
			g.t.Fatalf("Members(%d): %v listed twice", id, m.User)
		}
		got[m.User] = m.JoinSeq
	}
	if v != memberSeq || !mapsEqual(got, want) {
		g.t.Fatalf("Members(%d) = %v at %d, want %v at %d", id, got, v, want, memberSeq)
	}
}

func mapsEqual[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// memberships returns u's memberships by group id.
func (g *gfixture) memberships(u das.User) map[uint64]das.Membership {
	g.t.Helper()
	ms, err := g.s.UserGroups(g.ctx, u)
	if err != nil {
		g.t.Fatalf("UserGroups(%v): %v", u, err)
	}
	out := make(map[uint64]das.Membership, len(ms))
	for _, m := range ms {
		if _, dup := out[m.GroupID]; dup {
			g.t.Fatalf("UserGroups(%v): group %d listed twice", u, m.GroupID)
		}
		out[m.GroupID] = m
	}
	return out
}

// wantMembership fails unless u's record of group id is (join, left);
// join 0 means u must have no record of it.
func (g *gfixture) wantMembership(u das.User, id, join, left uint64) {
	g.t.Helper()
	m, ok := g.memberships(u)[id]
	switch {
	case join == 0 && ok:
		g.t.Fatalf("UserGroups(%v) has group %d: %+v, want none", u, id, m)
	case join == 0:
	case !ok:
		g.t.Fatalf("UserGroups(%v) lacks group %d, want join %d left %d", u, id, join, left)
	case m != das.Membership{GroupID: id, JoinSeq: join, LeftSeq: left}:
		g.t.Fatalf("UserGroups(%v) group %d = %+v, want join %d left %d", u, id, m, join, left)
	}
}

func (g *gfixture) page(id, after, upTo uint64, limit int) ([]*pb.C2CMessage, bool) {
	g.t.Helper()
	msgs, more, err := g.s.GroupPage(g.ctx, id, after, upTo, limit)
	if err != nil {
		g.t.Fatalf("GroupPage(%d, %d, %d, %d): %v", id, after, upTo, limit, err)
	}
	return msgs, more
}

// stream reads group id's whole stream, limit at a time.
func (g *gfixture) stream(id uint64, limit int) []*pb.C2CMessage {
	g.t.Helper()
	var all []*pb.C2CMessage
	after := uint64(0)
	for {
		msgs, more := g.page(id, after, 0, limit)
		all = append(all, msgs...)
		if !more {
			return all
		}
		if len(msgs) == 0 {
			g.t.Fatalf("GroupPage(%d, %d): no messages but more", id, after)
		}
		after = msgs[len(msgs)-1].Seq
	}
}

// wantStream fails unless group id's stream is exactly want, in order,
// field for field (an event's users compared as a set), read in pages of
// 1, 3 and 100.
func (g *gfixture) wantStream(what string, id uint64, want ...*pb.C2CMessage) {
	g.t.Helper()
	for _, limit := range []int{1, 3, 100} {
		wantGroupMsgs(g.t, fmt.Sprintf("%s (pages of %d)", what, limit), g.stream(id, limit), want)
	}
}

func wantGroupMsgs(t *testing.T, what string, got, want []*pb.C2CMessage) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: got %d messages (seqs %v), want %d (seqs %v)", what, len(got), seqs(got), len(want), seqs(want))
	}
	for i := range got {
		if !proto.Equal(normEvent(got[i]), normEvent(want[i])) {
			t.Fatalf("%s: message %d = %v, want %v", what, i, got[i], want[i])
		}
	}
}

// normEvent returns m with its event's users sorted.
func normEvent(m *pb.C2CMessage) *pb.C2CMessage {
	if m.GetEvent() == nil {
		return m
	}
	c := proto.Clone(m).(*pb.C2CMessage)
	slices.SortFunc(c.Event.Users, func(a, b *pb.User) int {
		return cmp.Or(cmp.Compare(a.GetAccount(), b.GetAccount()), cmp.Compare(a.GetUid(), b.GetUid()))
	})
	return c
}

func seqs(msgs []*pb.C2CMessage) []uint64 {
	out := make([]uint64, len(msgs))
	for i, m := range msgs {
		out[i] = m.GetSeq()
	}
	return out
}

func usersSet(us []das.User) map[das.User]uint64 {
	m := make(map[das.User]uint64, len(us))
	for _, u := range us {
		m[u] = 1
	}
	return m
}

// wantUsers fails unless got holds exactly want, in any order, each once.
func wantUsers(t *testing.T, what string, got, want []das.User) {
	t.Helper()
	if len(got) != len(want) || !mapsEqual(usersSet(got), usersSet(want)) {
		t.Fatalf("%s: got users %v, want %v", what, got, want)
	}
}

// testGroupCreate: seq 1 is the CREATED event and every first member's
// join; ids are never reused; the size bound holds at creation, after
// duplicates are dropped.
func testGroupCreate(t *testing.T, g *gfixture) {
	a, b, c, d := g.user(), g.user(), g.user(), g.user()
	id := g.groupID()
	ev := g.create(id, []das.User{a, b, c}, 10)
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 1, MemberSeq: 1, Members: 3})
	g.wantMembers(id, 1, map[das.User]uint64{a: 1, b: 1, c: 1})
	g.wantStream("created", id, ev)
	for _, u := range []das.User{a, b, c} {
		g.wantMembership(u, id, 1, 0)
	}
	g.wantMembership(d, id, 0, 0)

	// The id is taken: nothing changes.
	_, err := g.s.CreateGroup(g.ctx, id, []das.User{d}, 10, event(id, pb.GroupEventKind_GROUP_EVENT_CREATED, d))
	wantErr(t, "CreateGroup of an existing id", err, das.ErrGroupExists)
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 1, MemberSeq: 1, Members: 3})
	g.wantMembers(id, 1, map[das.User]uint64{a: 1, b: 1, c: 1})
	g.wantStream("after a second create", id, ev)
	g.wantMembership(d, id, 0, 0)

	// Too many members: no group.
	full := g.groupID()
	_, err = g.s.CreateGroup(g.ctx, full, []das.User{a, b, c, d}, 3, event(full, pb.GroupEventKind_GROUP_EVENT_CREATED, a, b, c, d))
	wantErr(t, "CreateGroup over maxSize", err, das.ErrGroupFull)
	_, err = g.s.Group(g.ctx, full)
	wantErr(t, "Group after a full create", err, das.ErrGroupUnknown)
	g.wantMembership(a, full, 0, 0)
	_, err = g.s.AppendGroup(g.ctx, gmsg(full, a, 101, g.cmid(), "x"))
	wantErr(t, "AppendGroup to a group never created", err, das.ErrGroupUnknown)

	// Exactly maxSize once duplicates are dropped.
	dd := g.groupID()
	evd := event(dd, pb.GroupEventKind_GROUP_EVENT_CREATED, a, b, c)
	info, err := g.s.CreateGroup(g.ctx, dd, []das.User{a, b, a, c, b, c, a}, 3, proto.Clone(evd).(*pb.C2CMessage))
	if err != nil {
		t.Fatalf("CreateGroup with duplicates: %v", err)
	}
	if want := (das.GroupInfo{ID: dd, Head: 1, MemberSeq: 1, Members: 3}); info != want {
		t.Fatalf("CreateGroup with duplicates = %+v, want %+v", info, want)
	}
	g.wantMembers(dd, 1, map[das.User]uint64{a: 1, b: 1, c: 1})
	g.wantStream("created with duplicates", dd, stored(evd, 1))
	g.wantMembership(a, dd, 1, 0)

	// A group of one, at maxSize 1, takes messages.
	one := g.groupID()
	evo := g.create(one, []das.User{d}, 1)
	m := g.send(one, d, 101, 2, 1)
	g.wantStream("group of one", one, evo, m)
	g.wantInfo(one, das.GroupInfo{ID: one, Head: 2, MemberSeq: 1, Members: 1})

	// No member at all is refused.
	empty := g.groupID()
	if _, err := g.s.CreateGroup(g.ctx, empty, nil, 10, event(empty, pb.GroupEventKind_GROUP_EVENT_CREATED)); err == nil {
		t.Fatal("CreateGroup without members: no error")
	}
	_, err = g.s.Group(g.ctx, empty)
	wantErr(t, "Group after a create without members", err, das.ErrGroupUnknown)

	// A dissolved group keeps its id.
	if _, err := g.s.Dissolve(g.ctx, one, event(one, pb.GroupEventKind_GROUP_EVENT_DISSOLVED)); err != nil {
		t.Fatalf("Dissolve: %v", err)
	}
	_, err = g.s.CreateGroup(g.ctx, one, []das.User{a}, 10, event(one, pb.GroupEventKind_GROUP_EVENT_CREATED, a))
	wantErr(t, "CreateGroup of a dissolved group's id", err, das.ErrGroupExists)
	g.wantMembership(a, one, 0, 0)

	// Unknown groups.
	unknown := g.groupID()
	_, err = g.s.Group(g.ctx, unknown)
	wantErr(t, "Group(unknown)", err, das.ErrGroupUnknown)
}

// testGroupAppend: seqs follow each other without gaps, each message once,
// for members only, in known and living groups only.
func testGroupAppend(t *testing.T, g *gfixture) {
	a, b, c := g.user(), g.user(), g.user()
	id := g.groupID()
	want := []*pb.C2CMessage{g.create(id, []das.User{a, b}, 10)}
	want = append(want, g.send(id, a, 101, 2, 1))
	want = append(want, g.send(id, b, 102, 3, 1))
	want = append(want, g.send(id, a, 102, 4, 1))
	g.wantStream("three appends", id, want...)
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 4, MemberSeq: 1, Members: 2})

	// A larger group stores a message once, in its one stream, whatever
	// the number of members.
	big := g.groupID()
	var many []das.User
	for range 50 {
		many = append(many, g.user())
	}
	bigWant := []*pb.C2CMessage{g.create(big, many, 50)}
	bigWant = append(bigWant, g.send(big, many[17], 101, 2, 1))
	g.wantStream("group of 50", big, bigWant...)

	_, err := g.s.AppendGroup(g.ctx, gmsg(id, c, 101, g.cmid(), "not a member"))
	wantErr(t, "AppendGroup from a non-member", err, das.ErrNotMember)
	_, err = g.s.AppendGroup(g.ctx, gmsg(g.groupID(), a, 101, g.cmid(), "unknown"))
	wantErr(t, "AppendGroup to an unknown group", err, das.ErrGroupUnknown)
	g.wantStream("after refused appends", id, want...)

	seq, err := g.s.Dissolve(g.ctx, id, event(id, pb.GroupEventKind_GROUP_EVENT_DISSOLVED))
	if err != nil || seq != 5 {
		t.Fatalf("Dissolve = %d, %v; want 5", seq, err)
	}
	_, err = g.s.AppendGroup(g.ctx, gmsg(id, a, 101, g.cmid(), "dissolved"))
	wantErr(t, "AppendGroup to a dissolved group", err, das.ErrGroupUnknown)
	g.wantHead(id, 5)
}

// testGroupIdempotent: a retry (same sender terminal, same client id)
// returns the first seq and msgid and stores nothing; other ids, or the
// same id from another terminal, are new messages.
func testGroupIdempotent(t *testing.T, g *gfixture) {
	a, b := g.user(), g.user()
	id := g.groupID()
	want := []*pb.C2CMessage{g.create(id, []das.User{a, b}, 10)}

	m1 := gmsg(id, a, 101, "same", "first")
	got, err := g.s.AppendGroup(g.ctx, proto.Clone(m1).(*pb.C2CMessage))
	if err != nil || got != (das.Appended{Seq: 2, Msgid: m1.Msgid, MemberSeq: 1}) {
		t.Fatalf("first try = %+v, %v", got, err)
	}
	want = append(want, stored(m1, 2))
	retry := gmsg(id, a, 101, "same", "second try")
	got, err = g.s.AppendGroup(g.ctx, retry)
	if err != nil || got != (das.Appended{Seq: 2, Msgid: m1.Msgid, Dup: true, MemberSeq: 1}) {
		t.Fatalf("retry = %+v, %v; want seq 2, msgid %d, dup", got, err, m1.Msgid)
	}
	g.wantHead(id, 2)
	g.wantStream("after a retry", id, want...)

	// Two client ids of one terminal: two messages.
	m2 := gmsg(id, a, 101, g.cmid(), "two")
	m3 := gmsg(id, a, 101, g.cmid(), "three")
	for i, m := range []*pb.C2CMessage{m2, m3} {
		got, err := g.s.AppendGroup(g.ctx, proto.Clone(m).(*pb.C2CMessage))
		if err != nil || got.Dup || got.Seq != uint64(3+i) {
			t.Fatalf("client id %s = %+v, %v", m.ClientMsgId, got, err)
		}
		want = append(want, stored(m, uint64(3+i)))
	}
	// The same client id from another terminal of a, and from b.
	for i, m := range []*pb.C2CMessage{gmsg(id, a, 102, "same", "other terminal"), gmsg(id, b, 101, "same", "other user")} {
		got, err := g.s.AppendGroup(g.ctx, proto.Clone(m).(*pb.C2CMessage))
		if err != nil || got.Dup || got.Seq != uint64(5+i) {
			t.Fatalf("the same client id from another terminal = %+v, %v", got, err)
		}
		want = append(want, stored(m, uint64(5+i)))
	}
	got, err = g.s.AppendGroup(g.ctx, gmsg(id, a, 101, m2.ClientMsgId, "retry of two"))
	if err != nil || got != (das.Appended{Seq: 3, Msgid: m2.Msgid, Dup: true, MemberSeq: 1}) {
		t.Fatalf("retry of the second = %+v, %v", got, err)
	}
	// An empty client id is never a retry.
	for i := range 2 {
		m := gmsg(id, a, 101, "", "no client id")
		got, err := g.s.AppendGroup(g.ctx, proto.Clone(m).(*pb.C2CMessage))
		if err != nil || got.Dup || got.Seq != uint64(7+i) {
			t.Fatalf("without a client id = %+v, %v", got, err)
		}
		want = append(want, stored(m, uint64(7+i)))
	}
	g.wantStream("after retries", id, want...)
}

// testGroupConcurrent: many senders append at once, each message tried
// twice concurrently: every seq from 2 to N+1 is given exactly once, each
// message is stored once, and each sender's messages keep their order.
func testGroupConcurrent(t *testing.T, g *gfixture) {
	const senders, per = 8, 20
	var users []das.User
	for range senders {
		users = append(users, g.user())
	}
	id := g.groupID()
	ev := g.create(id, users, senders)
	type try struct {
		got das.Appended
		m   *pb.C2CMessage
		err error
	}
	results := make([][per][2]try, senders)
	var wg sync.WaitGroup
	for s := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				cmid := fmt.Sprintf("conc-%d-%d-%d", g.uid, s, i)
				var tries sync.WaitGroup
				for k := range 2 {
					tries.Add(1)
					go func() {
						defer tries.Done()
						m := gmsg(id, users[s], 101, cmid, fmt.Sprintf("sender %d message %d", s, i))
						got, err := g.s.AppendGroup(g.ctx, proto.Clone(m).(*pb.C2CMessage))
						results[s][i][k] = try{got, m, err}
					}()
				}
				// The next message of this sender starts once this
				// one is stored: its seq must be higher.
				tries.Wait()
			}
		}()
	}
	wg.Wait()

	bySeq := make(map[uint64]*pb.C2CMessage)
	for s := range senders {
		last := uint64(0)
		for i := range per {
			r := results[s][i]
			for _, x := range r {
				if x.err != nil {
					t.Fatalf("sender %d message %d: %v", s, i, x.err)
				}
			}
			if r[0].got.Seq != r[1].got.Seq || r[0].got.Msgid != r[1].got.Msgid || r[0].got.Dup == r[1].got.Dup {
				t.Fatalf("sender %d message %d: tries %+v and %+v, want one stored and one dup of it", s, i, r[0].got, r[1].got)
			}
			first := r[0]
			if first.got.Dup {
				first = r[1]
			}
			if first.got.Msgid != first.m.Msgid || first.got.MemberSeq != 1 {
				t.Fatalf("sender %d message %d: %+v for msgid %d", s, i, first.got, first.m.Msgid)
			}
			if first.got.Seq <= last {
				t.Fatalf("sender %d: message %d has seq %d after seq %d", s, i, first.got.Seq, last)
			}
			last = first.got.Seq
			if prev, ok := bySeq[last]; ok {
				t.Fatalf("seq %d given to msgids %d and %d", last, prev.Msgid, first.m.Msgid)
			}
			bySeq[last] = stored(first.m, last)
		}
	}
	want := []*pb.C2CMessage{ev}
	for seq := uint64(2); seq <= senders*per+1; seq++ {
		m, ok := bySeq[seq]
		if !ok {
			t.Fatalf("no message got seq %d", seq)
		}
		want = append(want, m)
	}
	g.wantStream("after concurrent appends", id, want...)
	g.wantHead(id, senders*per+1)
}

// testGroupMembership: joins and removals are events of the stream with
// the users the store actually added or removed; each append reports the
// membership version; a full group refuses a join whole.
func testGroupMembership(t *testing.T, g *gfixture) {
	a, b, c, d, e := g.user(), g.user(), g.user(), g.user(), g.user()
	id := g.groupID()
	want := []*pb.C2CMessage{g.create(id, []das.User{a}, 10)}

	add := func(users []das.User, max int, wantSeq uint64, wantAdded ...das.User) {
		t.Helper()
		ev := event(id, pb.GroupEventKind_GROUP_EVENT_JOINED)
		seq, added, err := g.s.AddMembers(g.ctx, id, users, max, proto.Clone(ev).(*pb.C2CMessage))
		if err != nil || seq != wantSeq {
			t.Fatalf("AddMembers(%v) = %d, %v; want seq %d", users, seq, err, wantSeq)
		}
		wantUsers(t, fmt.Sprintf("AddMembers(%v) added", users), added, wantAdded)
		if seq != 0 {
			want = append(want, stored(ev, seq, wantAdded...))
		}
	}
	remove := func(users []das.User, wantSeq uint64, wantRemoved ...das.User) {
		t.Helper()
		ev := event(id, pb.GroupEventKind_GROUP_EVENT_LEFT)
		seq, removed, err := g.s.RemoveMembers(g.ctx, id, users, proto.Clone(ev).(*pb.C2CMessage))
		if err != nil || seq != wantSeq {
			t.Fatalf("RemoveMembers(%v) = %d, %v; want seq %d", users, seq, err, wantSeq)
		}
		wantUsers(t, fmt.Sprintf("RemoveMembers(%v) removed", users), removed, wantRemoved)
		if seq != 0 {
			want = append(want, stored(ev, seq, wantRemoved...))
		}
	}

	// a is a member already and b is listed twice.
	add([]das.User{b, c, a, b}, 10, 2, b, c)
	g.wantMembers(id, 2, map[das.User]uint64{a: 1, b: 2, c: 2})
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 2, MemberSeq: 2, Members: 3})
	g.wantMembership(b, id, 2, 0)
	want = append(want, g.send(id, b, 101, 3, 2))

	// Nobody new: nothing recorded.
	add([]das.User{a, b}, 10, 0)
	g.wantHead(id, 3)

	// Over maxSize: nothing changes.
	_, _, err := g.s.AddMembers(g.ctx, id, []das.User{d, e}, 4, event(id, pb.GroupEventKind_GROUP_EVENT_JOINED))
	wantErr(t, "AddMembers over maxSize", err, das.ErrGroupFull)
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 3, MemberSeq: 2, Members: 3})
	g.wantMembers(id, 2, map[das.User]uint64{a: 1, b: 2, c: 2})
	g.wantMembership(d, id, 0, 0)
	_, err = g.s.AppendGroup(g.ctx, gmsg(id, d, 101, g.cmid(), "refused"))
	wantErr(t, "AppendGroup from a user a full group refused", err, das.ErrNotMember)

	// Up to maxSize exactly.
	add([]das.User{d}, 4, 4, d)
	want = append(want, g.send(id, d, 101, 5, 4))

	// e is not a member: only b is removed.
	remove([]das.User{b, e}, 6, b)
	g.wantMembers(id, 6, map[das.User]uint64{a: 1, c: 2, d: 4})
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 6, MemberSeq: 6, Members: 3})
	g.wantMembership(b, id, 2, 6)
	_, err = g.s.AppendGroup(g.ctx, gmsg(id, b, 101, g.cmid(), "gone"))
	wantErr(t, "AppendGroup from a removed member", err, das.ErrNotMember)
	want = append(want, g.send(id, a, 101, 7, 6))

	// Nobody to remove: nothing recorded.
	remove([]das.User{b, e}, 0)
	g.wantHead(id, 7)

	// b joins again, from the new seq.
	add([]das.User{b}, 10, 8, b)
	g.wantMembership(b, id, 8, 0)
	g.wantMembers(id, 8, map[das.User]uint64{a: 1, b: 8, c: 2, d: 4})
	want = append(want, g.send(id, b, 102, 9, 8))

	// Everybody leaves: the group stays, with no one to write.
	remove([]das.User{a, b, c, d}, 10, a, b, c, d)
	g.wantInfo(id, das.GroupInfo{ID: id, Head: 10, MemberSeq: 10})
	g.wantMembers(id, 10, map[das.User]uint64{})
	_, err = g.s.AppendGroup(g.ctx, gmsg(id, a, 101, g.cmid(), "empty"))
	wantErr(t, "AppendGroup to an empty group", err, das.ErrNotMember)
	add([]das.User{e}, 10, 11, e)
	want = append(want, g.send(id, e, 101, 12, 11))

	g.wantStream("membership changes", id, want...)

	unknown := g.groupID()
	_, _, err = g.s.AddMembers(g.ctx, unknown, []das.User{a}, 10, event(unknown, pb.GroupEventKind_GROUP_EVENT_JOINED))
	wantErr(t, "AddMembers to an unknown group", err, das.ErrGroupUnknown)
	_, _, err = g.s.RemoveMembers(g.ctx, unknown, []das.User{a}, event(unknown, pb.GroupEventKind_GROUP_EVENT_LEFT))
	wantErr(t, "RemoveMembers of an unknown group", err, das.ErrGroupUnknown)
	_, _, err = g.s.Members(g.ctx, unknown)
	wantErr(t, "Members of an unknown group", err, das.ErrGroupUnknown)
}

// testGroupDissolve: the DISSOLVED event is the last seq and every
// member's LeftSeq; afterwards the group takes nothing more but can still
// be read.
func testGroupDissolve(t *testing.T, g *gfixture) {
	a, b, c := g.user(), g.user(), g.user()
	id := g.groupID()
	want := []*pb.C2CMessage{g.create(id, []das.User{a, b, c}, 10)}
	want = append(want, g.send(id, a, 101, 2, 1))
	left := event(id, pb.GroupEventKind_GROUP_EVENT_LEFT)
	if seq, _, err := g.s.RemoveMembers(g.ctx, id, []das.User{c}, proto.Clone(left).(*pb.C2CMessage)); err != nil || seq != 3 {
		t.Fatalf("RemoveMembers = %d, %v", seq, err)
	}
	want = append(want, stored(left, 3, c))

	ev := event(id, pb.GroupEventKind_GROUP_EVENT_DISSOLVED)
	seq, err := g.s.Dissolve(g.ctx, id, proto.Clone(ev).(*pb.C2CMessage))
	if err != nil || seq != 4 {
		t.Fatalf("Dissolve = %d, %v; want 4", seq, err)
	}
	want = append(want, stored(ev, 4))
	info := g.info(id)
	if !info.Dissolved || info.Head != 4 || info.MemberSeq != 4 || info.ID != id {
		t.Fatalf("Group after Dissolve = %+v, want dissolved at head 4, member seq 4", info)
	}
	g.wantMembership(a, id, 1, 4)
	g.wantMembership(b, id, 1, 4)
	g.wantMembership(c, id, 1, 3)
	g.wantStream("dissolved", id, want...)

	_, err = g.s.AppendGroup(g.ctx, gmsg(id, a, 101, g.cmid(), "after"))
	wantErr(t, "AppendGroup after Dissolve", err, das.ErrGroupUnknown)
	_, err = g.s.Dissolve(g.ctx, id, event(id, pb.GroupEventKind_GROUP_EVENT_DISSOLVED))
	wantErr(t, "second Dissolve", err, das.ErrGroupUnknown)
	_, _, err = g.s.AddMembers(g.ctx, id, []das.User{c}, 10, event(id, pb.GroupEventKind_GROUP_EVENT_JOINED))
	wantErr(t, "AddMembers after Dissolve", err, das.ErrGroupUnknown)
	// Removing from a dissolved group changes nothing, whether the
	// engine says so with ErrGroupUnknown or with seq 0.
	if seq, removed, err := g.s.RemoveMembers(g.ctx, id, []das.User{a}, event(id, pb.GroupEventKind_GROUP_EVENT_LEFT)); err == nil && (seq != 0 || len(removed) != 0) {
		t.Fatalf("RemoveMembers after Dissolve = %d, %v", seq, removed)
	} else if err != nil && !errors.Is(err, das.ErrGroupUnknown) {
		t.Fatalf("RemoveMembers after Dissolve: %v", err)
	}
	g.wantHead(id, 4)
	g.wantMembership(a, id, 1, 4)
	g.wantStream("after refused changes", id, want...)

	unknown := g.groupID()
	_, err = g.s.Dissolve(g.ctx, unknown, event(unknown, pb.GroupEventKind_GROUP_EVENT_DISSOLVED))
	wantErr(t, "Dissolve of an unknown group", err, das.ErrGroupUnknown)
}

// testGroupUserGroups: a user's groups list current and ended memberships
// until ForgetGroup drops an ended one (with its cursors); ForgetGroup of a
// current membership changes nothing.
func testGroupUserGroups(t *testing.T, g *gfixture) {
	a, b := g.user(), g.user()
	member, removed, dissolved := g.groupID(), g.groupID(), g.groupID()
	for _, id := range []uint64{member, removed, dissolved} {
		g.create(id, []das.User{a, b}, 10)
	}
	if seq, _, err := g.s.RemoveMembers(g.ctx, removed, []das.User{a}, event(removed, pb.GroupEventKind_GROUP_EVENT_LEFT)); err != nil || seq != 2 {
		t.Fatalf("RemoveMembers = %d, %v", seq, err)
	}
	if seq, err := g.s.Dissolve(g.ctx, dissolved, event(dissolved, pb.GroupEventKind_GROUP_EVENT_DISSOLVED)); err != nil || seq != 2 {
		t.Fatalf("Dissolve = %d, %v", seq, err)
	}
	wantGroups := func(u das.User, want ...das.Membership) {
		t.Helper()
		got := g.memberships(u)
		w := make(map[uint64]das.Membership)
		for _, m := range want {
			w[m.GroupID] = m
		}
		if !mapsEqual(got, w) {
			t.Fatalf("UserGroups(%v) = %v, want %v", u, got, w)
		}
	}
	wantGroups(a, das.Membership{GroupID: member, JoinSeq: 1},
		das.Membership{GroupID: removed, JoinSeq: 1, LeftSeq: 2},
		das.Membership{GroupID: dissolved, JoinSeq: 1, LeftSeq: 2})
	wantGroups(b, das.Membership{GroupID: member, JoinSeq: 1},
		das.Membership{GroupID: removed, JoinSeq: 1},
		das.Membership{GroupID: dissolved, JoinSeq: 1, LeftSeq: 2})
	wantGroups(g.user())

	for _, id := range []uint64{member, removed, dissolved} {
		if err := g.s.AckGroup(g.ctx, term(a, 101), id, 1); err != nil {
			t.Fatalf("AckGroup: %v", err)
		}
	}
	for _, id := range []uint64{member, removed, dissolved, g.groupID()} {
		if err := g.s.ForgetGroup(g.ctx, a, id); err != nil {
			t.Fatalf("ForgetGroup(%d): %v", id, err)
		}
	}
	wantGroups(a, das.Membership{GroupID: member, JoinSeq: 1})
	cur, err := g.s.GroupCursors(g.ctx, term(a, 101), []uint64{member, removed, dissolved})
	if err != nil || !slices.Equal(cur, []uint64{1, 0, 0}) {
		t.Fatalf("cursors after ForgetGroup = %v, %v; want [1 0 0]", cur, err)
	}
	// b's records are its own.
	wantGroups(b, das.Membership{GroupID: member, JoinSeq: 1},
		das.Membership{GroupID: removed, JoinSeq: 1},
		das.Membership{GroupID: dissolved, JoinSeq: 1, LeftSeq: 2})

	// A forgotten group can be joined again.
	if seq, _, err := g.s.AddMembers(g.ctx, removed, []das.User{a}, 10, event(removed, pb.GroupEventKind_GROUP_EVENT_JOINED)); err != nil || seq != 3 {
		t.Fatalf("AddMembers after ForgetGroup = %d, %v", seq, err)
	}
	wantGroups(a, das.Membership{GroupID: member, JoinSeq: 1}, das.Membership{GroupID: removed, JoinSeq: 3})
}

// testGroupPage: after is exclusive, upTo inclusive (0: the head), pages
// are oldest first and more says whether the bound holds more.
func testGroupPage(t *testing.T, g *gfixture) {
	a := g.user()
	id := g.groupID()
	all := []*pb.C2CMessage{g.create(id, []das.User{a}, 10)}
	for seq := uint64(2); seq <= 10; seq++ {
		all = append(all, g.send(id, a, 101, seq, 1))
	}
	for _, tc := range []struct {
		after, upTo uint64
		limit       int
		from, to    uint64 // the seqs expected, inclusive; from > to: none
		more        bool
	}{
		{0, 0, 4, 1, 4, true},
		{4, 0, 4, 5, 8, true},
		{8, 0, 4, 9, 10, false},
		{0, 0, 10, 1, 10, false},
		{0, 0, 1000, 1, 10, false},
		{3, 6, 10, 4, 6, false},
		{3, 6, 2, 4, 5, true},
		{3, 6, 3, 4, 6, false},
		{5, 6, 1, 6, 6, false},
		{10, 0, 5, 1, 0, false},
		{20, 0, 5, 1, 0, false},
		{6, 6, 5, 1, 0, false},
		{7, 3, 5, 1, 0, false},
		{0, 100, 20, 1, 10, false},
		{8, 100, 1, 9, 9, true},
	} {
		msgs, more := g.page(id, tc.after, tc.upTo, tc.limit)
		var want []*pb.C2CMessage
		if tc.from <= tc.to {
			want = all[tc.from-1 : tc.to]
		}
		what := fmt.Sprintf("GroupPage(after %d, upTo %d, limit %d)", tc.after, tc.upTo, tc.limit)
		wantGroupMsgs(t, what, msgs, want)
		if more != tc.more {
			t.Fatalf("%s: more = %v, want %v", what, more, tc.more)
		}
	}
	for _, limit := range []int{0, -1} {
		_, _, err := g.s.GroupPage(g.ctx, id, 0, 0, limit)
		wantErr(t, fmt.Sprintf("GroupPage limit %d", limit), err, das.ErrInvalid)
	}
	// An unknown group has no messages; an engine may say so with
	// ErrGroupUnknown.
	msgs, more, err := g.s.GroupPage(g.ctx, g.groupID(), 0, 0, 10)
	if err != nil && !errors.Is(err, das.ErrGroupUnknown) || len(msgs) != 0 || more {
		t.Fatalf("GroupPage of an unknown group = %d messages, more %v, %v", len(msgs), more, err)
	}
}

// testGroupCursors: cursors are per terminal and group, 0 until acked, and
// never move backwards, even under concurrent acks.
func testGroupCursors(t *testing.T, g *gfixture) {
	a, b := g.user(), g.user()
	id, other := g.groupID(), g.groupID()
	g.create(id, []das.User{a, b}, 10)
	g.create(other, []das.User{a}, 10)
	cursors := func(tm das.Terminal, ids ...uint64) []uint64 {
		t.Helper()
		got, err := g.s.GroupCursors(g.ctx, tm, ids)
		if err != nil {
			t.Fatalf("GroupCursors(%v, %v): %v", tm, ids, err)
		}
		return got
	}
	ack := func(tm das.Terminal, gid, seq uint64) {
		t.Helper()
		if err := g.s.AckGroup(g.ctx, tm, gid, seq); err != nil {
			t.Fatalf("AckGroup(%v, %d, %d): %v", tm, gid, seq, err)
		}
	}
	want := func(tm das.Terminal, ids []uint64, want ...uint64) {
		t.Helper()
		if got := cursors(tm, ids...); !slices.Equal(got, want) {
			t.Fatalf("GroupCursors(%v, %v) = %v, want %v", tm, ids, got, want)
		}
	}
	unknown := g.groupID()
	want(term(a, 101), []uint64{id, other, unknown}, 0, 0, 0)
	if got := cursors(term(a, 101)); len(got) != 0 {
		t.Fatalf("GroupCursors of no group = %v", got)
	}

	ack(term(a, 101), id, 3)
	want(term(a, 101), []uint64{id, other}, 3, 0)
	ack(term(a, 101), id, 2) // backwards: ignored
	want(term(a, 101), []uint64{id}, 3)
	ack(term(a, 101), id, 3)
	ack(term(a, 101), id, 5)
	ack(term(a, 101), other, 1)
	want(term(a, 101), []uint64{other, id, other}, 1, 5, 1)

	// Another appcode of a, and another user, have cursors of their own.
	want(term(a, 102), []uint64{id, other}, 0, 0)
	ack(term(a, 102), id, 1)
	want(term(a, 102), []uint64{id}, 1)
	want(term(a, 101), []uint64{id}, 5)
	want(term(b, 101), []uint64{id}, 0)

	// Concurrent acks of one terminal end at the highest.
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10 {
				if err := g.s.AckGroup(g.ctx, term(b, 103), id, uint64(1+(w*10+i*7)%80)); err != nil {
					t.Errorf("AckGroup: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	want(term(b, 103), []uint64{id}, 80)
}

// testGroupCanceled: calls with a canceled context fail and store nothing.
func testGroupCanceled(t *testing.T, g *gfixture) {
	a := g.user()
	id := g.groupID()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := g.s.CreateGroup(ctx, id, []das.User{a}, 10, event(id, pb.GroupEventKind_GROUP_EVENT_CREATED, a)); err == nil {
		t.Fatal("CreateGroup with a canceled context: no error")
	}
	_, err := g.s.Group(g.ctx, id)
	wantErr(t, "Group after a canceled create", err, das.ErrGroupUnknown)

	ev := g.create(id, []das.User{a}, 10)
	if _, err := g.s.AppendGroup(ctx, gmsg(id, a, 101, g.cmid(), "x")); err == nil {
		t.Fatal("AppendGroup with a canceled context: no error")
	}
	if _, err := g.s.Group(ctx, id); err == nil {
		t.Fatal("Group with a canceled context: no error")
	}
	if _, _, err := g.s.GroupPage(ctx, id, 0, 0, 10); err == nil {
		t.Fatal("GroupPage with a canceled context: no error")
	}
	g.wantStream("after canceled calls", id, ev)
}

// testGroupClosed: after Close (when the engine has one) every call
// returns das.ErrClosed.
func testGroupClosed(t *testing.T, g *gfixture) {
	closer, ok := g.s.(interface{ Close() error })
	if !ok {
		t.Skip("the store has no Close")
	}
	a := g.user()
	id := g.groupID()
	g.create(id, []das.User{a}, 10)
	if err := closer.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := closer.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	check := func(what string, err error) {
		t.Helper()
		wantErr(t, what+" after Close", err, das.ErrClosed)
	}
	id2 := g.groupID()
	_, err := g.s.CreateGroup(g.ctx, id2, []das.User{a}, 10, event(id2, pb.GroupEventKind_GROUP_EVENT_CREATED, a))
	check("CreateGroup", err)
	_, err = g.s.AppendGroup(g.ctx, gmsg(id, a, 101, g.cmid(), "x"))
	check("AppendGroup", err)
	_, _, err = g.s.AddMembers(g.ctx, id, []das.User{g.user()}, 10, event(id, pb.GroupEventKind_GROUP_EVENT_JOINED))
	check("AddMembers", err)
	_, _, err = g.s.RemoveMembers(g.ctx, id, []das.User{a}, event(id, pb.GroupEventKind_GROUP_EVENT_LEFT))
	check("RemoveMembers", err)
	_, err = g.s.Dissolve(g.ctx, id, event(id, pb.GroupEventKind_GROUP_EVENT_DISSOLVED))
	check("Dissolve", err)
	_, err = g.s.Group(g.ctx, id)
	check("Group", err)
	_, _, err = g.s.Members(g.ctx, id)
	check("Members", err)
	_, err = g.s.UserGroups(g.ctx, a)
	check("UserGroups", err)
	_, _, err = g.s.GroupPage(g.ctx, id, 0, 0, 10)
	check("GroupPage", err)
	_, err = g.s.GroupCursors(g.ctx, term(a, 101), []uint64{id})
	check("GroupCursors", err)
	check("AckGroup", g.s.AckGroup(g.ctx, term(a, 101), id, 1))
	check("ForgetGroup", g.s.ForgetGroup(g.ctx, a, id))
}
