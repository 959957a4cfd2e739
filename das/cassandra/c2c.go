package cassandra

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// PutC2C implements das.Store.
//
// Rows: one logged batch holds every row of the message (the inbox row of
// each recipient terminal, the timeline row, bucket row, conversation
// row and conversation summary of sender and recipient, and the inbox row
// of each of the sender's other terminals), all with one write timestamp
// derived from the msgid (writeTime) except the summaries, whose timestamp
// is the msgid itself (conv.go). Cassandra's batchlog makes the batch all or
// nothing: once any row is applied, every row is, possibly after a replay.
// A message without a client id is that batch alone; resending the
// identical message (same msgid) writes identical cells.
//
// Idempotency: with a client id, PutC2C first claims the key (sender
// terminal, client id) with INSERT ... IF NOT EXISTS (a Paxos round at
// SerialConsistency), storing in the claim the msgid, the marshalled
// message, the inbox appcodes and the write timestamp. If the claim is
// won, the batch is written and (m.Msgid, false) returned. If the key is
// claimed already, the claim's batch is written again, from the claim's
// values and with the claim's timestamp, and (claimed msgid, true) is
// returned. Re-writing identical cells with the identical timestamp
// changes nothing if they are there, completes the message if the first
// writer died between its claim and its batch, and cannot revive an
// inbox row that was acknowledged since: Ack deletes with a later
// timestamp. So a client that timed out anywhere in PutC2C and retries
// with the same client id converges to exactly one stored message with
// the first msgid, whatever the first attempt managed to write, and a
// success is only ever returned after the batch was written at
// Consistency.
func (s *Store) PutC2C(ctx context.Context, m *pb.C2CMessage, inbox, senderInbox []uint32) (uint64, bool, error) {
	msgid, dup, err := s.putC2C(ctx, m, inbox, senderInbox)
	das.LogWrite(ctx, s.log, "put_c2c", cmp.Or(msgid, m.GetMsgid()), dup, err)
	if err == nil {
		s.markGrown(m)
	}
	return msgid, dup, err
}

func (s *Store) putC2C(ctx context.Context, m *pb.C2CMessage, inbox, senderInbox []uint32) (uint64, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, false, err
	}
	defer s.gate.Exit()
	body, appcodes, sapps, err := das.EncodeC2C(m, inbox, senderInbox)
	if err != nil {
		return 0, false, err
	}
	if n := batchBytes(len(body), len(appcodes)+len(sapps)); n > s.cfg.MaxBatchBytes {
		return 0, false, fmt.Errorf("%w: message %d: its batch would be about %d bytes, more than MaxBatchBytes %d",
			ErrInvalid, m.Msgid, n, s.cfg.MaxBatchBytes)
	}
	ts := writeTime(m.Msgid)
	if m.ClientMsgId == "" {
		if err := s.writeMessage(ctx, m, body, appcodes, sapps, ts); err != nil {
			return 0, false, storeErr("put", err)
		}
		return m.Msgid, false, nil
	}

	won, claim, err := s.claim(ctx, m, body, appcodes, ts)
	if err != nil {
		return 0, false, storeErr("put: idempotency claim", err)
	}
	if won {
		if err := s.writeMessage(ctx, m, body, appcodes, sapps, ts); err != nil {
			return 0, false, storeErr("put", err)
		}
		return m.Msgid, false, nil
	}
	// The sender's other terminals are all of its account's appcodes but
	// the sending one: the same for every attempt, so the caller's list
	// completes the claimed message as the first attempt would have.
	if err := s.writeMessage(ctx, claim.msg, claim.body, claim.inbox, sapps, claim.ts); err != nil {
		return 0, false, storeErr("put: complete the claimed message", err)
	}
	return claim.msg.Msgid, true, nil
}

// SentMsgid implements das.Store: one read of the idempotency claim at
// the store's consistency. The claim is written before the message's
// batch, so a claim whose first attempt died before its batch reads as
// stored; that attempt's retry completes the rows (PutC2C's dup path).
func (s *Store) SentMsgid(ctx context.Context, sender das.Terminal, clientMsgID string) (uint64, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, false, err
	}
	defer s.gate.Exit()
	if clientMsgID == "" {
		return 0, false, nil
	}
	var msgid int64
	err := s.q(stmtClaimMsgid, i32(sender.Account), i64(sender.UID), i32(sender.AppCode), clientMsgID).ScanContext(ctx, &msgid)
	if errors.Is(err, gocql.ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, storeErr("sent msgid", err)
	}
	return uint64(msgid), msgid != 0, nil
}

// batchBytes estimates the size of a message's batch: its body in each
// inbox row and on two timelines, and about 100 bytes of keys, timestamps
// and framing per row, for those and for the rows without the body (two
// bucket rows, two conversation rows, two conversation summaries, a late
// marker per inbox at most).
func batchBytes(body, inboxes int) int { return (inboxes+2)*(body+100) + (6+inboxes)*100 }

// claimed is an idempotency claim as stored.
type claimed struct {
	msg   *pb.C2CMessage
	body  []byte
	inbox []uint32
	ts    int64
}

// claim tries to claim m's idempotency key. It reports whether it won; if
// not, it returns the claim that holds the key.
func (s *Store) claim(ctx context.Context, m *pb.C2CMessage, body []byte, appcodes []uint32, ts int64) (bool, claimed, error) {
	ttl := int(math.Ceil(s.cfg.Retention.IdempotencyTTL.Seconds()))
	inbox := make([]int32, len(appcodes))
	for i, a := range appcodes {
		inbox[i] = i32(a)
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.InboxLag/4)
	defer cancel()
	// Not marked idempotent, so the driver does not retry it: a plain
	// retry of a claim that was applied but not answered (a CAS write
	// timeout) would find its own claim and take it for another's. This
	// loop retries instead, and knows its own claim by the msgid, which is
	// unique to this message.
	q := s.s.Query(stmtClaim, i32(m.From.GetAccount()), i64(m.From.GetUid()), i32(m.FromAppcode), m.ClientMsgId,
		i64(m.Msgid), body, inbox, ts, ttl).Consistency(s.cons).SerialConsistency(s.serial)
	var prev map[string]any
	backoff := 20 * time.Millisecond
	for attempt := 0; ; attempt++ {
		prev = map[string]any{}
		applied, err := q.MapScanCASContext(ctx, prev)
		if err == nil {
			if applied {
				return true, claimed{}, nil
			}
			if id, _ := prev["msgid"].(int64); attempt > 0 && id == i64(m.Msgid) {
				return true, claimed{}, nil // the attempt that failed was applied
			}
			break
		}
		if permanent(err) || attempt >= s.cfg.Retries || ctx.Err() != nil {
			return false, claimed{}, err
		}
		t := time.NewTimer(backoff/2 + rand.N(backoff/2+1))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return false, claimed{}, err
		}
		backoff = min(2*backoff, time.Second)
	}
	c, err := decodeClaim(prev)
	if err != nil {
		return false, claimed{}, fmt.Errorf("sender %d/%d/%d client id %q: %w",
			m.From.GetAccount(), m.From.GetUid(), m.FromAppcode, m.ClientMsgId, err)
	}
	return false, c, nil
}

func decodeClaim(row map[string]any) (claimed, error) {
	msgid, _ := row["msgid"].(int64)
	body, _ := row["msg"].([]byte)
	ts, _ := row["ts"].(int64)
	var c claimed
	c.msg = new(pb.C2CMessage)
	if err := proto.Unmarshal(body, c.msg); err != nil || msgid == 0 || uint64(msgid) != c.msg.Msgid || ts == 0 ||
		das.ValidateMessage(c.msg) != nil {
		return claimed{}, fmt.Errorf("das/cassandra: corrupt idempotency record (msgid %d, %d bytes, ts %d): %v",
			msgid, len(body), ts, err)
	}
	c.body, c.ts = body, ts
	switch v := row["inbox"].(type) {
	case []int:
		for _, a := range v {
			c.inbox = append(c.inbox, uint32(a))
		}
	case []int32:
		for _, a := range v {
			c.inbox = append(c.inbox, uint32(a))
		}
	case nil:
	default:
		return claimed{}, fmt.Errorf("das/cassandra: idempotency record inbox of type %T", v)
	}
	return c, nil
}

// writeTime is the write timestamp (microseconds) of every row of a
// message: its msgid's time. Deriving it from the msgid makes every
// re-write of a message identical to the first, so re-writes are
// idempotent, and a deletion (Ack, at a later timestamp) always wins.
func writeTime(msgid uint64) int64 { return das.MsgTime(msgid).UnixMicro() }

// writeMessage writes the rows of m in one logged batch with timestamp ts.
// It decides here, just before the write, whether the inbox rows are late
// (see README.md: below a watermark that may have passed them), and bounds
// the write by InboxLag/4, so that rows that are not marked late become
// visible well within InboxLag/2 of that decision.
func (s *Store) writeMessage(ctx context.Context, m *pb.C2CMessage, body []byte, appcodes, senderAppcodes []uint32, ts int64) error {
	now := s.now()
	late := s.isLate(m.Msgid, now)
	b := s.s.Batch(gocql.LoggedBatch).WithTimestamp(ts).Consistency(s.cons)
	to, from := m.To, m.From
	id := i64(m.Msgid)
	for _, a := range appcodes {
		addInboxRow(b, das.Terminal{Account: to.GetAccount(), UID: to.GetUid(), AppCode: a}, id, body, late)
	}
	for _, a := range senderAppcodes {
		addInboxRow(b, das.Terminal{Account: from.GetAccount(), UID: from.GetUid(), AppCode: a}, id, body, late)
	}
	maxAge := s.cfg.Retention.MaxAge
	bucket := bucketOf(m.Msgid)
	if ttl := ttlSeconds(maxAge, das.MsgTime(m.Msgid), now); ttl >= 0 {
		bttl := max(ttlSeconds(maxAge, bucketEnd(bucket), now), 0)
		sides := [][2]*pb.User{{from, to}, {to, from}}
		if from.GetAccount() == to.GetAccount() && from.GetUid() == to.GetUid() {
			sides = sides[:1] // a note to oneself is on one timeline once
		}
		for i, side := range sides {
			u, peer := side[0], side[1]
			add(b, stmtInsertTL, i32(u.GetAccount()), i64(u.GetUid()), bucket, id, body, ttl)
			add(b, stmtInsertTLB, i32(u.GetAccount()), i64(u.GetUid()), bucket, bttl)
			// The conversation row (incoming on the recipient's side)
			// and the conversation summary (conv.go).
			addConvRows(b, u, peer, id, i == 1, ttl)
		}
	}
	if len(b.Entries) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.InboxLag/4)
	defer cancel()
	return b.ExecContext(ctx)
}

// isLate reports whether an inbox row of msgid, written now, may land
// below a low watermark that has already passed it (README.md): its msgid
// time is more than InboxLag/2 in the past.
func (s *Store) isLate(msgid uint64, now time.Time) bool {
	return das.MsgTime(msgid).Before(now.Add(-s.cfg.InboxLag / 2))
}

// add appends an idempotent statement to b.
func add(b *gocql.Batch, stmt string, args ...any) {
	b.Entries = append(b.Entries, gocql.BatchEntry{Stmt: stmt, Args: args, Idempotent: true})
}

// addInboxRow appends t's inbox row of a message, and its late marker.
func addInboxRow(b *gocql.Batch, t das.Terminal, id int64, body []byte, late bool) {
	add(b, stmtInsertInbox, i32(t.Account), i64(t.UID), i32(t.AppCode), id, body, late)
	if late {
		add(b, stmtInsertLate, i32(t.Account), i64(t.UID), i32(t.AppCode), id)
	}
}

// History implements das.Store. With peer == nil it reads u's timeline
// buckets in order (those timeline_buckets lists, from since's bucket on);
// otherwise the msgids of the conversation index, then their bodies from
// u's timeline, one IN query per bucket. Reads start no lower than the
// retention horizon, so rows expired by TTL are not scanned. limit <= 0 is
// ErrInvalid; a limit above Config.MaxPage is served as MaxPage.
func (s *Store) History(ctx context.Context, u das.User, peer *das.User, since uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, false, err
	}
	defer s.gate.Exit()
	if limit <= 0 {
		return nil, false, fmt.Errorf("%w: history limit %d", ErrInvalid, limit)
	}
	limit = min(limit, s.cfg.MaxPage)
	if since >= das.MaxMsgid {
		return nil, false, nil
	}
	from := since + 1
	if maxAge := s.cfg.Retention.MaxAge; maxAge > 0 {
		from = max(from, das.MsgidAt(s.now().Add(-maxAge)))
	}
	var (
		msgs []*pb.C2CMessage
		err  error
	)
	if peer == nil {
		msgs, err = s.timeline(ctx, u, from, limit+1)
	} else {
		msgs, err = s.conversation(ctx, u, *peer, from, limit+1)
	}
	if err != nil {
		return nil, false, storeErr("history", err)
	}
	if len(msgs) > limit {
		return msgs[:limit], true, nil
	}
	return msgs, false, nil
}

// timeline reads up to n messages of u's timeline with msgid >= from.
func (s *Store) timeline(ctx context.Context, u das.User, from uint64, n int) ([]*pb.C2CMessage, error) {
	it := s.q(stmtBuckets, i32(u.Account), i64(u.UID), bucketOf(from)).IterContext(ctx)
	var (
		buckets []int32
		b       int32
	)
	for it.Scan(&b) {
		buckets = append(buckets, b)
	}
	if err := it.Close(); err != nil {
		return nil, err
	}
	var msgs []*pb.C2CMessage
	for _, b := range buckets {
		need := n - len(msgs)
		it := s.q(stmtTLPage, i32(u.Account), i64(u.UID), b, i64(from), need).PageSize(need).IterContext(ctx)
		page, err := scanMessages(it, need)
		if err != nil {
			return nil, err
		}
		msgs = append(msgs, page...)
		if len(msgs) >= n {
			break
		}
	}
	return msgs, nil
}

// conversation reads up to n messages between u and peer with msgid >=
// from: the msgids from the conversation index, the bodies from u's
// timeline (same TTL, same batch).
func (s *Store) conversation(ctx context.Context, u, peer das.User, from uint64, n int) ([]*pb.C2CMessage, error) {
	it := s.q(stmtConvPage, i32(u.Account), i64(u.UID), i32(peer.Account), i64(peer.UID), i64(from), n).
		PageSize(n).IterContext(ctx)
	var (
		ids []int64
		id  int64
	)
	for it.Scan(&id) {
		ids = append(ids, id)
	}
	if err := it.Close(); err != nil {
		return nil, err
	}
	bodies := make(map[int64]*pb.C2CMessage, len(ids))
	for i := 0; i < len(ids); {
		b := bucketOf(uint64(ids[i]))
		j := i + 1
		for j < len(ids) && j-i < ackChunk && bucketOf(uint64(ids[j])) == b {
			j++
		}
		it := s.q(stmtTLIn, i32(u.Account), i64(u.UID), b, ids[i:j]).IterContext(ctx)
		page, err := scanMessages(it, j-i)
		if err != nil {
			return nil, err
		}
		for _, m := range page {
			bodies[i64(m.Msgid)] = m
		}
		i = j
	}
	msgs := make([]*pb.C2CMessage, 0, len(ids))
	for _, id := range ids {
		if m, ok := bodies[id]; ok {
			msgs = append(msgs, m)
		} else {
			// Both rows share a batch and an expiry; a body can only be
			// missing for the second in which both expire.
			s.log.Debug("conversation row without timeline row", "user", u, "msgid", id)
		}
	}
	return msgs, nil
}
