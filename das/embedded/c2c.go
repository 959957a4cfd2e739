package embedded

import (
	"cmp"
	"context"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

func userOf(u *pb.User) das.User { return das.User{Account: u.GetAccount(), UID: u.GetUid()} }

// PutC2C implements das.Store. The message, its index rows and its
// idempotency key are one batch committed with a WAL sync. The
// idempotency check and the commit run under a lock striped by the
// idempotency key (sender terminal + client_msg_id), so concurrent retries
// of one client_msg_id store one message while different ids, even of one
// terminal, commit concurrently and share fsyncs;
// an empty ClientMsgId skips the check and the lock. Duplicate appcodes in
// inbox are stored once. A key older than IdempotencyTTL that the janitor
// has not removed yet counts as absent.
func (s *Store) PutC2C(ctx context.Context, m *pb.C2CMessage, inbox, senderInbox []uint32) (uint64, bool, error) {
	msgid, dup, err := s.putC2C(ctx, m, inbox, senderInbox)
	das.LogWrite(ctx, s.log, "put_c2c", cmp.Or(msgid, m.GetMsgid()), dup, err)
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

	b := s.db.NewBatch()
	defer b.Close()
	s.addMessage(b, m, appcodes, sapps, body)

	if m.ClientMsgId == "" {
		if err := b.Commit(pebble.Sync); err != nil {
			return 0, false, unavailable("put", err)
		}
		s.markDirty(m)
		return m.Msgid, false, nil
	}

	sender := das.Terminal{Account: m.From.GetAccount(), UID: m.From.GetUid(), AppCode: m.FromAppcode}
	ik := idemKey(sender, m.ClientMsgId)
	mu := &s.idemLocks[s.stripe(ik)]
	mu.Lock()
	defer mu.Unlock()

	now := s.nowMs()
	// A key that expired but is not collected yet counts as absent: the
	// new one, in a newer epoch, is the one lookups find first.
	if msgid, ok, err := s.liveIdem(ik, now); err != nil {
		return 0, false, unavailable("put: idempotency lookup", err)
	} else if ok {
		return msgid, true, nil
	}
	s.putIdem(b, ik, now, encodeIdemValue(m.Msgid, now))
	if err := b.Commit(pebble.Sync); err != nil {
		return 0, false, unavailable("put", err)
	}
	s.idem.add(ik, now)
	s.markDirty(m)
	return m.Msgid, false, nil
}

// SentMsgid implements das.Store: the idempotency key, which is written
// in the message's own batch, so ok means the message is stored.
func (s *Store) SentMsgid(ctx context.Context, sender das.Terminal, clientMsgID string) (uint64, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, false, err
	}
	defer s.gate.Exit()
	if clientMsgID == "" {
		return 0, false, nil
	}
	msgid, ok, err := s.liveIdem(idemKey(sender, clientMsgID), s.nowMs())
	if err != nil {
		return 0, false, unavailable("sent msgid", err)
	}
	return msgid, ok, nil
}

// PutInbox implements das.Store: the message row and one inbox row per
// terminal, in one synced batch. The message row lists the terminals (they
// may belong to many users), so the collector deletes it only once every
// one of them has acknowledged it.
func (s *Store) PutInbox(ctx context.Context, m *pb.C2CMessage, terminals []das.Terminal) error {
	if err := s.gate.Enter(ctx); err != nil {
		return err
	}
	defer s.gate.Exit()
	body, err := das.EncodeInbox(m, terminals)
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Set(msgKey(m.Msgid), encodeInboxMessageValue(terminals, body), nil)
	for _, t := range terminals {
		_ = b.Set(inboxKey(t, m.Msgid), nil, nil)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return unavailable("put inbox", err)
	}
	return nil
}

// addMessage adds the message row and its index rows to b. Batch.Set
// fails only on a closed or read-only batch, neither of which can happen
// here.
func (s *Store) addMessage(b *pebble.Batch, m *pb.C2CMessage, appcodes, senderAppcodes []uint32, body []byte) {
	from, to := userOf(m.From), userOf(m.To)
	_ = b.Set(msgKey(m.Msgid), encodeMessageValue(appcodes, senderAppcodes, body), nil)
	for _, a := range appcodes {
		_ = b.Set(inboxKey(das.Terminal{Account: to.Account, UID: to.UID, AppCode: a}, m.Msgid), nil, nil)
	}
	for _, a := range senderAppcodes {
		_ = b.Set(inboxKey(das.Terminal{Account: from.Account, UID: from.UID, AppCode: a}, m.Msgid), nil, nil)
	}
	_ = b.Set(timelineKey(from, m.Msgid), encodePeer(to), nil)
	_ = b.Set(convKey(from, to, m.Msgid), []byte{convOutgoing}, nil)
	if to != from {
		_ = b.Set(timelineKey(to, m.Msgid), encodePeer(from), nil)
		_ = b.Set(convKey(to, from, m.Msgid), []byte{convIncoming}, nil)
	}
}

func (s *Store) idemExpired(storedMs, nowMs uint64) bool {
	ttl := uint64(s.opts.Retention.IdempotencyTTL.Milliseconds())
	return storedMs+ttl <= nowMs
}

// InboxCount implements das.Store. It counts the terminal's index rows,
// so it costs O(n); offline inboxes are expected to stay small because
// pulling acknowledges.
func (s *Store) InboxCount(ctx context.Context, t das.Terminal) (int, uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, 0, err
	}
	defer s.gate.Exit()
	p := inboxPrefix(t)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return 0, 0, unavailable("inbox count", err)
	}
	n, oldest := 0, uint64(0)
	for ok := it.First(); ok; ok = it.Next() {
		if n == 0 {
			oldest = lastMsgid(it.Key())
		}
		n++
	}
	if err := closeIter(it); err != nil {
		return 0, 0, unavailable("inbox count", err)
	}
	return n, oldest, nil
}

// InboxPage implements das.Store. limit <= 0 is ErrInvalid; a limit
// above Options.MaxPage is served as MaxPage.
func (s *Store) InboxPage(ctx context.Context, t das.Terminal, after uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, false, err
	}
	defer s.gate.Exit()
	return s.page(inboxPrefix(t), after, limit, "inbox page")
}

// History implements das.Store. With peer == nil it reads u's timeline
// (every conversation); otherwise the conversation index of (u, peer).
// limit <= 0 is ErrInvalid; a limit above Options.MaxPage is served as
// MaxPage.
func (s *Store) History(ctx context.Context, u das.User, peer *das.User, since uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, false, err
	}
	defer s.gate.Exit()
	p := timelinePrefix(u)
	if peer != nil {
		p = convPrefix(u, *peer)
	}
	return s.page(p, since, limit, "history")
}

// page reads up to limit messages whose index keys have prefix p and end
// in a msgid > after. The index and the messages are read from one
// snapshot, so a message cannot be collected between the two.
func (s *Store) page(p []byte, after uint64, limit int, op string) ([]*pb.C2CMessage, bool, error) {
	if limit <= 0 {
		return nil, false, fmt.Errorf("%w: %s limit %d", ErrInvalid, op, limit)
	}
	limit = min(limit, s.opts.MaxPage)
	lower, ok := afterBound(p, after)
	if !ok {
		return nil, false, nil
	}
	snap := s.db.NewSnapshot()
	defer snap.Close()
	it, err := snap.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(p)})
	if err != nil {
		return nil, false, unavailable(op, err)
	}
	ids := make([]uint64, 0, min(limit, 64))
	more := false
	for valid := it.First(); valid; valid = it.Next() {
		if len(ids) == limit {
			more = true
			break
		}
		ids = append(ids, lastMsgid(it.Key()))
	}
	if err := closeIter(it); err != nil {
		return nil, false, unavailable(op, err)
	}
	msgs := make([]*pb.C2CMessage, 0, len(ids))
	for _, id := range ids {
		m, err := s.readMessage(snap, id)
		if err != nil {
			return nil, false, fmt.Errorf("%s: %w", op, err)
		}
		if m == nil {
			// An index row without its message breaks an invariant
			// (both are one batch, and collection checks the
			// rows); skip it rather than make the inbox unreadable.
			s.log.Error("index row without message", "op", op, "msgid", id)
			continue
		}
		msgs = append(msgs, m)
	}
	return msgs, more, nil
}

// readMessage returns the message msgid, or nil if there is none.
func (s *Store) readMessage(r pebble.Reader, msgid uint64) (*pb.C2CMessage, error) {
	m, _, err := s.readMessageKind(r, msgid)
	return m, err
}

// readMessageKind is readMessage that also says whether the message was
// stored by PutC2C, on timelines (not PutInbox).
func (s *Store) readMessageKind(r pebble.Reader, msgid uint64) (m *pb.C2CMessage, onTimelines bool, err error) {
	v, closer, err := r.Get(msgKey(msgid))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, unavailable("read message", err)
	}
	defer closer.Close()
	_, _, body, ok := decodeMessageValue(v)
	if !ok {
		return nil, false, fmt.Errorf("das/embedded: corrupt message value %d", msgid)
	}
	m = new(pb.C2CMessage)
	if err := proto.Unmarshal(body, m); err != nil {
		return nil, false, fmt.Errorf("das/embedded: corrupt message %d: %w", msgid, err)
	}
	return m, v[0] != msgValueInbox, nil
}

// Ack implements das.Store. It deletes each listed inbox row that exists,
// one point delete per msgid, in one synced batch, and returns the removed
// messages in the order listed and the other msgids as missing. A msgid
// listed twice counts once. Acks of one terminal are serialised (striped
// lock), so of two concurrent acks of one msgid exactly one removes it and
// the other reports it missing.
//
// A removed row may have been the message's last reference: then the
// message needs a collection mark. A PutInbox message (on no timeline)
// gets one in the same batch. A chat message keeps its timeline rows, so
// it gets one only if, after the batch, its sender's timeline row is gone
// (retention trimmed it): checked after the inbox rows are deleted, so a
// trim racing with this ack either is seen here or, marking the message
// itself, finds the rows gone. That spares the mark, and the janitor's
// check of it, for nearly every chat message
// (BenchmarkMessageLife).
func (s *Store) Ack(ctx context.Context, t das.Terminal, msgids []uint64) ([]*pb.C2CMessage, []uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, nil, err
	}
	defer s.gate.Exit()
	if len(msgids) == 0 {
		return nil, nil, nil
	}
	mu := &s.ackLocks[s.terminalStripe(t)]
	mu.Lock()
	defer mu.Unlock()

	// Rows of t change only under mu, and a message is collected only
	// after its last row is gone, so reading from the db directly is
	// consistent here.
	b := s.db.NewBatch()
	defer b.Close()
	var (
		acked   []*pb.C2CMessage
		missing []uint64
		chats   []*pb.C2CMessage // acked messages on timelines
	)
	seen := make(map[uint64]struct{}, len(msgids))
	for _, id := range msgids {
		if _, dup := seen[id]; dup {
			continue
		}
		seen[id] = struct{}{}
		k := inboxKey(t, id)
		_, closer, err := s.db.Get(k)
		if errors.Is(err, pebble.ErrNotFound) {
			missing = append(missing, id)
			continue
		}
		if err != nil {
			return nil, nil, unavailable("ack", err)
		}
		_ = closer.Close()
		m, onTimelines, err := s.readMessageKind(s.db, id)
		if err != nil {
			return nil, nil, fmt.Errorf("ack: %w", err)
		}
		if m == nil {
			s.log.Error("inbox row without message", "op", "ack", "msgid", id, "logid", das.LogID(ctx))
			m = &pb.C2CMessage{Msgid: id}
		}
		acked = append(acked, m)
		_ = b.Delete(k, nil)
		if onTimelines {
			chats = append(chats, m)
		} else {
			_ = b.Set(gcKey(id, s.gcEvent.Add(1)), nil, nil)
		}
	}
	if b.Empty() {
		return nil, missing, nil
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return nil, nil, unavailable("ack", err)
	}
	if err := s.markTrimmed(chats); err != nil {
		return nil, nil, err
	}
	return acked, missing, nil
}

// markTrimmed gives a collection mark to each chat message whose sender's
// timeline row is gone (see Ack).
func (s *Store) markTrimmed(msgs []*pb.C2CMessage) error {
	var b *pebble.Batch
	for _, m := range msgs {
		_, closer, err := s.db.Get(timelineKey(userOf(m.From), m.Msgid))
		if err == nil {
			_ = closer.Close()
			continue
		}
		if !errors.Is(err, pebble.ErrNotFound) {
			return unavailable("ack: timeline check", err)
		}
		if b == nil {
			b = s.db.NewBatch()
			defer b.Close()
		}
		_ = b.Set(gcKey(m.Msgid, s.gcEvent.Add(1)), nil, nil)
	}
	if b == nil {
		return nil
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return unavailable("ack: collection mark", err)
	}
	return nil
}

// closeIter closes it and returns the first error it met.
func closeIter(it *pebble.Iterator) error { return it.Close() }
