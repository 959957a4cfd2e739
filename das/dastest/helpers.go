package dastest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// lastID makes msgids shaped like snowflake ids (time since the epoch in
// the high bits) and strictly increasing within the test binary.
var lastID atomic.Uint64

func init() {
	lastID.Store(uint64(time.Now().UnixMilli()-das.SnowflakeEpoch) << 22)
}

// NewMsgid returns a fresh msgid: unique in the process, increasing, and
// carrying the current time as a snowflake id does.
func NewMsgid() uint64 { return lastID.Add(1) }

// fixture is one subtest's store and a set of users no other subtest uses,
// so that engines may share one database (one Cassandra keyspace) between
// subtests.
type fixture struct {
	t   *testing.T
	s   das.Store
	ctx context.Context
	acc uint32
	uid uint64
	n   int
}

func newFixture(t *testing.T, open func(t *testing.T) das.Store) *fixture {
	t.Helper()
	return &fixture{
		t:   t,
		s:   open(t),
		ctx: context.Background(),
		acc: 1 + rand.Uint32N(1<<20),
		uid: rand.Uint64N(1<<50) + 1,
	}
}

// user returns a new user; all users of a fixture share one account
// system unless account differs (see userIn).
func (f *fixture) user() das.User {
	f.n++
	return das.User{Account: f.acc, UID: f.uid + uint64(f.n)}
}

// userIn returns a user with the same uid as u in another account system.
func (f *fixture) userIn(u das.User, account uint32) das.User {
	return das.User{Account: account, UID: u.UID}
}

func term(u das.User, appcode uint32) das.Terminal {
	return das.Terminal{Account: u.Account, UID: u.UID, AppCode: appcode}
}

func pbUser(u das.User) *pb.User { return &pb.User{Account: u.Account, Uid: u.UID} }

func newMsg(from das.User, fromApp uint32, to das.User, cmid, content string) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       NewMsgid(),
		From:        pbUser(from),
		FromAppcode: fromApp,
		To:          pbUser(to),
		Msgtype:     7,
		Content:     []byte(content),
		SentAtMs:    time.Now().UnixMilli(),
		ClientMsgId: cmid,
	}
}

// put stores m and fails the test unless it was stored as new.
func (f *fixture) put(m *pb.C2CMessage, inbox ...uint32) *pb.C2CMessage {
	f.t.Helper()
	id, dup, err := f.s.PutC2C(f.ctx, m, inbox, nil)
	if err != nil {
		f.t.Fatalf("PutC2C(%d): %v", m.Msgid, err)
	}
	if dup || id != m.Msgid {
		f.t.Fatalf("PutC2C(%d) = %d, dup %v; want %d, false", m.Msgid, id, dup, m.Msgid)
	}
	return m
}

// send stores a new message from -> to for the inbox appcodes.
func (f *fixture) send(from das.User, to das.User, content string, inbox ...uint32) *pb.C2CMessage {
	f.t.Helper()
	f.n++
	return f.put(newMsg(from, 101, to, fmt.Sprintf("cm-%d-%d", f.uid, f.n), content), inbox...)
}

func (f *fixture) count(t das.Terminal) (int, uint64) {
	f.t.Helper()
	n, oldest, err := f.s.InboxCount(f.ctx, t)
	if err != nil {
		f.t.Fatalf("InboxCount(%v): %v", t, err)
	}
	return n, oldest
}

func (f *fixture) wantCount(t das.Terminal, want int) {
	f.t.Helper()
	if n, _ := f.count(t); n != want {
		f.t.Fatalf("InboxCount(%v) = %d, want %d", t, n, want)
	}
}

func (f *fixture) page(t das.Terminal, after uint64, limit int) ([]*pb.C2CMessage, bool) {
	f.t.Helper()
	msgs, more, err := f.s.InboxPage(f.ctx, t, after, limit)
	if err != nil {
		f.t.Fatalf("InboxPage(%v, %d, %d): %v", t, after, limit, err)
	}
	return msgs, more
}

// inbox pages through t's whole inbox, limit at a time.
func (f *fixture) inbox(t das.Terminal, limit int) []*pb.C2CMessage {
	f.t.Helper()
	var all []*pb.C2CMessage
	after := uint64(0)
	for {
		msgs, more := f.page(t, after, limit)
		all = append(all, msgs...)
		if !more {
			return all
		}
		if len(msgs) == 0 {
			f.t.Fatalf("InboxPage(%v, %d): no messages but more", t, after)
		}
		after = msgs[len(msgs)-1].Msgid
	}
}

func (f *fixture) history(u das.User, peer *das.User, since uint64, limit int) ([]*pb.C2CMessage, bool) {
	f.t.Helper()
	msgs, more, err := f.s.History(f.ctx, u, peer, since, limit)
	if err != nil {
		f.t.Fatalf("History(%v, %v, %d, %d): %v", u, peer, since, limit, err)
	}
	return msgs, more
}

// timeline pages through u's whole history (with peer), limit at a time.
func (f *fixture) timeline(u das.User, peer *das.User, limit int) []*pb.C2CMessage {
	f.t.Helper()
	var all []*pb.C2CMessage
	since := uint64(0)
	for {
		msgs, more := f.history(u, peer, since, limit)
		all = append(all, msgs...)
		if !more {
			return all
		}
		if len(msgs) == 0 {
			f.t.Fatalf("History(%v, %d): no messages but more", u, since)
		}
		since = msgs[len(msgs)-1].Msgid
	}
}

func (f *fixture) ack(t das.Terminal, ids ...uint64) ([]*pb.C2CMessage, []uint64) {
	f.t.Helper()
	acked, missing, err := f.s.Ack(f.ctx, t, ids)
	if err != nil {
		f.t.Fatalf("Ack(%v, %v): %v", t, ids, err)
	}
	return acked, missing
}

func ids(msgs []*pb.C2CMessage) []uint64 {
	out := make([]uint64, len(msgs))
	for i, m := range msgs {
		out[i] = m.GetMsgid()
	}
	return out
}

// wantMsgs fails unless got holds exactly want, in order, field for field.
func wantMsgs(t *testing.T, what string, got, want []*pb.C2CMessage) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: got %d messages %v, want %d %v", what, len(got), ids(got), len(want), ids(want))
	}
	for i := range got {
		if !proto.Equal(got[i], want[i]) {
			t.Fatalf("%s: message %d = %v, want %v", what, i, got[i], want[i])
		}
	}
}

// wantIDs fails unless got and want hold the same ids, ignoring order.
func wantIDs(t *testing.T, what string, got, want []uint64) {
	t.Helper()
	g, w := slices.Clone(got), slices.Clone(want)
	slices.Sort(g)
	slices.Sort(w)
	if !slices.Equal(g, w) {
		t.Fatalf("%s: got %v, want %v", what, got, want)
	}
}

func sortedByID(msgs []*pb.C2CMessage) bool {
	return slices.IsSortedFunc(msgs, func(a, b *pb.C2CMessage) int {
		switch {
		case a.Msgid < b.Msgid:
			return -1
		case a.Msgid > b.Msgid:
			return 1
		}
		return 0
	}) && len(slices.Compact(ids(msgs))) == len(msgs)
}
