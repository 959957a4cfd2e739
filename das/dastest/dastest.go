// Package dastest is the conformance suite of das.Store: every engine's
// tests call Run, so the embedded and the Cassandra engine keep one
// contract. The suite counts: each test checks that every stored message
// is present exactly once, not that some sample is.
package dastest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// Run runs the suite. open returns a store for one subtest and arranges
// (with t.Cleanup) to close it; it may return the same database each time,
// since every subtest uses users of its own. Close on the returned store
// must be idempotent: the Closed subtest closes it before the cleanup does.
func Run(t *testing.T, open func(t *testing.T) das.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, f *fixture)
	}{
		{"PutCountPage", testPutCountPage},
		{"OutOfOrderInsertWhilePaging", testOutOfOrder},
		{"IdempotentRetry", testIdempotentRetry},
		{"SentMsgid", testSentMsgid},
		{"ConcurrentIdempotentRetries", testConcurrentIdempotent},
		{"InboxPerTerminal", testInboxPerTerminal},
		{"AckUnknownAndRepeated", testAckUnknown},
		{"HistoryBothSides", testHistoryBothSides},
		{"HistoryPeerFilter", testPeerFilter},
		{"HistorySinceLimitMore", testSinceLimitMore},
		{"SelfAndCrossAccount", testSelfAndCrossAccount},
		{"BadArguments", testBadArguments},
		{"CanceledContext", testCanceledContext},
		{"ConcurrentWriters", testConcurrentWriters},
		{"Closed", testClosed},
		{"PutInboxManyTerminals", testPutInbox},
		{"SenderTerminals", testSenderTerminals},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newFixture(t, open)) })
	}
}

func testPutCountPage(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	var sent []*pb.C2CMessage
	for i := range 25 {
		sent = append(sent, f.send(a, b, fmt.Sprintf("m%d", i), 101, 102))
	}
	for _, app := range []uint32{101, 102} {
		n, oldest := f.count(term(b, app))
		if n != 25 || oldest != sent[0].Msgid {
			t.Fatalf("InboxCount(%d) = %d, %d; want 25, %d", app, n, oldest, sent[0].Msgid)
		}
	}
	f.wantCount(term(a, 101), 0)
	if n, oldest := f.count(term(b, 103)); n != 0 || oldest != 0 {
		t.Fatalf("InboxCount of a terminal without messages = %d, %d", n, oldest)
	}

	// Pages of 10: 10 + more, 10 + more, 5 and no more.
	var got []*pb.C2CMessage
	after := uint64(0)
	for i, want := range []struct {
		n    int
		more bool
	}{{10, true}, {10, true}, {5, false}} {
		msgs, more := f.page(term(b, 101), after, 10)
		if len(msgs) != want.n || more != want.more {
			t.Fatalf("page %d: %d messages, more %v; want %d, %v", i, len(msgs), more, want.n, want.more)
		}
		got = append(got, msgs...)
		after = msgs[len(msgs)-1].Msgid
	}
	wantMsgs(t, "paged inbox", got, sent)

	// A page that ends exactly at the last message says no more.
	msgs, more := f.page(term(b, 102), 0, 25)
	wantMsgs(t, "one exact page", msgs, sent)
	if more {
		t.Fatal("exact page: more = true")
	}
	if msgs, more := f.page(term(b, 102), sent[24].Msgid, 10); len(msgs) != 0 || more {
		t.Fatalf("page after the last: %d messages, more %v", len(msgs), more)
	}
	if msgs, more := f.page(term(b, 102), math.MaxUint64, 10); len(msgs) != 0 || more {
		t.Fatalf("page after MaxUint64: %d messages, more %v", len(msgs), more)
	}
	// after is exclusive and need not be a stored msgid.
	msgs, _ = f.page(term(b, 101), sent[9].Msgid-1, 2)
	wantMsgs(t, "page after a gap", msgs, sent[9:11])

	// Acking the oldest moves oldest.
	f.ack(term(b, 101), sent[0].Msgid, sent[1].Msgid)
	if n, oldest := f.count(term(b, 101)); n != 23 || oldest != sent[2].Msgid {
		t.Fatalf("after ack: InboxCount = %d, %d; want 23, %d", n, oldest, sent[2].Msgid)
	}
}

// testOutOfOrder inserts messages with msgids below a reader's cursor
// while it pages: a reader that acks as it goes and re-pages from 0 once
// the writer is done must see every message exactly once.
func testOutOfOrder(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	rcpt := term(b, 101)

	// Deterministic case first: the cursor passed 10..19, then 0..9 land.
	msgs := make([]*pb.C2CMessage, 20)
	for i := range msgs {
		msgs[i] = newMsg(a, 101, b, fmt.Sprintf("ooo-%d-%d", f.uid, i), fmt.Sprint(i))
	}
	for _, m := range msgs[10:] {
		f.put(m, 101)
	}
	got := f.inbox(rcpt, 4)
	wantMsgs(t, "first pass", got, msgs[10:])
	for i := 9; i >= 0; i-- {
		f.put(msgs[i], 101)
	}
	if late, more := f.page(rcpt, got[len(got)-1].Msgid, 10); len(late) != 0 || more {
		t.Fatalf("page after the cursor saw %v, more %v", ids(late), more)
	}
	wantMsgs(t, "re-page from 0", f.inbox(rcpt, 4), msgs)
	f.ack(rcpt, ids(msgs)...)
	f.wantCount(rcpt, 0)

	// Concurrent case: a writer inserts in descending msgid order while
	// the reader pages, acking page k before it reads page k+1.
	const n = 60
	msgs = make([]*pb.C2CMessage, n)
	for i := range msgs {
		msgs[i] = newMsg(a, 101, b, fmt.Sprintf("ooo2-%d-%d", f.uid, i), fmt.Sprint(i))
	}
	for _, m := range msgs[n/2:] {
		f.put(m, 101)
	}
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := n/2 - 1; i >= 0; i-- {
			if _, _, err := f.s.PutC2C(f.ctx, msgs[i], []uint32{101}, nil); err != nil {
				errc <- err
				return
			}
		}
	}()
	seen := map[uint64]int{}
	pull := func() {
		after := uint64(0)
		for {
			page, more := f.page(rcpt, after, 5)
			for _, m := range page {
				seen[m.Msgid]++
			}
			if len(page) > 0 {
				if _, missing := f.ack(rcpt, ids(page)...); len(missing) != 0 {
					t.Fatalf("ack of a page just read: missing %v", missing)
				}
				after = page[len(page)-1].Msgid
			}
			if !more {
				return
			}
		}
	}
	pull()
	wg.Wait()
	select {
	case err := <-errc:
		t.Fatalf("writer: %v", err)
	default:
	}
	pull() // from 0 again: everything the first pass skipped
	for _, m := range msgs {
		if seen[m.Msgid] != 1 {
			t.Fatalf("msgid %d seen %d times", m.Msgid, seen[m.Msgid])
		}
	}
	if len(seen) != n {
		t.Fatalf("saw %d distinct messages, want %d", len(seen), n)
	}
	f.wantCount(rcpt, 0)
}

func testIdempotentRetry(t *testing.T, f *fixture) {
	a, b, c := f.user(), f.user(), f.user()
	orig := f.put(newMsg(a, 101, b, "cm-1", "hello"), 101, 102)

	retry := newMsg(a, 101, b, "cm-1", "hello again") // new msgid, same client id
	id, dup, err := f.s.PutC2C(f.ctx, retry, []uint32{101, 102}, nil)
	if err != nil || id != orig.Msgid || !dup {
		t.Fatalf("retry = %d, dup %v, %v; want %d, true, nil", id, dup, err, orig.Msgid)
	}
	// The same msgid again (a resend of the identical request) too.
	id, dup, err = f.s.PutC2C(f.ctx, orig, []uint32{101, 102}, nil)
	if err != nil || id != orig.Msgid || !dup {
		t.Fatalf("identical retry = %d, dup %v, %v; want %d, true, nil", id, dup, err, orig.Msgid)
	}
	for _, app := range []uint32{101, 102} {
		wantMsgs(t, "inbox after retries", f.inbox(term(b, app), 10), []*pb.C2CMessage{orig})
	}
	wantMsgs(t, "sender timeline", f.timeline(a, nil, 10), []*pb.C2CMessage{orig})
	wantMsgs(t, "recipient timeline", f.timeline(b, nil, 10), []*pb.C2CMessage{orig})

	// The key is the sender terminal: another appcode of a, or another
	// sender, with the same client id stores a new message.
	other := f.put(newMsg(a, 102, b, "cm-1", "from the pc"), 101)
	third := f.put(newMsg(c, 101, b, "cm-1", "from c"), 101)
	wantMsgs(t, "inbox 101", f.inbox(term(b, 101), 10), []*pb.C2CMessage{orig, other, third})

	// A retry after the recipient acked still finds the key.
	f.ack(term(b, 101), orig.Msgid)
	id, dup, err = f.s.PutC2C(f.ctx, newMsg(a, 101, b, "cm-1", "late retry"), []uint32{101, 102}, nil)
	if err != nil || id != orig.Msgid || !dup {
		t.Fatalf("retry after ack = %d, dup %v, %v; want %d, true, nil", id, dup, err, orig.Msgid)
	}
	wantMsgs(t, "inbox 101 after ack and retry", f.inbox(term(b, 101), 10), []*pb.C2CMessage{other, third})

	// An empty client id means no idempotency.
	e1 := f.put(newMsg(a, 101, b, "", "x"), 103)
	e2 := f.put(newMsg(a, 101, b, "", "x"), 103)
	wantMsgs(t, "inbox without client ids", f.inbox(term(b, 103), 10), []*pb.C2CMessage{e1, e2})
}

// testSentMsgid: the msgid stored under a client id is found by its
// sender terminal only, a retry does not change it, and unknown or empty
// ids are not found.
func testSentMsgid(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	sent := func(tm das.Terminal, cmid string) (uint64, bool) {
		t.Helper()
		id, ok, err := f.s.SentMsgid(f.ctx, tm, cmid)
		if err != nil {
			t.Fatalf("SentMsgid(%v, %q): %v", tm, cmid, err)
		}
		return id, ok
	}
	if id, ok := sent(term(a, 101), "p-1"); ok {
		t.Fatalf("before any send: found %d", id)
	}
	orig := f.put(newMsg(a, 101, b, "p-1", "first"), 101)
	if id, ok := sent(term(a, 101), "p-1"); !ok || id != orig.Msgid {
		t.Fatalf("after the send = %d, %v; want %d, true", id, ok, orig.Msgid)
	}
	if _, _, err := f.s.PutC2C(f.ctx, newMsg(a, 101, b, "p-1", "retry"), []uint32{101}, nil); err != nil {
		t.Fatal(err)
	}
	f.ack(term(b, 101), orig.Msgid)
	if id, ok := sent(term(a, 101), "p-1"); !ok || id != orig.Msgid {
		t.Fatalf("after a retry and the ack = %d, %v; want %d, true", id, ok, orig.Msgid)
	}
	for _, miss := range []struct {
		tm   das.Terminal
		cmid string
	}{{term(a, 102), "p-1"}, {term(b, 101), "p-1"}, {term(a, 101), "p-2"}, {term(a, 101), ""}} {
		if id, ok := sent(miss.tm, miss.cmid); ok {
			t.Fatalf("SentMsgid(%v, %q) = %d, want none", miss.tm, miss.cmid, id)
		}
	}
}

// testConcurrentIdempotent starts many tries of a few client ids at once,
// in several rounds (a lost race is a matter of timing, so one round
// proves little): each id must be stored once, and every try of it must
// get that one msgid.
func testConcurrentIdempotent(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	const rounds, keys, tries = 10, 4, 16
	type result struct {
		id    uint64
		dup   bool
		msgid uint64
		err   error
	}
	var stored []uint64
	for round := range rounds {
		results := make([][]result, keys)
		var start, wg sync.WaitGroup
		start.Add(1)
		for k := range keys {
			results[k] = make([]result, tries)
			for i := range tries {
				wg.Add(1)
				go func() {
					defer wg.Done()
					m := newMsg(a, 101, b, fmt.Sprintf("race-%d-%d", round, k), fmt.Sprintf("try %d", i))
					start.Wait()
					id, dup, err := f.s.PutC2C(f.ctx, m, []uint32{101, 102}, nil)
					results[k][i] = result{id, dup, m.Msgid, err}
				}()
			}
		}
		start.Done()
		wg.Wait()
		for k := range keys {
			winners := 0
			for _, r := range results[k] {
				if r.err != nil {
					t.Fatalf("round %d key %d: %v", round, k, r.err)
				}
				if r.id != results[k][0].id {
					t.Fatalf("round %d key %d: msgids %d and %d for one client id", round, k, r.id, results[k][0].id)
				}
				if !r.dup {
					winners++
					if r.id != r.msgid {
						t.Fatalf("round %d key %d: the stored try returned %d, its msgid is %d", round, k, r.id, r.msgid)
					}
				}
			}
			if winners != 1 {
				t.Fatalf("round %d key %d: %d tries stored, want 1", round, k, winners)
			}
			stored = append(stored, results[k][0].id)
		}
	}
	for _, app := range []uint32{101, 102} {
		wantIDs(t, "inbox", ids(f.inbox(term(b, app), 100)), stored)
	}
	wantIDs(t, "sender timeline", ids(f.timeline(a, nil, 100)), stored)
	wantIDs(t, "recipient timeline", ids(f.timeline(b, nil, 100)), stored)
}

func testInboxPerTerminal(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	both := f.send(a, b, "to both", 101, 102)
	only := f.send(a, b, "to 101", 101)

	acked, missing := f.ack(term(b, 101), both.Msgid)
	if len(missing) != 0 {
		t.Fatalf("missing %v", missing)
	}
	wantMsgs(t, "acked", acked, []*pb.C2CMessage{both})
	wantMsgs(t, "inbox 101", f.inbox(term(b, 101), 10), []*pb.C2CMessage{only})
	wantMsgs(t, "inbox 102", f.inbox(term(b, 102), 10), []*pb.C2CMessage{both})
	wantMsgs(t, "timeline", f.timeline(b, nil, 10), []*pb.C2CMessage{both, only})

	// 102 never had the second message.
	if acked, missing := f.ack(term(b, 102), only.Msgid); len(acked) != 0 || !slices.Equal(missing, []uint64{only.Msgid}) {
		t.Fatalf("ack on a terminal without the message: acked %v, missing %v", ids(acked), missing)
	}
	f.wantCount(term(b, 101), 1)
	acked, _ = f.ack(term(b, 102), both.Msgid)
	wantMsgs(t, "acked on 102", acked, []*pb.C2CMessage{both})
	f.wantCount(term(b, 102), 0)
	wantMsgs(t, "timeline after acks", f.timeline(b, nil, 10), []*pb.C2CMessage{both, only})
	wantMsgs(t, "sender timeline after acks", f.timeline(a, nil, 10), []*pb.C2CMessage{both, only})
}

func testAckUnknown(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	m1 := f.send(a, b, "1", 101)
	m2 := f.send(a, b, "2", 101)
	m3 := f.send(a, b, "3", 101)
	unknown1, unknown2 := NewMsgid(), NewMsgid()

	acked, missing := f.ack(term(b, 101), unknown1, m2.Msgid, unknown2)
	wantMsgs(t, "acked", acked, []*pb.C2CMessage{m2})
	wantIDs(t, "missing", missing, []uint64{unknown1, unknown2})
	wantMsgs(t, "inbox", f.inbox(term(b, 101), 10), []*pb.C2CMessage{m1, m3})

	// Acked already: missing now, and nothing else goes.
	acked, missing = f.ack(term(b, 101), m2.Msgid)
	if len(acked) != 0 || !slices.Equal(missing, []uint64{m2.Msgid}) {
		t.Fatalf("second ack: acked %v, missing %v", ids(acked), missing)
	}
	// Another user's terminal, and the sender's, never had them.
	for _, other := range []das.Terminal{term(a, 101), term(f.user(), 101)} {
		acked, missing = f.ack(other, m1.Msgid, m3.Msgid)
		if len(acked) != 0 {
			t.Fatalf("ack on %v removed %v", other, ids(acked))
		}
		wantIDs(t, "missing on another terminal", missing, []uint64{m1.Msgid, m3.Msgid})
	}
	f.wantCount(term(b, 101), 2)

	// Listed twice counts once; an empty list is a no-op.
	acked, missing = f.ack(term(b, 101), m1.Msgid, m1.Msgid)
	if len(missing) != 0 {
		t.Fatalf("duplicate ack: missing %v", missing)
	}
	wantMsgs(t, "duplicate ack", acked, []*pb.C2CMessage{m1})
	if acked, missing := f.ack(term(b, 101)); len(acked)+len(missing) != 0 {
		t.Fatalf("empty ack: %v, %v", ids(acked), missing)
	}
	wantMsgs(t, "inbox at the end", f.inbox(term(b, 101), 10), []*pb.C2CMessage{m3})
	wantMsgs(t, "timeline keeps acked messages", f.timeline(b, nil, 10), []*pb.C2CMessage{m1, m2, m3})
}

func testHistoryBothSides(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	m1 := f.send(a, b, "hi", 101)
	m2 := f.send(b, a, "hello", 101, 102)
	m3 := f.send(a, b, "how are you", 101)
	want := []*pb.C2CMessage{m1, m2, m3}
	wantMsgs(t, "a's history", f.timeline(a, nil, 10), want)
	wantMsgs(t, "b's history", f.timeline(b, nil, 10), want)
	wantMsgs(t, "a's history with b", f.timeline(a, &b, 10), want)
	wantMsgs(t, "b's history with a", f.timeline(b, &a, 10), want)
	// Inboxes hold only what each received.
	wantMsgs(t, "a's inbox", f.inbox(term(a, 101), 10), []*pb.C2CMessage{m2})
	wantMsgs(t, "b's inbox", f.inbox(term(b, 101), 10), []*pb.C2CMessage{m1, m3})
}

func testPeerFilter(t *testing.T, f *fixture) {
	a, b, c := f.user(), f.user(), f.user()
	d := f.userIn(b, b.Account+1) // b's uid in another account system
	var ab, ac, ad, all []*pb.C2CMessage
	for i := range 6 {
		var m *pb.C2CMessage
		switch i % 3 {
		case 0:
			m = f.send(a, b, "ab", 101)
			ab = append(ab, m)
		case 1:
			m = f.send(c, a, "ca", 101)
			ac = append(ac, m)
		case 2:
			m = f.send(d, a, "da", 101)
			ad = append(ad, m)
		}
		all = append(all, m)
	}
	wantMsgs(t, "a with b", f.timeline(a, &b, 2), ab)
	wantMsgs(t, "a with c", f.timeline(a, &c, 2), ac)
	wantMsgs(t, "a with d", f.timeline(a, &d, 2), ad)
	wantMsgs(t, "a with everyone", f.timeline(a, nil, 2), all)
	wantMsgs(t, "b with a", f.timeline(b, &a, 2), ab)
	wantMsgs(t, "c with a", f.timeline(c, &a, 2), ac)
	wantMsgs(t, "d with a", f.timeline(d, &a, 2), ad)
	if msgs, more := f.history(b, &c, 0, 10); len(msgs) != 0 || more {
		t.Fatalf("b with c: %v, more %v", ids(msgs), more)
	}
	wantMsgs(t, "b alone", f.timeline(b, nil, 10), ab)
}

func testSinceLimitMore(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	var sent []*pb.C2CMessage
	for i := range 12 {
		sent = append(sent, f.send(a, b, fmt.Sprint(i), 101))
	}
	for _, peer := range []*das.User{nil, &b} {
		since := uint64(0)
		for i, want := range []struct {
			n    int
			more bool
		}{{5, true}, {5, true}, {2, false}} {
			msgs, more := f.history(a, peer, since, 5)
			wantMsgs(t, fmt.Sprintf("page %d (peer %v)", i, peer), msgs, sent[5*i:5*i+want.n])
			if more != want.more {
				t.Fatalf("page %d (peer %v): more %v, want %v", i, peer, more, want.more)
			}
			since = msgs[len(msgs)-1].Msgid
		}
		if msgs, more := f.history(a, peer, since, 5); len(msgs) != 0 || more {
			t.Fatalf("after the last: %v, more %v", ids(msgs), more)
		}
		var bPeer *das.User // b's view of the same conversation
		if peer != nil {
			bPeer = &a
		}
		msgs, more := f.history(b, bPeer, sent[3].Msgid, 100)
		wantMsgs(t, "since the 4th, large limit", msgs, sent[4:])
		if more {
			t.Fatal("large limit: more = true")
		}
		msgs, more = f.history(a, peer, sent[10].Msgid-1, 1)
		wantMsgs(t, "since a gap", msgs, sent[10:11])
		if !more {
			t.Fatal("since a gap: more = false")
		}
	}
}

func testSelfAndCrossAccount(t *testing.T, f *fixture) {
	a := f.user()
	a2 := f.userIn(a, a.Account+1)
	// Same uid, other account system: a different user.
	m := f.send(a, a2, "cross", 101)
	f.wantCount(term(a, 101), 0)
	wantMsgs(t, "a2's inbox", f.inbox(term(a2, 101), 10), []*pb.C2CMessage{m})
	wantMsgs(t, "a's history", f.timeline(a, nil, 10), []*pb.C2CMessage{m})
	wantMsgs(t, "a2's history", f.timeline(a2, nil, 10), []*pb.C2CMessage{m})

	// A note to oneself (phone to pc) is on one timeline once.
	self := f.put(newMsg(a, 101, a, "note", "to my pc"), 102)
	wantMsgs(t, "a's pc inbox", f.inbox(term(a, 102), 10), []*pb.C2CMessage{self})
	wantMsgs(t, "a's history", f.timeline(a, nil, 10), []*pb.C2CMessage{m, self})
	wantMsgs(t, "a with a", f.timeline(a, &a, 10), []*pb.C2CMessage{self})
	f.ack(term(a, 102), self.Msgid)
	wantMsgs(t, "a's history after ack", f.timeline(a, nil, 10), []*pb.C2CMessage{m, self})
}

func testBadArguments(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	f.send(a, b, "x", 101)
	notRetryable := func(what string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		if errors.Is(err, das.ErrUnavailable) || errors.Is(err, das.ErrClosed) {
			t.Fatalf("%s: %v is not a bad-argument error", what, err)
		}
	}
	for _, limit := range []int{0, -1, math.MinInt} {
		_, _, err := f.s.InboxPage(f.ctx, term(b, 101), 0, limit)
		notRetryable(fmt.Sprintf("InboxPage limit %d", limit), err)
		_, _, err = f.s.History(f.ctx, a, nil, 0, limit)
		notRetryable(fmt.Sprintf("History limit %d", limit), err)
		_, _, err = f.s.History(f.ctx, a, &b, 0, limit)
		notRetryable(fmt.Sprintf("History(peer) limit %d", limit), err)
	}
	_, _, err := f.s.PutC2C(f.ctx, nil, []uint32{101}, nil)
	notRetryable("PutC2C(nil)", err)
	zero := newMsg(a, 101, b, "zero", "x")
	zero.Msgid = 0
	_, _, err = f.s.PutC2C(f.ctx, zero, []uint32{101}, nil)
	notRetryable("PutC2C(msgid 0)", err)
	noTo := newMsg(a, 101, b, "noto", "x")
	noTo.To = nil
	_, _, err = f.s.PutC2C(f.ctx, noTo, []uint32{101}, nil)
	notRetryable("PutC2C(no recipient)", err)
	noFrom := newMsg(a, 101, b, "nofrom", "x")
	noFrom.From = nil
	_, _, err = f.s.PutC2C(f.ctx, noFrom, []uint32{101}, nil)
	notRetryable("PutC2C(no sender)", err)
	f.wantCount(term(b, 101), 1)
	if got := f.timeline(a, nil, 10); len(got) != 1 {
		t.Fatalf("rejected puts left %d timeline entries", len(got))
	}
}

func testCanceledContext(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := f.s.PutC2C(ctx, newMsg(a, 101, b, "c", "x"), []uint32{101}, nil); err == nil {
		t.Fatal("PutC2C with a canceled context: no error")
	}
	f.wantCount(term(b, 101), 0)
	if _, _, err := f.s.InboxCount(ctx, term(b, 101)); err == nil {
		t.Fatal("InboxCount with a canceled context: no error")
	}
}

// testConcurrentWriters has many senders write to a few recipients at
// once, each retrying some sends, and then counts: every stored message is
// in each recipient terminal's inbox and on both timelines exactly once,
// and each sender's messages are in the order sent.
func testConcurrentWriters(t *testing.T, f *fixture) {
	const senders, perSender, recipients = 8, 40, 3
	var rcpts, from []das.User
	for range recipients {
		rcpts = append(rcpts, f.user())
	}
	for range senders {
		from = append(from, f.user())
	}
	sent := make([][]*pb.C2CMessage, senders)
	var wg sync.WaitGroup
	errc := make(chan error, senders)
	for s := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perSender {
				to := rcpts[(s+i)%recipients]
				m := newMsg(from[s], 101, to, fmt.Sprintf("w%d-%d", s, i), fmt.Sprintf("%d/%d", s, i))
				id, dup, err := f.s.PutC2C(f.ctx, m, []uint32{101, 102}, nil)
				if err == nil && (dup || id != m.Msgid) {
					err = fmt.Errorf("sender %d msg %d: id %d dup %v", s, i, id, dup)
				}
				if err == nil && i%4 == 0 { // a retry of the same send
					r := newMsg(from[s], 101, to, m.ClientMsgId, "retry")
					id, dup, err = f.s.PutC2C(f.ctx, r, []uint32{101, 102}, nil)
					if err == nil && (!dup || id != m.Msgid) {
						err = fmt.Errorf("retry of sender %d msg %d: id %d dup %v", s, i, id, dup)
					}
				}
				if err != nil {
					errc <- err
					return
				}
				sent[s] = append(sent[s], m)
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	want := map[das.User][]uint64{}
	bySender := map[das.User][]uint64{}
	for s := range senders {
		for _, m := range sent[s] {
			to := das.User{Account: m.To.Account, UID: m.To.Uid}
			want[to] = append(want[to], m.Msgid)
			bySender[from[s]] = append(bySender[from[s]], m.Msgid)
		}
	}
	total := 0
	for _, r := range rcpts {
		for _, app := range []uint32{101, 102} {
			got := f.inbox(term(r, app), 37)
			if !sortedByID(got) {
				t.Fatalf("inbox of %v/%d not strictly ascending", r, app)
			}
			wantIDs(t, fmt.Sprintf("inbox of %v/%d", r, app), ids(got), want[r])
			f.wantCount(term(r, app), len(want[r]))
			lastSeq := map[string]int{}
			for _, m := range got { // per-sender order
				var s, i int
				fmt.Sscanf(string(m.Content), "%d/%d", &s, &i)
				key := fmt.Sprint(s)
				if prev, ok := lastSeq[key]; ok && i <= prev {
					t.Fatalf("inbox of %v: sender %d's message %d after %d", r, s, i, prev)
				}
				lastSeq[key] = i
			}
		}
		got := f.timeline(r, nil, 41)
		if !sortedByID(got) {
			t.Fatalf("timeline of %v not strictly ascending", r)
		}
		wantIDs(t, fmt.Sprintf("timeline of %v", r), ids(got), want[r])
		total += len(got)
	}
	for _, s := range from {
		wantIDs(t, fmt.Sprintf("timeline of sender %v", s), ids(f.timeline(s, nil, 13)), bySender[s])
	}
	if total != senders*perSender {
		t.Fatalf("stored %d messages, want %d", total, senders*perSender)
	}
}

func testClosed(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	f.send(a, b, "x", 101)
	if err := f.s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := f.s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	check := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, das.ErrClosed) {
			t.Fatalf("%s after Close: %v, want ErrClosed", what, err)
		}
	}
	_, _, err := f.s.PutC2C(f.ctx, newMsg(a, 101, b, "y", "y"), []uint32{101}, nil)
	check("PutC2C", err)
	_, _, err = f.s.InboxCount(f.ctx, term(b, 101))
	check("InboxCount", err)
	_, _, err = f.s.InboxPage(f.ctx, term(b, 101), 0, 10)
	check("InboxPage", err)
	_, _, err = f.s.Ack(f.ctx, term(b, 101), []uint64{1})
	check("Ack", err)
	_, _, err = f.s.History(f.ctx, a, nil, 0, 10)
	check("History", err)
	_, _, err = f.s.SentMsgid(f.ctx, term(a, 101), "y")
	check("SentMsgid", err)
}

// testPutInbox: an app-server message stored for terminals of several
// users is in each inbox, on no timeline, and each ack removes it from that
// terminal only.
func testPutInbox(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	ts := []das.Terminal{term(a, 101), term(a, 102), term(b, 101)}
	m := &pb.C2CMessage{Msgid: NewMsgid(), From: &pb.User{}, FromAppcode: 101, To: &pb.User{}, Msgtype: 9, Content: []byte("new order")}
	if err := f.s.PutInbox(f.ctx, m, ts); err != nil {
		t.Fatal(err)
	}
	for _, tm := range ts {
		got := f.inbox(tm, 10)
		if len(got) != 1 || got[0].Msgid != m.Msgid || string(got[0].Content) != "new order" || got[0].Msgtype != 9 {
			t.Fatalf("inbox of %v: %v", tm, got)
		}
	}
	f.wantCount(term(b, 102), 0)
	if h := f.timeline(a, nil, 10); len(h) != 0 {
		t.Fatalf("an inbox-only message is on a timeline: %v", h)
	}
	acked, missing := f.ack(ts[0], m.Msgid)
	if len(acked) != 1 || len(missing) != 0 {
		t.Fatalf("ack: %v %v", acked, missing)
	}
	f.wantCount(ts[0], 0)
	for _, tm := range ts[1:] {
		if got := f.inbox(tm, 10); len(got) != 1 || string(got[0].Content) != "new order" {
			t.Fatalf("after another terminal's ack, inbox of %v: %v", tm, got)
		}
	}
	if err := f.s.PutInbox(f.ctx, m, nil); err == nil {
		t.Fatal("PutInbox with no terminals succeeded")
	}
}
