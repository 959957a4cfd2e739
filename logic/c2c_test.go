package logic

import (
	"context"
	"errors"
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

// fakeC2CStore keeps what PutC2C stored by sender terminal and client id,
// which is all SentMsgid reads; the other methods store nothing.
type fakeC2CStore struct {
	mu   sync.Mutex
	sent map[sentKey]uint64
	puts []*pb.C2CMessage
}

type sentKey struct {
	t    das.Terminal
	cmid string
}

func (f *fakeC2CStore) PutC2C(_ context.Context, m *pb.C2CMessage, _, _ []uint32) (uint64, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := sentKey{das.Terminal{Account: m.From.Account, UID: m.From.Uid, AppCode: m.FromAppcode}, m.ClientMsgId}
	if id, ok := f.sent[k]; ok {
		return id, true, nil
	}
	f.sent[k] = m.Msgid
	f.puts = append(f.puts, m)
	return m.Msgid, false, nil
}

func (f *fakeC2CStore) SentMsgid(_ context.Context, t das.Terminal, cmid string) (uint64, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, ok := f.sent[sentKey{t, cmid}]
	return id, ok, nil
}

func (f *fakeC2CStore) PutInbox(context.Context, *pb.C2CMessage, []das.Terminal) error { return nil }
func (f *fakeC2CStore) InboxCount(context.Context, das.Terminal) (int, uint64, error) {
	return 0, 0, nil
}
func (f *fakeC2CStore) InboxPage(context.Context, das.Terminal, uint64, int) ([]*pb.C2CMessage, bool, error) {
	return nil, false, nil
}
func (f *fakeC2CStore) Ack(_ context.Context, _ das.Terminal, ids []uint64) ([]*pb.C2CMessage, []uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var acked []*pb.C2CMessage
	for _, id := range ids {
		for _, m := range f.puts {
			if m.Msgid == id {
				acked = append(acked, m)
			}
		}
	}
	return acked, nil, nil
}
func (f *fakeC2CStore) History(context.Context, das.User, *das.User, uint64, int) ([]*pb.C2CMessage, bool, error) {
	return nil, false, nil
}
func (f *fakeC2CStore) Close() error { return nil }

// TestOrderedSendFloor: a send naming a predecessor (after_client_msg_id)
// is stored only when that one is, above its msgid even when another
// node's clock minted it far ahead; otherwise 3005 and nothing stored.
func TestOrderedSendFloor(t *testing.T) {
	st := &fakeC2CStore{sent: map[sentKey]uint64{}}
	s, err := New(Options{Router: router.NewMemory(), Store: st, Apps: []App{
		{AppCode: 101, Account: 1, Secrets: []string{"0123456789abcdef0123"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sess := router.Session{Account: 1, AppCode: 101, UID: 7, Gate: "gate-a", Conn: 1, Epoch: 1}
	send := func(cmid, after string, afterMsgid uint64) (*pb.C2CSendResponse, error) {
		t.Helper()
		body, _ := proto.Marshal(&pb.C2CSendRequest{To: &pb.User{Account: 1, Uid: 8}, Content: []byte(cmid),
			ClientMsgId: cmid, AfterClientMsgId: after, AfterMsgid: afterMsgid})
		out, err := s.Handle(context.Background(), sess, &schema.Header{Cmd: schema.CmdC2CSend, LogID: 9}, body)
		if err != nil {
			return nil, err
		}
		var resp pb.C2CSendResponse
		if err := proto.Unmarshal(out, &resp); err != nil {
			t.Fatal(err)
		}
		return &resp, nil
	}
	status := func(err error) schema.Status {
		var se *schema.Error
		if errors.As(err, &se) {
			return se.Status
		}
		return schema.StatusOK
	}

	first, err := send("m-1", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := send("m-2", "never-sent", 0); status(err) != schema.StatusOutOfOrder || !status(err).Retryable() {
		t.Fatalf("predecessor missing: err %v, want retryable %d", err, schema.StatusOutOfOrder)
	}
	if len(st.puts) != 1 {
		t.Fatalf("%d messages stored, want only m-1", len(st.puts))
	}
	second, err := send("m-2", "m-1", 0)
	if err != nil || second.Msgid <= first.Msgid {
		t.Fatalf("after m-1: %v, msgid %d; want one above %d", err, second.GetMsgid(), first.Msgid)
	}

	// A predecessor minted by a node whose clock is 30 s ahead.
	ahead := das.MsgidAt(time.Now().Add(30 * time.Second))
	st.sent[sentKey{das.Terminal{Account: 1, UID: 7, AppCode: 101}, "m-3"}] = ahead
	fourth, err := send("m-4", "m-3", second.Msgid)
	if err != nil || fourth.Msgid <= ahead {
		t.Fatalf("after a predecessor from a clock ahead: %v, msgid %d; want one above %d", err, fourth.GetMsgid(), ahead)
	}
	// Another terminal's ids are not this one's predecessors.
	st.sent[sentKey{das.Terminal{Account: 1, UID: 7, AppCode: 102}, "pc-1"}] = ahead
	if _, err := send("m-5", "pc-1", 0); status(err) != schema.StatusOutOfOrder {
		t.Fatalf("another terminal's id as predecessor: err %v, want %d", err, schema.StatusOutOfOrder)
	}
	long := string(make([]byte, 65))
	if _, err := send("m-6", long, 0); status(err) != schema.StatusBadArgument {
		t.Fatalf("a predecessor id over the limit: err %v, want %d", err, schema.StatusBadArgument)
	}
}

// receiptGate records the receipts pushed to each connection.
type receiptGate struct {
	mu  sync.Mutex
	got map[uint64][]*pb.C2CReceipt
}

func (g *receiptGate) Kick(context.Context, uint64, *pb.Kickout, uint64) error { return nil }

func (g *receiptGate) Push(_ context.Context, conns []uint64, cmd schema.Cmd, _ uint32, _ uint64, body []byte, queued []bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for i, c := range conns {
		queued[i] = true
		if cmd != schema.CmdC2CReceipt {
			continue
		}
		r := new(pb.C2CReceipt)
		if err := proto.Unmarshal(body, r); err != nil {
			return err
		}
		g.got[c] = append(g.got[c], r)
	}
	return nil
}

// TestReceiptsBatchedPerSender: one ack of messages from two senders
// sends each sender one receipt listing its messages in the order acked;
// a receipt of one message lists none.
func TestReceiptsBatchedPerSender(t *testing.T) {
	st := &fakeC2CStore{sent: map[sentKey]uint64{}}
	s, err := New(Options{Router: router.NewMemory(), Store: st, Apps: []App{
		{AppCode: 101, Account: 1, Secrets: []string{"0123456789abcdef0123"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	g := &receiptGate{got: map[uint64][]*pb.C2CReceipt{}}
	s.AttachGate("gate-a", g)
	ctx := context.Background()
	sess := func(uid, conn uint64) router.Session {
		ss := router.Session{Account: 1, AppCode: 101, UID: uid, Gate: "gate-a", Conn: conn, Epoch: conn}
		if _, err := s.router.Register(ctx, ss, 1); err != nil {
			t.Fatal(err)
		}
		return ss
	}
	alice, bob, carol := sess(1, 11), sess(2, 12), sess(3, 13)
	send := func(from router.Session, text string) uint64 {
		t.Helper()
		body, _ := proto.Marshal(&pb.C2CSendRequest{To: &pb.User{Account: 1, Uid: carol.UID}, Content: []byte(text), ClientMsgId: text})
		out, err := s.Handle(ctx, from, &schema.Header{Cmd: schema.CmdC2CSend}, body)
		if err != nil {
			t.Fatal(err)
		}
		var resp pb.C2CSendResponse
		_ = proto.Unmarshal(out, &resp)
		return resp.Msgid
	}
	a1, b1, a2, a3 := send(alice, "a1"), send(bob, "b1"), send(alice, "a2"), send(alice, "a3")
	body, _ := proto.Marshal(&pb.C2CAckRequest{Msgids: []uint64{a1, b1, a2, a3}})
	if _, err := s.Handle(ctx, carol, &schema.Header{Cmd: schema.CmdC2CAck}, body); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	ra, rb := g.got[alice.Conn], g.got[bob.Conn]
	if len(ra) != 1 || ra[0].Msgid != a1 || !slices.Equal(ra[0].Msgids, []uint64{a1, a2, a3}) || ra[0].By.GetUid() != carol.UID {
		t.Fatalf("alice got receipts %v, want one for %d, %d, %d by carol", ra, a1, a2, a3)
	}
	if len(rb) != 1 || rb[0].Msgid != b1 || len(rb[0].Msgids) != 0 {
		t.Fatalf("bob got receipts %v, want one for %d alone", rb, b1)
	}
}
