package logic

import (
	"context"
	"errors"
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
func (f *fakeC2CStore) Ack(context.Context, das.Terminal, []uint64) ([]*pb.C2CMessage, []uint64, error) {
	return nil, nil, nil
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
