package dastest

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// ConvStore is what RunConv tests: an engine's store with its
// conversation list. It is an alias, so that open may be declared with
// the interface literal.
type ConvStore = interface {
	das.Store
	das.ConvStore
}

// RunConv is the conformance suite of das.ConvStore. open returns a store
// for one subtest and arranges (with t.Cleanup) to close it; it may return
// the same database each time, since every subtest uses users of its own.
// The messages are stored with PutC2C, so the suite also checks that
// PutC2C keeps the summaries of both sides.
func RunConv(t *testing.T, open func(t *testing.T) ConvStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, f *cfixture)
	}{
		{"ConvTwoWay", testConvTwoWay},
		{"ConvMarksForwardOnly", testConvMarksForward},
		{"ConvConcurrentPuts", testConvConcurrent},
		{"ConvNoteToSelf", testConvNoteToSelf},
		{"ConvManyWithUnreadFilter", testConvMany},
		{"ConvUnreadCap", testConvUnreadCap},
		{"ConvGroupReads", testConvGroupReads},
		{"ConvInvalidAndCanceled", testConvInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			tc.fn(t, &cfixture{fixture: &fixture{
				t:   t,
				s:   s,
				ctx: context.Background(),
				acc: 1 + rand.Uint32N(1<<20),
				uid: rand.Uint64N(1<<50) + 1,
			}, cs: s})
		})
	}
}

type cfixture struct {
	*fixture
	cs ConvStore
}

// convs returns u's conversations by peer, failing on an error or a peer
// listed twice.
func (f *cfixture) convs(u das.User, withUnread func(das.ConvSummary) bool) map[das.User]das.ConvSummary {
	f.t.Helper()
	list, err := f.cs.Conversations(f.ctx, u, withUnread)
	if err != nil {
		f.t.Fatalf("Conversations(%v): %v", u, err)
	}
	out := make(map[das.User]das.ConvSummary, len(list))
	for _, c := range list {
		if _, dup := out[c.Peer]; dup {
			f.t.Fatalf("Conversations(%v): peer %v listed twice", u, c.Peer)
		}
		out[c.Peer] = c
	}
	return out
}

// wantConv checks u's summary of the conversation with peer: its newest
// message, read mark and unread count.
func (f *cfixture) wantConv(u, peer das.User, last *pb.C2CMessage, read uint64, unread int) {
	f.t.Helper()
	c, ok := f.convs(u, nil)[peer]
	if !ok {
		f.t.Fatalf("Conversations(%v): no conversation with %v", u, peer)
	}
	if !proto.Equal(c.Last, last) {
		f.t.Fatalf("%v's conversation with %v: last %v, want %v", u, peer, c.Last, last)
	}
	if c.Read != read || c.Unread != unread {
		f.t.Fatalf("%v's conversation with %v: read %d unread %d, want read %d unread %d", u, peer, c.Read, c.Unread, read, unread)
	}
}

func (f *cfixture) markRead(u, peer das.User, upTo, want uint64) {
	f.t.Helper()
	got, err := f.cs.MarkRead(f.ctx, u, peer, upTo)
	if err != nil || got != want {
		f.t.Fatalf("MarkRead(%v, %v, %d) = %d, %v; want %d", u, peer, upTo, got, err, want)
	}
}

// testConvTwoWay: two users chat in both directions; each side's summary
// has the newest message and counts the other's messages after its read
// mark, before and after MarkRead; a user of another account system with
// the same uid is another conversation.
func testConvTwoWay(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	if got := f.convs(a, nil); len(got) != 0 {
		t.Fatalf("new user's conversations: %v", got)
	}
	f.send(a, b, "a1", 101)
	a2 := f.send(a, b, "a2", 101)
	f.send(b, a, "b1", 101)
	a3 := f.send(a, b, "a3", 101)
	f.wantConv(a, b, a3, 0, 1)
	f.wantConv(b, a, a3, 0, 3)
	if n := len(f.convs(a, nil)); n != 1 {
		t.Fatalf("a has %d conversations, want 1", n)
	}

	f.markRead(b, a, a2.Msgid, a2.Msgid)
	f.wantConv(b, a, a3, a2.Msgid, 1)
	f.wantConv(a, b, a3, 0, 1) // b's mark is b's
	b2 := f.send(b, a, "b2", 101)
	f.wantConv(a, b, b2, 0, 2)
	f.wantConv(b, a, b2, a2.Msgid, 1) // b's own message is not unread for b
	f.markRead(a, b, b2.Msgid, b2.Msgid)
	f.wantConv(a, b, b2, b2.Msgid, 0)
	f.markRead(b, a, b2.Msgid, b2.Msgid)
	f.wantConv(b, a, b2, b2.Msgid, 0)

	// Same uid, another account system: another conversation.
	b9 := f.userIn(b, f.acc+1)
	x := f.send(b9, a, "from the other b", 101)
	got := f.convs(a, nil)
	if len(got) != 2 || got[b9].Last.GetMsgid() != x.Msgid || got[b].Last.GetMsgid() != b2.Msgid || got[b9].Unread != 1 {
		t.Fatalf("a's conversations with b and b9: %v", got)
	}
	if n := len(f.convs(b9, nil)); n != 1 {
		t.Fatalf("b9 has %d conversations, want 1", n)
	}
}

// testConvMarksForward: a read mark never moves back; MarkRead returns the
// mark now; Conversations shows it.
func testConvMarksForward(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	m1 := f.send(b, a, "1", 101)
	m2 := f.send(b, a, "2", 101)
	m3 := f.send(b, a, "3", 101)
	f.markRead(a, b, 0, 0)
	f.markRead(a, b, m2.Msgid, m2.Msgid)
	f.markRead(a, b, m1.Msgid, m2.Msgid)
	f.markRead(a, b, 0, m2.Msgid)
	f.markRead(a, b, m2.Msgid, m2.Msgid)
	f.wantConv(a, b, m3, m2.Msgid, 1)
	f.markRead(a, b, m3.Msgid, m3.Msgid)
	f.markRead(a, b, m1.Msgid, m3.Msgid)
	f.wantConv(a, b, m3, m3.Msgid, 0)

	// A mark of a conversation without messages is kept, and does not
	// make it a conversation.
	d := f.user()
	early := NewMsgid()
	f.markRead(a, d, early, early)
	f.markRead(a, d, early-1, early)
	if _, ok := f.convs(a, nil)[d]; ok {
		t.Fatal("a read mark alone is listed as a conversation")
	}
	m4 := f.send(d, a, "4", 101)
	f.wantConv(a, d, m4, early, 1)

	// Concurrent marks of one conversation: the highest wins.
	c := f.user()
	var ids []uint64
	for i := range 12 {
		ids = append(ids, f.send(c, a, string(rune('a'+i)), 101).Msgid)
	}
	var wg sync.WaitGroup
	for _, i := range rand.Perm(len(ids)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := f.cs.MarkRead(f.ctx, a, c, ids[i])
			if err != nil || got < ids[i] {
				t.Errorf("MarkRead(%d) = %d, %v", ids[i], got, err)
			}
		}()
	}
	wg.Wait()
	if c := f.convs(a, nil)[c]; c.Read != ids[len(ids)-1] || c.Unread != 0 {
		t.Fatalf("after concurrent marks: read %d unread %d, want %d, 0", c.Read, c.Unread, ids[len(ids)-1])
	}
}

// testConvConcurrent: several goroutines store the messages of one
// conversation in both directions at once, in no particular msgid order;
// the newest msgid is the summary's last message on both sides.
func testConvConcurrent(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	const writers, each = 8, 12
	var msgs []*pb.C2CMessage
	for i := range writers * each {
		from, to := a, b
		if i%3 == 0 {
			from, to = b, a
		}
		msgs = append(msgs, newMsg(from, 101, to, "", string(rune('A'+i%26))))
	}
	newest := msgs[len(msgs)-1]
	order := rand.Perm(len(msgs))
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, i := range order[w*each : (w+1)*each] {
				if _, _, err := f.cs.PutC2C(f.ctx, msgs[i], []uint32{101}, nil); err != nil {
					t.Errorf("PutC2C(%d): %v", msgs[i].Msgid, err)
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	fromB := 0
	for i := range msgs {
		if i%3 == 0 {
			fromB++
		}
	}
	f.wantConv(a, b, newest, 0, fromB)
	f.wantConv(b, a, newest, 0, len(msgs)-fromB)
}

// testConvNoteToSelf: a note to oneself is one conversation with oneself,
// never unread.
func testConvNoteToSelf(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	f.send(a, a, "note 1", 101)
	n2 := f.send(a, a, "note 2", 101)
	x := f.send(b, a, "hello", 101)
	got := f.convs(a, nil)
	if len(got) != 2 {
		t.Fatalf("a's conversations: %v, want a and b", got)
	}
	f.wantConv(a, a, n2, 0, 0)
	f.wantConv(a, b, x, 0, 1)
	f.markRead(a, a, n2.Msgid, n2.Msgid)
	f.wantConv(a, a, n2, n2.Msgid, 0)
	if _, ok := f.convs(b, nil)[b]; ok {
		t.Fatal("b has a conversation with itself")
	}
}

// testConvMany: one user with 200 conversations; withUnread selects the
// conversations whose unread count is computed, the others have -1.
func testConvMany(t *testing.T, f *cfixture) {
	a := f.user()
	const n = 200
	peers := make([]das.User, n)
	for i := range peers {
		peers[i] = f.user()
	}
	last := make([]*pb.C2CMessage, n)
	fromPeer := make([]int, n)
	read := make([]uint64, n)
	var wg sync.WaitGroup
	next := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				// i%4 messages from the peer, then one from a when i is
				// odd.
				var m *pb.C2CMessage
				for range i % 4 {
					m = newMsg(peers[i], 101, a, "", "from peer")
					if _, _, err := f.cs.PutC2C(f.ctx, m, []uint32{101}, nil); err != nil {
						t.Error(err)
						return
					}
				}
				if i%2 == 1 || m == nil {
					m = newMsg(a, 101, peers[i], "", "from a")
					if _, _, err := f.cs.PutC2C(f.ctx, m, []uint32{101}, nil); err != nil {
						t.Error(err)
						return
					}
				}
				last[i], fromPeer[i] = m, i%4
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	check := func(got map[das.User]das.ConvSummary, selected func(i int) bool) {
		t.Helper()
		if len(got) != n {
			t.Fatalf("%d conversations, want %d", len(got), n)
		}
		for i, p := range peers {
			c := got[p]
			want := -1
			if selected(i) {
				want = fromPeer[i]
			}
			if !proto.Equal(c.Last, last[i]) || c.Unread != want || c.Read != read[i] {
				t.Fatalf("conversation with peer %d: last %d unread %d read %d; want last %d unread %d read %d",
					i, c.Last.GetMsgid(), c.Unread, c.Read, last[i].Msgid, want, read[i])
			}
		}
	}
	check(f.convs(a, nil), func(int) bool { return true })

	// withUnread sees each summary with its peer, last message and read
	// mark, once.
	if _, err := f.cs.MarkRead(f.ctx, a, peers[42], last[42].Msgid); err != nil {
		t.Fatal(err)
	}
	pick := map[das.User]int{peers[3]: 3, peers[42]: 42, peers[199]: 199}
	fromPeer[42], read[42] = 0, last[42].Msgid
	seen := map[das.User]bool{}
	var mu sync.Mutex
	check(f.convs(a, func(c das.ConvSummary) bool {
		mu.Lock()
		defer mu.Unlock()
		i, ok := pick[c.Peer]
		if seen[c.Peer] {
			t.Errorf("withUnread called twice for %v", c.Peer)
		}
		seen[c.Peer] = true
		if ok && (!proto.Equal(c.Last, last[i]) || (i == 42) != (c.Read == last[i].Msgid) || c.Unread != -1) {
			t.Errorf("withUnread got peer %d with last %d read %d unread %d", i, c.Last.GetMsgid(), c.Read, c.Unread)
		}
		return ok
	}), func(i int) bool { _, ok := pick[peers[i]]; return ok })
	if len(seen) != n {
		t.Fatalf("withUnread called for %d conversations, want all %d", len(seen), n)
	}
	check(f.convs(a, func(das.ConvSummary) bool { return false }), func(int) bool { return false })

	// Each peer sees one conversation, with a.
	for _, i := range []int{0, 3, 199} {
		got := f.convs(peers[i], nil)
		if len(got) != 1 || !proto.Equal(got[a].Last, last[i]) {
			t.Fatalf("peer %d's conversations: %v", i, got)
		}
	}
}

// testConvUnreadCap: unread counts stop at das.MaxUnread.
func testConvUnreadCap(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	total := das.MaxUnread + 5
	msgs := make([]*pb.C2CMessage, total)
	for i := range msgs {
		msgs[i] = newMsg(b, 101, a, "", "x")
	}
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < total; i += 16 {
				if _, _, err := f.cs.PutC2C(f.ctx, msgs[i], nil, nil); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	last := msgs[total-1]
	f.wantConv(a, b, last, 0, das.MaxUnread)
	// total-5 = MaxUnread messages after msgs[4]; one fewer after msgs[5].
	f.markRead(a, b, msgs[4].Msgid, msgs[4].Msgid)
	f.wantConv(a, b, last, msgs[4].Msgid, das.MaxUnread)
	f.markRead(a, b, msgs[5].Msgid, msgs[5].Msgid)
	f.wantConv(a, b, last, msgs[5].Msgid, das.MaxUnread-1)
	f.markRead(a, b, msgs[total-3].Msgid, msgs[total-3].Msgid)
	f.wantConv(a, b, last, msgs[total-3].Msgid, 2)
	f.wantConv(b, a, last, 0, 0) // b sent them all
}

// testConvGroupReads: group read marks move forward only and are answered
// in the order asked, 0 for groups without one.
func testConvGroupReads(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	g1, g2, g3 := rand.Uint64N(1<<62)+1, rand.Uint64N(1<<62)+1, rand.Uint64N(1<<62)+1
	reads := func(u das.User, ids ...uint64) []uint64 {
		t.Helper()
		got, err := f.cs.GroupReads(f.ctx, u, ids)
		if err != nil {
			t.Fatalf("GroupReads: %v", err)
		}
		return got
	}
	mark := func(u das.User, id, seq, want uint64) {
		t.Helper()
		got, err := f.cs.MarkGroupRead(f.ctx, u, id, seq)
		if err != nil || got != want {
			t.Fatalf("MarkGroupRead(%d, %d) = %d, %v; want %d", id, seq, got, err, want)
		}
	}
	if got := reads(a, g1, g2); !slices.Equal(got, []uint64{0, 0}) {
		t.Fatalf("GroupReads before any mark: %v", got)
	}
	if got := reads(a); len(got) != 0 {
		t.Fatalf("GroupReads of no group: %v", got)
	}
	mark(a, g1, 0, 0)
	mark(a, g1, 5, 5)
	mark(a, g1, 3, 5)
	mark(a, g2, 40, 40)
	mark(a, g1, 9, 9)
	mark(b, g1, 2, 2)
	if got := reads(a, g3, g2, g1, g2); !slices.Equal(got, []uint64{0, 40, 9, 40}) {
		t.Fatalf("GroupReads(g3, g2, g1, g2) = %v, want [0 40 9 40]", got)
	}
	if got := reads(b, g1, g2); !slices.Equal(got, []uint64{2, 0}) {
		t.Fatalf("b's GroupReads = %v, want [2 0]", got)
	}

	var wg sync.WaitGroup
	for _, seq := range rand.Perm(30) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := f.cs.MarkGroupRead(f.ctx, a, g3, uint64(100+seq)); err != nil || got < uint64(100+seq) {
				t.Errorf("MarkGroupRead(%d) = %d, %v", 100+seq, got, err)
			}
		}()
	}
	wg.Wait()
	if got := reads(a, g3); !slices.Equal(got, []uint64{129}) {
		t.Fatalf("after concurrent marks: %v, want [129]", got)
	}
}

// testConvInvalid: marks above the largest msgid are refused; a canceled
// context fails every call.
func testConvInvalid(t *testing.T, f *cfixture) {
	a, b := f.user(), f.user()
	if _, err := f.cs.MarkRead(f.ctx, a, b, das.MaxMsgid+1); !errors.Is(err, das.ErrInvalid) {
		t.Fatalf("MarkRead above MaxMsgid: %v, want ErrInvalid", err)
	}
	if _, err := f.cs.MarkGroupRead(f.ctx, a, 7, das.MaxMsgid+1); !errors.Is(err, das.ErrInvalid) {
		t.Fatalf("MarkGroupRead above 2^63-1: %v, want ErrInvalid", err)
	}
	ctx, cancel := context.WithCancel(f.ctx)
	cancel()
	if _, err := f.cs.Conversations(ctx, a, nil); err == nil {
		t.Fatal("Conversations with a canceled context: no error")
	}
	if _, err := f.cs.MarkRead(ctx, a, b, 1); err == nil {
		t.Fatal("MarkRead with a canceled context: no error")
	}
	if _, err := f.cs.GroupReads(ctx, a, []uint64{1}); err == nil {
		t.Fatal("GroupReads with a canceled context: no error")
	}
	if _, err := f.cs.MarkGroupRead(ctx, a, 1, 1); err == nil {
		t.Fatal("MarkGroupRead with a canceled context: no error")
	}
}
