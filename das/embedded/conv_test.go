package embedded

import (
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
)

func TestConvConformance(t *testing.T) {
	dastest.RunConv(t, func(t *testing.T) dastest.ConvStore {
		return openTest(t, Options{JanitorInterval: -1})
	})
}

// TestConvConformanceBusyJanitor runs the suite with a janitor sweeping
// every millisecond (with retention bounds the suite never reaches), so
// that retention and collection run concurrently with the summaries'
// reads.
func TestConvConformanceBusyJanitor(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dastest.RunConv(t, func(t *testing.T) dastest.ConvStore {
		return openTest(t, Options{
			JanitorInterval: time.Millisecond,
			Retention:       das.Retention{MaxAge: 24 * time.Hour, MaxCount: 10000, IdempotencyTTL: time.Hour},
		})
	})
}

// convMsgids returns u's conversations as peer -> newest msgid, with the
// unread counts.
func convMsgids(t *testing.T, s *Store, u das.User) (map[das.User]uint64, map[das.User]int) {
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

// TestConvRetentionMaxAge: a conversation whose last message aged out
// leaves the list; one with a message still kept stays, and counts only
// the kept messages as unread.
func TestConvRetentionMaxAge(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{MaxAge: time.Hour}})
	now := time.Now()
	s.now = func() time.Time { return now }
	a, b, c := user(1), user(2), user(3)
	old := das.MsgidAt(now.Add(-2 * time.Hour))
	fresh := das.MsgidAt(now.Add(-time.Minute))
	mustPut(t, s, msgAt(old+1, b, a, ""), 101)
	mustPut(t, s, msgAt(old+2, c, a, ""), 101)
	mustPut(t, s, msgAt(fresh+1, b, a, ""), 101)
	if last, unread := convMsgids(t, s, a); len(last) != 2 || last[b] != fresh+1 || last[c] != old+2 || unread[b] != 2 {
		t.Fatalf("before the sweep: %v, unread %v", last, unread)
	}
	sweep(t, s)
	last, unread := convMsgids(t, s, a)
	if len(last) != 1 || last[b] != fresh+1 || unread[b] != 1 {
		t.Fatalf("after the sweep: %v, unread %v; want only b's, last %d, 1 unread", last, unread, fresh+1)
	}
	if last, _ := convMsgids(t, s, c); len(last) != 0 {
		t.Fatalf("c's conversations after the sweep: %v", last)
	}
}

// TestConvRetentionMaxCount: count trimming may remove every message of a
// conversation (the timeline bound is per user, not per conversation):
// the conversation then leaves the list too, so that no summary names a
// message that is gone.
func TestConvRetentionMaxCount(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{MaxCount: 3}})
	a, b, c := user(1), user(2), user(3)
	mustPut(t, s, msgAt(1001, b, a, ""), 101)
	for id := uint64(1002); id <= 1005; id++ {
		mustPut(t, s, msgAt(id, c, a, ""), 101)
	}
	sweep(t, s)
	last, unread := convMsgids(t, s, a)
	if len(last) != 1 || last[c] != 1005 || unread[c] != 3 {
		t.Fatalf("a's conversations after trimming: %v, unread %v; want c's only, last 1005, 3 unread", last, unread)
	}
	// b's own timeline still holds the message: b keeps the conversation.
	if last, _ := convMsgids(t, s, b); len(last) != 1 || last[a] != 1001 {
		t.Fatalf("b's conversations: %v", last)
	}
}

// TestConvUnknownDirection: conversation rows written before the direction
// was stored (empty value) count as unread above the mark, whichever side
// sent them.
func TestConvUnknownDirection(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1})
	a, b := user(1), user(2)
	for id := uint64(1001); id <= 1004; id++ {
		from, to := a, b
		if id%2 == 0 {
			from, to = b, a
		}
		mustPut(t, s, msgAt(id, from, to, ""), 101)
	}
	if _, unread := convMsgids(t, s, a); unread[b] != 2 {
		t.Fatalf("unread %d, want 2", unread[b])
	}
	// Rewrite a's rows as an older version stored them.
	for id := uint64(1001); id <= 1004; id++ {
		if err := s.db.Set(convKey(a, b, id), nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, unread := convMsgids(t, s, a); unread[b] != 4 {
		t.Fatalf("unread of rows without direction: %d, want 4", unread[b])
	}
	if got, err := s.MarkRead(ctx, a, b, 1002); err != nil || got != 1002 {
		t.Fatalf("MarkRead: %d, %v", got, err)
	}
	if _, unread := convMsgids(t, s, a); unread[b] != 2 {
		t.Fatalf("unread after the mark: %d, want 2", unread[b])
	}
}
