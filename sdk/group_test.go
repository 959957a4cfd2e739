package sdk

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// groupFake is the group side of a fake server for one terminal of user
// (1, 2): groups whose messages are numbered 1, 2, 3, ..., the terminal's
// cursors, and a log of the requests.
type groupFake struct {
	t  *testing.T
	fs *fakeServer

	mu      sync.Mutex
	groups  map[uint64][]*pb.C2CMessage // seq n at index n-1
	cursor  map[uint64]uint64
	pulls   []*pb.GroupPullRequest
	acks    []*pb.GroupAckRequest
	syncs   int
	sends   []*pb.C2CSendRequest
	onSync  func() // called before a group-sync is answered
	refuse  schema.Status
	nextMsg uint64
}

func newGroupFake(t *testing.T) *groupFake {
	g := &groupFake{t: t, groups: map[uint64][]*pb.C2CMessage{}, cursor: map[uint64]uint64{}, nextMsg: 1000}
	g.fs = newFakeServer(t, g.handle)
	return g
}

// add stores n messages in group id (created if new) and returns them.
func (g *groupFake) add(id uint64, n int) []*pb.C2CMessage {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []*pb.C2CMessage
	for range n {
		g.nextMsg++
		m := &pb.C2CMessage{Msgid: g.nextMsg, From: &pb.User{Account: 1, Uid: 9}, GroupId: id, Seq: uint64(len(g.groups[id]) + 1), Content: []byte(fmt.Sprintf("g%d-%d", id, len(g.groups[id])+1))}
		g.groups[id] = append(g.groups[id], m)
		out = append(out, m)
	}
	return out
}

// notify pushes msgs as one live GroupNotify.
func (g *groupFake) notify(msgs ...*pb.C2CMessage) {
	g.fs.push(schema.CmdGroupNotify, &pb.GroupNotify{GroupId: msgs[0].GroupId, Messages: msgs})
}

func (g *groupFake) handle(h schema.Header, body []byte) (schema.Status, proto.Message, bool) {
	switch h.Cmd {
	case schema.CmdLogin:
		return schema.StatusOK, &pb.LoginResponse{KeepaliveMs: 60000, Account: 1}, false
	case schema.CmdGroupSync:
		g.mu.Lock()
		g.syncs++
		hook := g.onSync
		g.mu.Unlock()
		if hook != nil {
			hook()
		}
		g.mu.Lock()
		defer g.mu.Unlock()
		var resp pb.GroupSyncResponse
		for id, ms := range g.groups {
			resp.Groups = append(resp.Groups, &pb.GroupState{GroupId: id, HeadSeq: uint64(len(ms)), AckedSeq: g.cursor[id], JoinSeq: 1})
		}
		return schema.StatusOK, &resp, false
	case schema.CmdGroupPull:
		var req pb.GroupPullRequest
		_ = proto.Unmarshal(body, &req)
		g.mu.Lock()
		defer g.mu.Unlock()
		g.pulls = append(g.pulls, &req)
		ms, ok := g.groups[req.GroupId]
		if !ok {
			return schema.StatusUnknownGroup, nil, false
		}
		if req.AckSeq > 0 {
			g.cursor[req.GroupId] = max(g.cursor[req.GroupId], req.AckSeq)
		}
		size := int(req.PageSize)
		if size == 0 {
			size = 100
		}
		from := min(int(req.AfterSeq), len(ms))
		to := min(from+size, len(ms))
		return schema.StatusOK, &pb.GroupPullResponse{Messages: ms[from:to], More: to < len(ms), HeadSeq: uint64(len(ms))}, false
	case schema.CmdGroupAck:
		var req pb.GroupAckRequest
		_ = proto.Unmarshal(body, &req)
		g.mu.Lock()
		defer g.mu.Unlock()
		g.acks = append(g.acks, &req)
		for _, c := range req.Cursors {
			if c.Seq > uint64(len(g.groups[c.GroupId])) {
				g.t.Errorf("ack of group %d seq %d beyond its head %d", c.GroupId, c.Seq, len(g.groups[c.GroupId]))
			}
			g.cursor[c.GroupId] = max(g.cursor[c.GroupId], c.Seq)
		}
		return schema.StatusOK, &pb.GroupAckResponse{}, false
	case schema.CmdC2CSend:
		var req pb.C2CSendRequest
		_ = proto.Unmarshal(body, &req)
		g.mu.Lock()
		defer g.mu.Unlock()
		g.sends = append(g.sends, &req)
		if g.refuse != 0 {
			return g.refuse, nil, false
		}
		g.nextMsg++
		m := &pb.C2CMessage{Msgid: g.nextMsg, From: &pb.User{Account: 1, Uid: 2}, GroupId: req.GroupId, Seq: uint64(len(g.groups[req.GroupId]) + 1), Content: req.Content, ClientMsgId: req.ClientMsgId}
		g.groups[req.GroupId] = append(g.groups[req.GroupId], m)
		return schema.StatusOK, &pb.C2CSendResponse{Msgid: m.Msgid, Seq: m.Seq}, false
	}
	resp, _ := answer(h.Cmd)
	return schema.StatusOK, resp, false
}

// shown records what OnGroup got.
type shown struct {
	mu   sync.Mutex
	msgs []*pb.C2CMessage
}

func (s *shown) on(m *pb.C2CMessage) {
	s.mu.Lock()
	s.msgs = append(s.msgs, m)
	s.mu.Unlock()
}

// seqs returns the seqs shown of group id, in order.
func (s *shown) seqs(id uint64) []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []uint64
	for _, m := range s.msgs {
		if m.GroupId == id {
			out = append(out, m.Seq)
		}
	}
	return out
}

func upTo(n uint64) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		out[i] = uint64(i + 1)
	}
	return out
}

// waitSeqs waits until group id shows exactly want, failing on anything
// else (a duplicate, a gap, disorder).
func waitSeqs(t *testing.T, s *shown, id uint64, want []uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := s.seqs(id)
		if len(got) > len(want) || !slices.Equal(got, want[:len(got)]) {
			t.Fatalf("group %d shown %v, want %v", id, got, want)
		}
		if len(got) == len(want) {
			time.Sleep(50 * time.Millisecond) // nothing more may come
			if got := s.seqs(id); !slices.Equal(got, want) {
				t.Fatalf("group %d shown %v, want %v", id, got, want)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %d shown %v after 5s, want %v", id, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func groupClient(t *testing.T, g *groupFake, s *shown, mod func(*Options)) *Client {
	t.Helper()
	o := Options{Addrs: []string{g.fs.addr()}, OnGroup: s.on, BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond, SendBackoffMin: 5 * time.Millisecond, RequestTimeout: 2 * time.Second}
	if mod != nil {
		mod(&o)
	}
	c, err := Dial(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if _, err := c.Login(context.Background(), Credentials{AppCode: 101, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
	return c
}

func (g *groupFake) cursorOf(id uint64) uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.cursor[id]
}

func waitCursor(t *testing.T, g *groupFake, id, want uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for g.cursorOf(id) != want {
		if time.Now().After(deadline) {
			t.Fatalf("group %d cursor %d, want %d", id, g.cursorOf(id), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestGroupGapPull: a notify beyond the next seq (the ones before it were
// lost) is held, the group is pulled from the last seq delivered, and the
// messages come in seq order; the cursor ends at the last one.
func TestGroupGapPull(t *testing.T) {
	g := newGroupFake(t)
	g.add(7, 2)
	s := &shown{}
	groupClient(t, g, s, nil)
	waitSeqs(t, s, 7, upTo(2)) // caught up after the login
	ms := g.add(7, 4)          // 3, 4, 5, 6
	g.notify(ms[0])
	waitSeqs(t, s, 7, upTo(3))
	g.notify(ms[3]) // 4 and 5 lost
	waitSeqs(t, s, 7, upTo(6))
	waitCursor(t, g, 7, 6)
	g.mu.Lock()
	defer g.mu.Unlock()
	last := g.pulls[len(g.pulls)-1]
	if last.GroupId != 7 || last.AfterSeq != 3 {
		t.Fatalf("gap pull %+v, want group 7 after seq 3", last)
	}
}

// TestGroupDuplicateDrop: notifies at or below the last seq delivered
// (copies, late ones) are dropped, and nothing is pulled for them.
func TestGroupDuplicateDrop(t *testing.T) {
	g := newGroupFake(t)
	ms := g.add(3, 3)
	g.mu.Lock()
	g.cursor[3] = 3
	g.mu.Unlock()
	s := &shown{}
	groupClient(t, g, s, nil)
	eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.syncs == 1 })
	more := g.add(3, 2) // 4, 5
	g.notify(more[0])
	g.notify(more[0])
	g.notify(ms[1], more[0])
	g.notify(more[1], more[1])
	g.notify(ms[2])
	waitSeqs(t, s, 3, []uint64{4, 5})
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.pulls) != 0 {
		t.Fatalf("pulls %v, want none", g.pulls)
	}
}

// eventually polls cond for up to 5s.
func eventually(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestGroupAcksBatched: acks of many messages of several groups go in a
// few group-ack requests, each with one cursor per group, ending at the
// last seq of each group.
func TestGroupAcksBatched(t *testing.T) {
	g := newGroupFake(t)
	s := &shown{}
	groupClient(t, g, s, func(o *Options) { o.AckDelay = 100 * time.Millisecond })
	eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.syncs == 1 })
	for range 50 {
		for _, id := range []uint64{1, 2} {
			g.notify(g.add(id, 1)...)
		}
	}
	waitSeqs(t, s, 1, upTo(50))
	waitSeqs(t, s, 2, upTo(50))
	waitCursor(t, g, 1, 50)
	waitCursor(t, g, 2, 50)
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.acks) > 10 {
		t.Fatalf("%d group-ack requests for 100 messages, want a few", len(g.acks))
	}
	for _, a := range g.acks {
		seen := map[uint64]bool{}
		for _, c := range a.Cursors {
			if seen[c.GroupId] {
				t.Fatalf("ack %v names group %d twice", a, c.GroupId)
			}
			seen[c.GroupId] = true
		}
	}
	if len(g.pulls) != 0 {
		t.Fatalf("pulls %v, want none", g.pulls)
	}
}

// TestGroupSyncHoldsLive: after a login, the groups are pulled page by
// page from the cursor (each pull acknowledging the page before) while a
// live notify that came before the sync's answer waits; it is then dropped
// as delivered by the pull, and the newer one after it is delivered.
func TestGroupSyncHoldsLive(t *testing.T) {
	g := newGroupFake(t)
	g.add(5, 10)
	g.mu.Lock()
	g.cursor[5] = 1
	g.onSync = func() {
		// live messages during the login's catch-up: 11 (stored, so the
		// pages bring it too) and 12 (stored after the sync answered)
		ms := g.add(5, 1)
		g.notify(ms...)
		time.Sleep(20 * time.Millisecond)
	}
	g.mu.Unlock()
	s := &shown{}
	groupClient(t, g, s, func(o *Options) { o.PageSize = 4 })
	waitSeqs(t, s, 5, []uint64{2, 3, 4, 5, 6, 7, 8, 9, 10, 11})
	twelve := g.add(5, 1)
	g.notify(twelve...)
	waitSeqs(t, s, 5, []uint64{2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})
	waitCursor(t, g, 5, 12)
	g.mu.Lock()
	defer g.mu.Unlock()
	var got [][2]uint64
	for _, p := range g.pulls {
		got = append(got, [2]uint64{p.AfterSeq, p.AckSeq})
	}
	want := [][2]uint64{{1, 0}, {5, 5}, {9, 9}}
	if !slices.Equal(got, want) {
		t.Fatalf("pulls (after_seq, ack_seq) %v, want %v", got, want)
	}
}

// groupMemState is a GroupStateStore in memory.
type groupMemState struct {
	memState
	gmu  sync.Mutex
	seqs map[uint64]uint64
}

func (m *groupMemState) Load() (SavedState, error) {
	st, _ := m.memState.Load()
	m.gmu.Lock()
	defer m.gmu.Unlock()
	st.GroupSeqs = map[uint64]uint64{}
	for g, s := range m.seqs {
		st.GroupSeqs[g] = s
	}
	return st, nil
}

func (m *groupMemState) SaveGroupSeq(g, seq uint64) error {
	m.gmu.Lock()
	defer m.gmu.Unlock()
	if seq <= m.seqs[g] {
		m.t.Errorf("SaveGroupSeq(%d, %d) after %d", g, seq, m.seqs[g])
	}
	m.seqs[g] = seq
	return nil
}

// TestGroupOrderAcrossReconnect: messages stored while the connection was
// cut come after a reconnect from the last seq delivered, in order, before
// newer live ones; a new client on the same state neither shows them again
// nor skips one, even when the server's cursor lags (acks lost), and moves
// that cursor up.
func TestGroupOrderAcrossReconnect(t *testing.T) {
	g := newGroupFake(t)
	st := &groupMemState{memState: memState{t: t}, seqs: map[uint64]uint64{}}
	s := &shown{}
	c := groupClient(t, g, s, func(o *Options) { o.State = st })
	eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.syncs == 1 })
	for _, m := range g.add(4, 3) {
		g.notify(m)
	}
	waitSeqs(t, s, 4, upTo(3))
	g.fs.cutAll()
	g.add(4, 3) // 4, 5, 6: their notifies were lost in the cut
	eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.syncs == 2 })
	g.notify(g.add(4, 1)...) // 7, live
	waitSeqs(t, s, 4, upTo(7))
	waitCursor(t, g, 4, 7)
	_ = c.Close()

	// The next process: the server lost the acks beyond 2.
	g.mu.Lock()
	g.cursor[4] = 2
	g.pulls = nil
	g.mu.Unlock()
	g.add(4, 1) // 8
	s2 := &shown{}
	groupClient(t, g, s2, func(o *Options) { o.State = st })
	waitSeqs(t, s2, 4, []uint64{8})
	waitCursor(t, g, 4, 8)
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.pulls) != 1 || g.pulls[0].AfterSeq != 7 {
		t.Fatalf("pulls %v, want one after seq 7", g.pulls)
	}
	if st.seqs[4] != 8 {
		t.Fatalf("state holds seq %d of group 4, want 8", st.seqs[4])
	}
}

// TestGroupCloseFlushesAcks: Close sends the cursor of what was shown
// before it closes, however long AckDelay is.
func TestGroupCloseFlushesAcks(t *testing.T) {
	g := newGroupFake(t)
	s := &shown{}
	c := groupClient(t, g, s, func(o *Options) { o.AckDelay = time.Hour })
	eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.syncs == 1 })
	g.notify(g.add(2, 3)...)
	waitSeqs(t, s, 2, upTo(3))
	if g.cursorOf(2) != 0 {
		t.Fatal("acked before AckDelay")
	}
	_ = c.Close()
	if got := g.cursorOf(2); got != 3 {
		t.Fatalf("cursor %d after Close, want 3", got)
	}
}

// TestSendGroup: a group send carries the group and no recipient, its
// answer puts the message in OnGroup at its seq (the platform does not
// notify the sending terminal), and 4007/4008 are not retried.
func TestSendGroup(t *testing.T) {
	g := newGroupFake(t)
	g.add(9, 1)
	s := &shown{}
	c := groupClient(t, g, s, nil)
	waitSeqs(t, s, 9, upTo(1))
	resp, err := c.SendGroup(context.Background(), 9, 3, []byte("hi"))
	if err != nil || resp.Seq != 2 {
		t.Fatalf("SendGroup: %v, %v", resp, err)
	}
	waitSeqs(t, s, 9, upTo(2))
	s.mu.Lock()
	m := s.msgs[1]
	s.mu.Unlock()
	if string(m.Content) != "hi" || m.Msgid != resp.Msgid || m.From.GetUid() != 2 || m.From.GetAccount() != 1 || m.Msgtype != 3 {
		t.Fatalf("own message shown as %v", m)
	}
	g.mu.Lock()
	req := g.sends[0]
	g.refuse = schema.StatusNotMember
	g.mu.Unlock()
	if req.GroupId != 9 || req.To != nil || req.ClientMsgId == "" {
		t.Fatalf("send request %v", req)
	}
	_, err = c.SendGroup(context.Background(), 9, 3, []byte("again"))
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusNotMember {
		t.Fatalf("send as a non-member: %v, want 4008", err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.sends) != 2 {
		t.Fatalf("%d send requests, want 2 (4008 is final)", len(g.sends))
	}
}

// TestGroupWithoutOnGroup: without OnGroup, group notifies go to
// OnMessage and nothing is synced or pulled.
func TestGroupWithoutOnGroup(t *testing.T) {
	g := newGroupFake(t)
	g.add(1, 3)
	got := make(chan Message, 4)
	c, err := Dial(context.Background(), Options{Addrs: []string{g.fs.addr()}, OnC2C: func(*pb.C2CMessage) {}, OnMessage: func(m Message) { got <- m }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Login(context.Background(), Credentials{AppCode: 101, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
	g.notify(g.add(1, 1)...)
	select {
	case m := <-got:
		if m.Cmd != schema.CmdGroupNotify {
			t.Fatalf("OnMessage got %s", m.Cmd)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no group notify on OnMessage")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.syncs != 0 || len(g.pulls) != 0 {
		t.Fatalf("%d syncs and %d pulls without OnGroup", g.syncs, len(g.pulls))
	}
}

// TestFileStateGroups: the file keeps the last seq of every group across
// opens and compactions, and a lower seq changes nothing.
func TestFileStateGroups(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	s, err := FileState(path, 2)
	if err != nil {
		t.Fatal(err)
	}
	for seq := uint64(1); seq <= 20; seq++ {
		if err := s.SaveGroupSeq(5, seq); err != nil {
			t.Fatal(err)
		}
		if err := s.SaveShown([]uint64{100 + seq}); err != nil {
			t.Fatal(err)
		}
	}
	_ = s.SaveGroupSeq(6, 4)
	_ = s.SaveGroupSeq(6, 3)
	_ = s.Close()
	s, err = FileState(path, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	st, _ := s.Load()
	if st.GroupSeqs[5] != 20 || st.GroupSeqs[6] != 4 || len(st.GroupSeqs) != 2 {
		t.Fatalf("group seqs %v, want 5:20 6:4", st.GroupSeqs)
	}
	if !slices.Equal(st.Shown, []uint64{119, 120}) {
		t.Fatalf("shown %v", st.Shown)
	}
}
