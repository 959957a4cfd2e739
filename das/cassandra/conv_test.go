package cassandra

import (
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
)

func TestConvConformance(t *testing.T) {
	cfg := needCassandra(t)
	dastest.RunConv(t, func(t *testing.T) dastest.ConvStore { return openTest(t, cfg) })
}

// convLast returns u's conversations as peer -> newest msgid, and the
// unread counts.
func convLast(t *testing.T, s *Store, u das.User) (map[das.User]uint64, map[das.User]int) {
	t.Helper()
	list, err := s.Conversations(ctx, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	last, unread := map[das.User]uint64{}, map[das.User]int{}
	for _, c := range list {
		last[c.Peer], unread[c.Peer] = c.Last.GetMsgid(), c.Unread
	}
	return last, unread
}

// TestConvTrim: a MaxCount trim that removes every message of one of a
// user's conversations removes that summary (the timeline bound is per
// user, so a conversation's newest message can go), and keeps the others
// and the other side's.
func TestConvTrim(t *testing.T) {
	cfg := needCassandra(t)
	cfg.Retention.MaxCount = 3
	cfg.TrimInterval = -1
	s := openTest(t, cfg)
	a, b, c := newUser(), newUser(), newUser()
	old := newMsg(msgidAround(time.Now()), b, a, "")
	mustPut(t, s, old, 101)
	var newest uint64
	for range 4 {
		m := newMsg(msgidAround(time.Now()), c, a, "")
		mustPut(t, s, m, 101)
		newest = m.Msgid
	}
	if last, _ := convLast(t, s, a); len(last) != 2 {
		t.Fatalf("before the trim: %v", last)
	}
	if _, err := s.Trim(ctx); err != nil {
		t.Fatal(err)
	}
	last, unread := convLast(t, s, a)
	if len(last) != 1 || last[c] != newest || unread[c] != 3 {
		t.Fatalf("a's conversations after the trim: %v, unread %v; want c's only, last %d, 3 unread", last, unread, newest)
	}
	if last, _ := convLast(t, s, b); len(last) != 1 || last[a] != old.Msgid {
		t.Fatalf("b's conversations after the trim: %v", last)
	}
	// A message after the trim brings the conversation back.
	again := newMsg(msgidAround(time.Now()), b, a, "")
	mustPut(t, s, again, 101)
	if last, unread := convLast(t, s, a); last[b] != again.Msgid || unread[b] != 1 {
		t.Fatalf("after a new message: %v, unread %v", last, unread)
	}
}

// TestConvMarkExpiry: with MaxAge, a read mark older than the retention
// horizon covers no kept message and is not written.
func TestConvMarkExpiry(t *testing.T) {
	cfg := needCassandra(t)
	cfg.Retention.MaxAge = time.Hour
	s := openTest(t, cfg)
	a, b := newUser(), newUser()
	m := newMsg(msgidAround(time.Now()), b, a, "")
	mustPut(t, s, m, 101)
	if got, err := s.MarkRead(ctx, a, b, das.MsgidAt(time.Now().Add(-2*time.Hour))); err != nil || got != 0 {
		t.Fatalf("MarkRead below the horizon: %d, %v; want 0", got, err)
	}
	if got, err := s.MarkRead(ctx, a, b, m.Msgid); err != nil || got != m.Msgid {
		t.Fatalf("MarkRead: %d, %v", got, err)
	}
	raw := rawSession(t, cfg)
	var ttl int
	if err := raw.Query(`SELECT TTL(read_mark) FROM conv_summary WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ?`,
		i32(a.Account), i64(a.UID), i32(b.Account), i64(b.UID)).Scan(&ttl); err != nil {
		t.Fatal(err)
	}
	if ttl <= 0 || ttl > 3600 {
		t.Fatalf("read mark TTL %d s, want at most an hour", ttl)
	}
}
