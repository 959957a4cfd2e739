package embedded

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	dto "github.com/prometheus/client_model/go"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
	"github.com/imd-dev/imd/schema/pb"
)

func openTest(t testing.TB, opts Options) *Store {
	t.Helper()
	s, err := Open(t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestConformance(t *testing.T) {
	dastest.Run(t, func(t *testing.T) das.Store {
		return openTest(t, Options{JanitorInterval: -1})
	})
}

// TestConformanceBusyJanitor runs the suite with a janitor sweeping every
// millisecond (with retention bounds the suite never reaches), so that
// collection runs concurrently with puts, pages and acks.
func TestConformanceBusyJanitor(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dastest.Run(t, func(t *testing.T) das.Store {
		return openTest(t, Options{
			JanitorInterval: time.Millisecond,
			Retention:       das.Retention{MaxAge: 24 * time.Hour, MaxCount: 10000, IdempotencyTTL: time.Hour},
		})
	})
}

var ctx = context.Background()

func user(uid uint64) das.User { return das.User{Account: 1, UID: uid} }

func term(u das.User, app uint32) das.Terminal {
	return das.Terminal{Account: u.Account, UID: u.UID, AppCode: app}
}

func msgAt(id uint64, from, to das.User, cmid string) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       id,
		From:        &pb.User{Account: from.Account, Uid: from.UID},
		FromAppcode: 101,
		To:          &pb.User{Account: to.Account, Uid: to.UID},
		Content:     []byte(fmt.Sprint("content ", id)),
		ClientMsgId: cmid,
	}
}

func mustPut(t *testing.T, s *Store, m *pb.C2CMessage, inbox ...uint32) {
	t.Helper()
	if _, dup, err := s.PutC2C(ctx, m, inbox, nil); err != nil || dup {
		t.Fatalf("PutC2C(%d): dup %v, %v", m.Msgid, dup, err)
	}
}

func historyIDs(t *testing.T, s *Store, u das.User, peer *das.User) []uint64 {
	t.Helper()
	msgs, _, err := s.History(ctx, u, peer, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]uint64, len(msgs))
	for i, m := range msgs {
		out[i] = m.Msgid
	}
	return out
}

// countTag counts the rows of one table.
func countTag(t testing.TB, s *Store, tag byte) int {
	t.Helper()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tag}, UpperBound: []byte{tag + 1}})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		n++
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	return n
}

func sweep(t *testing.T, s *Store) SweepStats {
	t.Helper()
	st, err := s.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func equalIDs(a []uint64, b ...uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestMsgTime(t *testing.T) {
	now := time.UnixMilli(time.Now().UnixMilli())
	id := das.MsgidAt(now) | 12345 // node and sequence bits
	if got := das.MsgTime(id); !got.Equal(now) {
		t.Fatalf("das.MsgTime(das.MsgidAt(%v)) = %v", now, got)
	}
	if das.MsgidAt(time.UnixMilli(das.SnowflakeEpoch-1)) != 0 {
		t.Fatal("MsgidAt before the epoch is not 0")
	}
	// A real bwmarrin/snowflake id (node 1, 2024-01-01T00:00:00Z).
	const ms = 1704067200000
	sf := uint64(ms-das.SnowflakeEpoch)<<22 | 1<<12 | 7
	if got := das.MsgTime(sf).UnixMilli(); got != ms {
		t.Fatalf("MsgTime = %d, want %d", got, ms)
	}
}

func TestKeys(t *testing.T) {
	p := inboxPrefix(das.Terminal{Account: 1, UID: 0xffffffffffffffff, AppCode: 0xffffffff})
	end := prefixEnd(p)
	if string(end) <= string(inboxKey(das.Terminal{Account: 1, UID: 0xffffffffffffffff, AppCode: 0xffffffff}, ^uint64(0))) {
		t.Fatal("prefixEnd is not above every key of the prefix")
	}
	if _, ok := afterBound(p, ^uint64(0)); ok {
		t.Fatal("afterBound(MaxUint64) exists")
	}
	v := encodeMessageValue([]uint32{101, 102}, nil, []byte("body"))
	apps, sapps, body, ok := decodeMessageValue(v)
	if !ok || len(apps) != 8 || len(sapps) != 0 || string(body) != "body" {
		t.Fatalf("decodeMessageValue = %v, %v, %q, %v", apps, sapps, body, ok)
	}
	v = encodeMessageValue([]uint32{101}, []uint32{102, 103}, []byte("body"))
	apps, sapps, body, ok = decodeMessageValue(v)
	if !ok || len(apps) != 4 || len(sapps) != 8 || string(body) != "body" {
		t.Fatalf("decodeMessageValue with sender terminals = %v, %v, %q, %v", apps, sapps, body, ok)
	}
	for _, bad := range [][]byte{nil, {msgValueVersion}, {2, 0}, {msgValueVersion, 5, 0}, {msgValueWithSenders, 0}, {msgValueWithSenders, 0, 2, 0}} {
		if _, _, _, ok := decodeMessageValue(bad); ok {
			t.Fatalf("decodeMessageValue(%v) ok", bad)
		}
	}
}

func TestPageCap(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, MaxPage: 5})
	a, b := user(1), user(2)
	for i := range 8 {
		mustPut(t, s, msgAt(uint64(100+i), a, b, ""), 101)
	}
	msgs, more, err := s.InboxPage(ctx, term(b, 101), 0, 1000)
	if err != nil || len(msgs) != 5 || !more {
		t.Fatalf("InboxPage(limit 1000) with MaxPage 5 = %d messages, more %v, %v", len(msgs), more, err)
	}
	msgs, more, err = s.History(ctx, a, nil, 0, 1000)
	if err != nil || len(msgs) != 5 || !more {
		t.Fatalf("History(limit 1000) with MaxPage 5 = %d messages, more %v, %v", len(msgs), more, err)
	}
	_, _, err = s.InboxPage(ctx, term(b, 101), 0, 0)
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("limit 0: %v, want ErrInvalid", err)
	}
}

func TestReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	a, b := user(1), user(2)
	mustPut(t, s, msgAt(500, a, b, "k"), 101)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if id, dup, err := s.PutC2C(ctx, msgAt(501, a, b, "k"), []uint32{101}, nil); err != nil || !dup || id != 500 {
		t.Fatalf("retry after reopen = %d, %v, %v", id, dup, err)
	}
	if got := historyIDs(t, s, b, &a); !equalIDs(got, 500) {
		t.Fatalf("history after reopen = %v", got)
	}
	// A second Open of a dir in use fails instead of corrupting it.
	if s2, err := Open(dir, Options{}); err == nil {
		s2.Close()
		t.Fatal("second Open of one dir succeeded")
	}
}

func TestRetentionMaxAge(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{MaxAge: time.Hour}})
	now := time.Now()
	s.now = func() time.Time { return now }
	a, b := user(1), user(2)
	old := das.MsgidAt(now.Add(-2 * time.Hour))
	fresh := das.MsgidAt(now.Add(-time.Minute))
	mustPut(t, s, msgAt(old+1, a, b, "o1"), 101)
	mustPut(t, s, msgAt(old+2, b, a, "o2"), 101)
	mustPut(t, s, msgAt(fresh+1, a, b, "f1"), 101)
	if _, _, err := s.Ack(ctx, term(a, 101), []uint64{old + 2}); err != nil {
		t.Fatal(err)
	}

	st := sweep(t, s)
	if st.Timeline != 4 {
		t.Fatalf("sweep removed %d timeline entries, want 4 (2 messages x 2 sides)", st.Timeline)
	}
	for _, u := range []das.User{a, b} {
		if got := historyIDs(t, s, u, nil); !equalIDs(got, fresh+1) {
			t.Fatalf("history of %v = %v", u, got)
		}
	}
	if got := historyIDs(t, s, a, &b); !equalIDs(got, fresh+1) {
		t.Fatalf("conversation a-b = %v", got)
	}
	// Retention never touches an inbox: b's old unacked message is still
	// there and readable; a acked old+2, so that one was collected.
	msgs, _, err := s.InboxPage(ctx, term(b, 101), 0, 10)
	if err != nil || len(msgs) != 2 || msgs[0].Msgid != old+1 || string(msgs[0].Content) == "" {
		t.Fatalf("b's inbox after retention = %v, %v", msgs, err)
	}
	if st.Messages != 1 || countTag(t, s, tagMessage) != 2 {
		t.Fatalf("collected %d messages, %d left; want 1, 2", st.Messages, countTag(t, s, tagMessage))
	}
	// Acking the old message now lets the next sweep collect it.
	if _, _, err := s.Ack(ctx, term(b, 101), []uint64{old + 1}); err != nil {
		t.Fatal(err)
	}
	if st := sweep(t, s); st.Messages != 1 || countTag(t, s, tagMessage) != 1 || countTag(t, s, tagGC) != 0 {
		t.Fatalf("second sweep %+v: %d messages, %d marks left", st, countTag(t, s, tagMessage), countTag(t, s, tagGC))
	}
}

func TestRetentionMaxCount(t *testing.T) {
	dir := t.TempDir()
	opts := Options{JanitorInterval: -1, Retention: das.Retention{MaxCount: 3}}
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	a, b, c := user(1), user(2), user(3)
	id := uint64(1000)
	next := func() uint64 { id++; return id }
	for range 5 {
		mustPut(t, s, msgAt(next(), a, b, ""), 101)
	}
	for range 2 {
		mustPut(t, s, msgAt(next(), c, a, ""), 101)
	}
	// a: 1001..1007 (7), b: 1001..1005 (5), c: 1006, 1007.
	st := sweep(t, s)
	if st.Timeline != 4+2 {
		t.Fatalf("removed %d timeline entries, want 6", st.Timeline)
	}
	if got := historyIDs(t, s, a, nil); !equalIDs(got, 1005, 1006, 1007) {
		t.Fatalf("a = %v", got)
	}
	if got := historyIDs(t, s, a, &b); !equalIDs(got, 1005) {
		t.Fatalf("a with b = %v", got)
	}
	if got := historyIDs(t, s, b, nil); !equalIDs(got, 1003, 1004, 1005) {
		t.Fatalf("b = %v", got)
	}
	if got := historyIDs(t, s, c, nil); !equalIDs(got, 1006, 1007) {
		t.Fatalf("c = %v", got)
	}
	// Nothing was acked: every message is still in b's or a's inbox.
	if st.Messages != 0 || countTag(t, s, tagMessage) != 7 {
		t.Fatalf("collected %d, %d messages left", st.Messages, countTag(t, s, tagMessage))
	}
	if st := sweep(t, s); st.Timeline != 0 {
		t.Fatalf("a sweep with nothing new removed %d", st.Timeline)
	}
	// After a restart the first sweep checks every timeline, including
	// ones that grew before the restart (the memory of them is gone).
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir, Options{JanitorInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	mustPut(t, s, msgAt(next(), c, b, ""), 101) // no MaxCount: b has 4 now
	s.Close()
	s, err = Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st := sweep(t, s); st.Timeline != 1 {
		t.Fatalf("first sweep after reopen removed %d, want 1", st.Timeline)
	}
	if got := historyIDs(t, s, b, nil); !equalIDs(got, 1004, 1005, 1008) {
		t.Fatalf("b after reopen = %v", got)
	}
	// Acking everything lets the collector take what no timeline holds.
	for _, u := range []das.User{a, b} {
		msgs, _, err := s.InboxPage(ctx, term(u, 101), 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		var ids []uint64
		for _, m := range msgs {
			ids = append(ids, m.Msgid)
		}
		if _, missing, err := s.Ack(ctx, term(u, 101), ids); err != nil || len(missing) != 0 {
			t.Fatalf("ack: %v, %v", missing, err)
		}
	}
	sweep(t, s)
	// Left: 1004, 1005 (b), 1006, 1007 (a, c), 1008 (b, c).
	if n := countTag(t, s, tagMessage); n != 5 {
		t.Fatalf("%d messages left, want 5", n)
	}
	if n := countTag(t, s, tagGC); n != 0 {
		t.Fatalf("%d collection marks left", n)
	}
}

func TestIdempotencyTTL(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{IdempotencyTTL: time.Hour}})
	ep := int64(s.idemEpochMs)
	if ep != (15 * time.Minute).Milliseconds() {
		t.Fatalf("epoch %d ms, want a quarter of the TTL", ep)
	}
	now := time.UnixMilli(time.Now().UnixMilli() / ep * ep) // the start of an epoch
	var mu sync.Mutex
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	a, b := user(1), user(2)
	mustPut(t, s, msgAt(10, a, b, "k1"), 101)
	mustPut(t, s, msgAt(11, a, b, "k2"), 101)
	advance(30 * time.Minute)
	mustPut(t, s, msgAt(12, a, b, "k3"), 101)
	if id, dup, _ := s.PutC2C(ctx, msgAt(20, a, b, "k1"), []uint32{101}, nil); !dup || id != 10 {
		t.Fatalf("retry within the TTL = %d, %v", id, dup)
	}
	advance(31 * time.Minute) // k1, k2 expired; k3 not
	// Expired but not swept: a retry stores a new message.
	if id, dup, err := s.PutC2C(ctx, msgAt(21, a, b, "k1"), []uint32{101}, nil); err != nil || dup || id != 21 {
		t.Fatalf("retry after the TTL = %d, %v, %v", id, dup, err)
	}
	// The first epoch's keys expired at +60m and +75m: it stays until
	// all of them did.
	if st := sweep(t, s); st.Idempotency != 0 {
		t.Fatalf("sweep at +61m removed %d keys, want 0", st.Idempotency)
	}
	if n := countIdem(t, s, tagIdem); n != 4 {
		t.Fatalf("%d keys, want 4 (k1 twice, k2, k3)", n)
	}
	if id, dup, _ := s.PutC2C(ctx, msgAt(22, a, b, "k1"), []uint32{101}, nil); !dup || id != 21 {
		t.Fatalf("retry of the replaced key = %d, %v", id, dup)
	}
	if id, dup, _ := s.PutC2C(ctx, msgAt(23, a, b, "k3"), []uint32{101}, nil); !dup || id != 12 {
		t.Fatalf("retry of k3 = %d, %v", id, dup)
	}
	advance(15 * time.Minute) // +76m: the first epoch (k1's first key, k2) goes
	if st := sweep(t, s); st.Idempotency != 2 {
		t.Fatalf("sweep at +76m removed %d keys, want 2", st.Idempotency)
	}
	if id, dup, _ := s.PutC2C(ctx, msgAt(24, a, b, "k1"), []uint32{101}, nil); !dup || id != 21 {
		t.Fatalf("retry of k1 after its first key went = %d, %v", id, dup)
	}
	advance(2 * time.Hour)
	if st := sweep(t, s); st.Idempotency != 2 {
		t.Fatalf("final sweep removed %d keys, want 2", st.Idempotency)
	}
	if n, q := countIdem(t, s, 0), countTag(t, s, tagIdemQueue); n != 0 || q != 0 {
		t.Fatalf("%d keys, %d queue rows left", n, q)
	}
}

// TestIdempotencyKeysOfBefore: a store written before the epochs kept each
// key as is, with a row in the expiry queue. Opened now, a retry still
// finds such a key, and the janitor expires them through the queue until
// it is empty.
func TestIdempotencyKeysOfBefore(t *testing.T) {
	dir := t.TempDir()
	opts := Options{JanitorInterval: -1, Retention: das.Retention{IdempotencyTTL: time.Hour}}
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	a, b := user(1), user(2)
	t0 := time.Now()
	ik := idemKey(term(a, 101), "old")
	stored := uint64(t0.UnixMilli())
	for k, v := range map[string][]byte{string(ik): encodeIdemValue(77, stored), string(idemQueueKey(stored, ik)): nil} {
		if err := s.db.Set([]byte(k), v, pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.legacyIdem.Load() {
		t.Fatal("a store with queue rows did not look for keys of before")
	}
	now := t0.Add(time.Minute)
	s.now = func() time.Time { return now }
	if id, dup, err := s.PutC2C(ctx, msgAt(78, a, b, "old"), []uint32{101}, nil); err != nil || !dup || id != 77 {
		t.Fatalf("retry of a key of before = %d, %v, %v; want 77, a dup", id, dup, err)
	}
	if id, _, err := s.SentMsgid(ctx, term(a, 101), "old"); err != nil || id != 77 {
		t.Fatalf("SentMsgid of a key of before = %d, %v", id, err)
	}
	now = t0.Add(2 * time.Hour)
	if st := sweep(t, s); st.Idempotency != 1 {
		t.Fatalf("sweep removed %d keys, want the one of before", st.Idempotency)
	}
	if s.legacyIdem.Load() || countTag(t, s, tagIdemQueue) != 0 || countTag(t, s, tagIdem) != 0 {
		t.Fatal("keys of before left, or still looked for, after they all expired")
	}
	if _, dup, err := s.PutC2C(ctx, msgAt(79, a, b, "old"), []uint32{101}, nil); err != nil || dup {
		t.Fatalf("retry after expiry: dup %v, %v; want a new message", dup, err)
	}
}

// TestIdempotencyExpiryRace sweeps expired keys while retries of the same
// keys replace them: a retry that stored a new message must keep its key.
func TestIdempotencyExpiryRace(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{IdempotencyTTL: time.Hour}})
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	a, b := user(1), user(2)
	const keys = 200
	for i := range keys {
		mustPut(t, s, msgAt(uint64(1000+i), a, b, fmt.Sprint("k", i)), 101)
	}
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	stored := make([]uint64, keys)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for range 5 {
			if _, err := s.Sweep(ctx); err != nil {
				t.Error(err)
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := range keys {
			id, dup, err := s.PutC2C(ctx, msgAt(uint64(5000+i), a, b, fmt.Sprint("k", i)), []uint32{101}, nil)
			if err != nil || dup {
				t.Errorf("retry %d after expiry: dup %v, %v", i, dup, err)
			}
			stored[i] = id
		}
	}()
	wg.Wait()
	sweep(t, s)
	for i := range keys {
		if id, dup, err := s.PutC2C(ctx, msgAt(uint64(9000+i), a, b, fmt.Sprint("k", i)), []uint32{101}, nil); err != nil || !dup || id != stored[i] {
			t.Fatalf("key %d: %d, dup %v, %v; want %d", i, id, dup, err, stored[i])
		}
	}
}

func TestCloseWhileBusy(t *testing.T) {
	s, err := Open(t.TempDir(), Options{JanitorInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	a, b := user(1), user(2)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				id := uint64(w)<<32 | uint64(i+1)
				_, _, err := s.PutC2C(ctx, msgAt(id, a, b, fmt.Sprint(id)), []uint32{101}, nil)
				if err == nil {
					_, _, err = s.Ack(ctx, term(b, 101), []uint64{id})
				}
				if err == nil {
					_, _, err = s.InboxPage(ctx, term(b, 101), 0, 10)
				}
				if errors.Is(err, das.ErrClosed) {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if _, err := s.Sweep(ctx); !errors.Is(err, das.ErrClosed) {
		t.Fatalf("Sweep after Close: %v", err)
	}
}

func TestOpenOptions(t *testing.T) {
	if _, err := Open(t.TempDir(), Options{Retention: das.Retention{MaxCount: -1}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("negative MaxCount: %v", err)
	}
}

// walSyncs returns how many WAL fsyncs the store has done.
func walSyncs(t testing.TB, s *Store) uint64 {
	var m dto.Metric
	if err := s.db.Metrics().LogWriter.FsyncLatency.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// TestGroupCommit shows that concurrent PutC2C calls share fsyncs: 16
// writers need far fewer syncs than puts, while serial puts need one each.
func TestGroupCommit(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1})
	a, b := user(1), user(2)
	const writers, each = 16, 20
	before := walSyncs(t, s)
	for i := range 50 {
		mustPut(t, s, msgAt(uint64(1+i), a, b, fmt.Sprint("s", i)), 101, 102)
	}
	serial := walSyncs(t, s) - before
	before = walSyncs(t, s)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				id := uint64(1000 + w*each + i)
				if _, _, err := s.PutC2C(ctx, msgAt(id, a, b, fmt.Sprint(id)), []uint32{101, 102}, nil); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	parallel := walSyncs(t, s) - before
	t.Logf("serial: 50 puts, %d fsyncs; %d writers: %d puts, %d fsyncs", serial, writers, writers*each, parallel)
	if serial < 45 { // a WAL rotation may fold one in; the point is the parallel case
		t.Fatalf("serial puts: %d fsyncs for 50 synced puts", serial)
	}
	if parallel >= writers*each*3/4 {
		t.Fatalf("concurrent puts did not share fsyncs: %d for %d puts", parallel, writers*each)
	}
}

// TestPutInboxCollectedAfterLastAck: the collector keeps an inbox-only
// message while any of its terminals still holds it, and removes it after
// the last ack.
func TestPutInboxCollectedAfterLastAck(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1})
	a := das.Terminal{Account: 1, UID: 10, AppCode: 101}
	b := das.Terminal{Account: 1, UID: 11, AppCode: 102}
	m := &pb.C2CMessage{Msgid: das.MsgidAt(time.Now()), From: &pb.User{}, To: &pb.User{}, Content: []byte("x")}
	if err := s.PutInbox(ctx, m, []das.Terminal{a, b}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Ack(ctx, a, []uint64{m.Msgid}); err != nil {
		t.Fatal(err)
	}
	sweep(t, s)
	got, _, err := s.InboxPage(ctx, b, 0, 10)
	if err != nil || len(got) != 1 || string(got[0].Content) != "x" {
		t.Fatalf("b's inbox after a's ack and a sweep: %v %v", got, err)
	}
	if _, _, err := s.Ack(ctx, b, []uint64{m.Msgid}); err != nil {
		t.Fatal(err)
	}
	sweep(t, s)
	if n := countTag(t, s, tagMessage); n != 0 {
		t.Fatalf("%d message rows left after every terminal acked", n)
	}
}
