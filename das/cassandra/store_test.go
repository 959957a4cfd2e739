package cassandra

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
	"github.com/imd-dev/imd/schema/pb"
)

func TestConformance(t *testing.T) {
	cfg := needCassandra(t)
	dastest.Run(t, func(t *testing.T) das.Store { return openTest(t, cfg) })
}

var ctx = context.Background()

// users of the engine tests: a random account system per test binary run
// and increasing uids, so tests never share a partition.
var (
	testAccount = 1 + rand.Uint32N(1<<20)
	lastUID     atomic.Uint64
)

func newUser() das.User { return das.User{Account: testAccount, UID: lastUID.Add(1)} }

func term(u das.User, app uint32) das.Terminal {
	return das.Terminal{Account: u.Account, UID: u.UID, AppCode: app}
}

var lastID atomic.Uint64

// msgidAround returns a fresh msgid made at about t: distinct from every
// other one this binary makes.
func msgidAround(t time.Time) uint64 { return das.MsgidAt(t) + lastID.Add(1)%(1<<22) }

func newMsg(id uint64, from, to das.User, cmid string) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       id,
		From:        &pb.User{Account: from.Account, Uid: from.UID},
		FromAppcode: 101,
		To:          &pb.User{Account: to.Account, Uid: to.UID},
		Msgtype:     3,
		Content:     fmt.Appendf(nil, "content of %d", id),
		SentAtMs:    das.MsgTime(id).UnixMilli(),
		ClientMsgId: cmid,
	}
}

func mustPut(t *testing.T, s *Store, m *pb.C2CMessage, inbox ...uint32) {
	t.Helper()
	id, dup, err := s.PutC2C(ctx, m, inbox, nil)
	if err != nil || dup || id != m.Msgid {
		t.Fatalf("PutC2C(%d) = %d, dup %v, %v", m.Msgid, id, dup, err)
	}
}

func ids(msgs []*pb.C2CMessage) []uint64 {
	out := make([]uint64, len(msgs))
	for i, m := range msgs {
		out[i] = m.Msgid
	}
	return out
}

func wantIDs(t *testing.T, what string, got []*pb.C2CMessage, want ...uint64) {
	t.Helper()
	if !slices.Equal(ids(got), want) {
		t.Fatalf("%s: got %v, want %v", what, ids(got), want)
	}
}

func page(t *testing.T, s *Store, tm das.Terminal, after uint64, limit int) []*pb.C2CMessage {
	t.Helper()
	msgs, _, err := s.InboxPage(ctx, tm, after, limit)
	if err != nil {
		t.Fatalf("InboxPage: %v", err)
	}
	return msgs
}

func metaOf(t *testing.T, s *Store, tm das.Terminal) inboxMeta {
	t.Helper()
	im, err := s.meta(ctx, tm)
	if err != nil {
		t.Fatal(err)
	}
	return im
}

// TestWatermark walks the inbox low watermark through its cases with a
// clock the test moves: it follows acks (with InboxLag of slack), rows
// written below it are marked late and still read, acking a late row
// removes its marker, and a stale marker goes once no retry can need it.
func TestWatermark(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	real := time.Now()
	clock := real
	s.now = func() time.Time { return clock }
	a, b := newUser(), newUser()
	rcpt := term(b, 101)
	var sent []*pb.C2CMessage
	for i := range 5 {
		m := newMsg(msgidAround(real), a, b, fmt.Sprint("w", i))
		mustPut(t, s, m, 101)
		sent = append(sent, m)
	}
	if im := metaOf(t, s, rcpt); im != (inboxMeta{}) {
		t.Fatalf("meta before any ack: %+v", im)
	}

	// Acks now: the watermark stays InboxLag behind, below every row.
	if _, _, err := s.Ack(ctx, rcpt, []uint64{sent[0].Msgid}); err != nil {
		t.Fatal(err)
	}
	if im := metaOf(t, s, rcpt); im.floor > das.MsgidAt(real.Add(-s.cfg.InboxLag)) || im.floor > sent[1].Msgid {
		t.Fatalf("floor %d passed now - lag (%d) or the first row", im.floor, das.MsgidAt(real.Add(-s.cfg.InboxLag)))
	}
	// An hour later: the watermark moves up to the first unacked row.
	clock = real.Add(time.Hour)
	if _, _, err := s.Ack(ctx, rcpt, []uint64{sent[1].Msgid, sent[2].Msgid}); err != nil {
		t.Fatal(err)
	}
	if im := metaOf(t, s, rcpt); im.floor != sent[3].Msgid || im.late != 0 {
		t.Fatalf("meta after acks an hour later: %+v, want floor %d", im, sent[3].Msgid)
	}
	wantIDs(t, "inbox above the floor", page(t, s, rcpt, 0, 10), sent[3].Msgid, sent[4].Msgid)

	// A message made before the floor and written now (an hour after its
	// msgid) is late: marked, and read from its marker.
	old := newMsg(msgidAround(real.Add(-10*time.Minute)), a, b, "old")
	mustPut(t, s, old, 101)
	if im := metaOf(t, s, rcpt); im.late != old.Msgid || im.start() != old.Msgid {
		t.Fatalf("meta after a late write: %+v, want late %d", im, old.Msgid)
	}
	wantIDs(t, "inbox with a late row", page(t, s, rcpt, 0, 10), old.Msgid, sent[3].Msgid, sent[4].Msgid)
	if n, oldest, err := s.InboxCount(ctx, rcpt); err != nil || n != 3 || oldest != old.Msgid {
		t.Fatalf("InboxCount = %d, %d, %v; want 3, %d", n, oldest, err, old.Msgid)
	}
	// The same client id again re-writes the claim's rows: still one row.
	if id, dup, err := s.PutC2C(ctx, newMsg(msgidAround(real), a, b, "old"), []uint32{101}, nil); err != nil || !dup || id != old.Msgid {
		t.Fatalf("retry of the late message = %d, %v, %v", id, dup, err)
	}
	acked, missing, err := s.Ack(ctx, rcpt, []uint64{old.Msgid})
	if err != nil || len(acked) != 1 || len(missing) != 0 {
		t.Fatalf("ack of the late row: %v, %v, %v", ids(acked), missing, err)
	}
	if im := metaOf(t, s, rcpt); im.late != 0 || im.floor != sent[3].Msgid {
		t.Fatalf("meta after acking the late row: %+v", im)
	}

	// A stale marker (its row acked before a retry re-marked it) stays
	// until no retry can come, then an ack drops it.
	stale := msgidAround(real.Add(-2 * time.Hour))
	raw := rawSession(t, cfg)
	if err := raw.Query(stmtInsertLate, i32(rcpt.Account), i64(rcpt.UID), i32(rcpt.AppCode), i64(stale)).Exec(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Ack(ctx, rcpt, []uint64{sent[3].Msgid}); err != nil {
		t.Fatal(err)
	}
	if im := metaOf(t, s, rcpt); im.late != stale {
		t.Fatalf("a recent stale marker was dropped: %+v", im)
	}
	clock = real.Add(s.cfg.Retention.IdempotencyTTL + s.cfg.InboxLag + time.Hour)
	if _, _, err := s.Ack(ctx, rcpt, []uint64{sent[4].Msgid}); err != nil {
		t.Fatal(err)
	}
	im := metaOf(t, s, rcpt)
	if im.late != 0 || im.floor != das.MsgidAt(clock.Add(-s.cfg.InboxLag)) {
		t.Fatalf("meta after the last ack, a day later: %+v", im)
	}
	// New messages after that are above the floor.
	fresh := newMsg(msgidAround(clock), a, b, "fresh")
	mustPut(t, s, fresh, 101)
	wantIDs(t, "inbox at the end", page(t, s, rcpt, 0, 10), fresh.Msgid)
}

// TestHistoryBuckets stores messages weeks apart, so that timelines span
// several partitions, and pages through them, with and without a peer.
func TestHistoryBuckets(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	a, b, c := newUser(), newUser(), newUser()
	now := time.Now()
	var ab, all []*pb.C2CMessage
	for i, age := range []time.Duration{40 * 24 * time.Hour, 30 * 24 * time.Hour, 9 * 24 * time.Hour, 8 * 24 * time.Hour, time.Hour, 0} {
		from, to := a, b
		if i%3 == 2 {
			from, to = c, a
		}
		m := newMsg(msgidAround(now.Add(-age)), from, to, fmt.Sprint("h", i))
		mustPut(t, s, m, 101)
		all = append(all, m)
		if to == b {
			ab = append(ab, m)
		}
	}
	if n := len(distinctBuckets(all)); n < 4 {
		t.Fatalf("messages in %d buckets, want several", n)
	}
	for _, limit := range []int{1, 2, 5, 100} {
		if got := history(t, s, a, nil, limit); !proto.Equal(&pb.C2CNotify{Messages: got}, &pb.C2CNotify{Messages: all}) {
			t.Fatalf("a's history by %d: %v, want %v", limit, ids(got), ids(all))
		}
		if got := history(t, s, a, &b, limit); !proto.Equal(&pb.C2CNotify{Messages: got}, &pb.C2CNotify{Messages: ab}) {
			t.Fatalf("a's history with b by %d: %v, want %v", limit, ids(got), ids(ab))
		}
	}
	// From the middle.
	got, more, err := s.History(ctx, a, nil, all[1].Msgid, 2)
	if err != nil || !more {
		t.Fatalf("History from the 2nd: more %v, %v", more, err)
	}
	wantIDs(t, "history from the 2nd", got, all[2].Msgid, all[3].Msgid)

	// Retention: with a 20-day max age, older messages are not written to
	// timelines, and reads start at the horizon.
	rcfg := cfg
	rcfg.Retention.MaxAge = 20 * 24 * time.Hour
	rs := openTest(t, rcfg)
	d, e := newUser(), newUser()
	var kept []uint64
	for _, m := range []*pb.C2CMessage{
		newMsg(msgidAround(now.Add(-25*24*time.Hour)), d, e, "r0"),
		newMsg(msgidAround(now.Add(-19*24*time.Hour)), d, e, "r1"),
		newMsg(msgidAround(now), d, e, "r2"),
	} {
		mustPut(t, rs, m, 101)
		if das.MsgTime(m.Msgid).After(now.Add(-20 * 24 * time.Hour)) {
			kept = append(kept, m.Msgid)
		}
	}
	if got := history(t, rs, d, nil, 10); !slices.Equal(ids(got), kept) {
		t.Fatalf("history with retention: %v, want %v", ids(got), kept)
	}
	// The inbox keeps everything: retention never removes an inbox row.
	if n, _, err := rs.InboxCount(ctx, term(e, 101)); err != nil || n != 3 {
		t.Fatalf("inbox with retention: %d, %v", n, err)
	}
	// TTLs end at msgid time + max age.
	raw := rawSession(t, cfg)
	var ttl int
	if err := raw.Query(`SELECT TTL(msg) FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid = ?`,
		i32(d.Account), i64(d.UID), bucketOf(kept[0]), i64(kept[0])).Scan(&ttl); err != nil {
		t.Fatal(err)
	}
	if want := time.Until(das.MsgTime(kept[0]).Add(rcfg.Retention.MaxAge)).Seconds(); float64(ttl) > want+5 || float64(ttl) < want-60 {
		t.Fatalf("TTL %d s, want about %.0f", ttl, want)
	}
}

func distinctBuckets(msgs []*pb.C2CMessage) map[int32]bool {
	out := map[int32]bool{}
	for _, m := range msgs {
		out[bucketOf(m.Msgid)] = true
	}
	return out
}

// history pages through u's whole history, limit at a time.
func history(t *testing.T, s *Store, u das.User, peer *das.User, limit int) []*pb.C2CMessage {
	t.Helper()
	var all []*pb.C2CMessage
	since := uint64(0)
	for {
		msgs, more, err := s.History(ctx, u, peer, since, limit)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, msgs...)
		if !more {
			return all
		}
		since = msgs[len(msgs)-1].Msgid
	}
}

// TestRetryCompletesClaim: a writer that died after its claim and before
// its batch (or whose batch failed) left a claim and no message; the retry
// with the same client id stores the claimed message, with the first
// msgid and the first content, and reports it as the stored one.
func TestRetryCompletesClaim(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	a, b := newUser(), newUser()
	first := newMsg(msgidAround(time.Now()), a, b, "half")
	body, _ := proto.Marshal(first)
	won, _, err := s.claim(ctx, first, body, []uint32{101, 102}, writeTime(first.Msgid))
	if err != nil || !won {
		t.Fatalf("claim: %v, %v", won, err)
	}
	if n, _, _ := s.InboxCount(ctx, term(b, 101)); n != 0 {
		t.Fatalf("a claim alone put %d messages in the inbox", n)
	}
	retry := newMsg(msgidAround(time.Now()), a, b, "half")
	retry.Content = []byte("the retry's content")
	id, dup, err := s.PutC2C(ctx, retry, []uint32{101}, nil)
	if err != nil || !dup || id != first.Msgid {
		t.Fatalf("retry = %d, dup %v, %v; want %d, true", id, dup, err, first.Msgid)
	}
	for _, app := range []uint32{101, 102} { // the claim's inbox, not the retry's
		got := page(t, s, term(b, app), 0, 10)
		if len(got) != 1 || !proto.Equal(got[0], first) {
			t.Fatalf("inbox %d after the retry: %v", app, got)
		}
	}
	if got := history(t, s, a, &b, 10); len(got) != 1 || !proto.Equal(got[0], first) {
		t.Fatalf("history after the retry: %v", got)
	}
	// An ack, then yet another retry: the re-written row stays deleted.
	if _, _, err := s.Ack(ctx, term(b, 101), []uint64{first.Msgid}); err != nil {
		t.Fatal(err)
	}
	if _, dup, err := s.PutC2C(ctx, retry, []uint32{101}, nil); err != nil || !dup {
		t.Fatalf("retry after ack: dup %v, %v", dup, err)
	}
	if n, _, _ := s.InboxCount(ctx, term(b, 101)); n != 0 {
		t.Fatalf("retry after ack revived the row: %d in the inbox", n)
	}
	if n, _, _ := s.InboxCount(ctx, term(b, 102)); n != 1 {
		t.Fatalf("inbox 102: %d, want 1", n)
	}
}

// TestSizeLimits: a message over MaxBatchBytes is refused as invalid
// before anything is written; PutInbox splits a large fan-out into
// batches.
func TestSizeLimits(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	a, b := newUser(), newUser()
	big := newMsg(msgidAround(time.Now()), a, b, "big")
	big.Content = make([]byte, 20<<10)
	if _, _, err := s.PutC2C(ctx, big, []uint32{101, 102}, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("PutC2C of 4 × 20 KiB: %v, want ErrInvalid", err)
	}
	if n, _, _ := s.InboxCount(ctx, term(b, 101)); n != 0 {
		t.Fatalf("refused message stored: %d", n)
	}
	ok := newMsg(msgidAround(time.Now()), a, b, "ok")
	ok.Content = make([]byte, 8<<10)
	mustPut(t, s, ok, 101, 102)

	push := &pb.C2CMessage{Msgid: msgidAround(time.Now()), From: &pb.User{}, To: &pb.User{}, Content: make([]byte, 2<<10)}
	var ts []das.Terminal
	for range 100 { // 100 × 2 KiB: five batches
		ts = append(ts, term(newUser(), 101))
	}
	if err := s.PutInbox(ctx, push, ts); err != nil {
		t.Fatal(err)
	}
	for _, tm := range ts {
		if got := page(t, s, tm, 0, 10); len(got) != 1 || !proto.Equal(got[0], push) {
			t.Fatalf("inbox of %v: %v", tm, ids(got))
		}
	}
}

// TestMigrate: Migrate is idempotent; Open refuses a keyspace without the
// schema; a new keyspace needs a replication.
func TestMigrate(t *testing.T) {
	cfg := needCassandra(t)
	if err := Migrate(ctx, cfg, nil); err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	if err := Migrate(ctx, cfg, map[string]int{cfg.LocalDC: 1}); err != nil {
		t.Fatalf("Migrate with the same replication: %v", err)
	}
	missing := cfg
	missing.Keyspace = cfg.Keyspace + "_none"
	if err := Migrate(ctx, missing, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Migrate of a new keyspace without replication: %v", err)
	}
	if _, err := Open(ctx, missing); !errors.Is(err, ErrSchema) {
		t.Fatalf("Open of a keyspace that does not exist: %v, want ErrSchema", err)
	}
	raw := rawSession(t, cfg)
	var n int
	if err := raw.Query(`SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil || n < 1 {
		t.Fatalf("schema_migrations: %d rows, %v", n, err)
	}
}
