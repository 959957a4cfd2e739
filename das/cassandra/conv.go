package cassandra

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

var _ das.ConvStore = (*Store)(nil)

// The conversation list (schema/cql 003_conv): conv_summary holds, per user
// and peer, the newest msgid (the body is that msgid's row on the user's
// timeline) and the user's read mark. Both cells are written USING
// TIMESTAMP <their value>, a msgid, so the greatest value wins whatever the
// order of the writes and no write needs a read or a transaction: last_msgid
// in each message's logged batch (writeMessage), read_mark in a statement of
// its own. Every cell of the table has a msgid as its timestamp, so a
// deletion with timestamp t removes exactly the cells of msgids up to t
// (trimUser uses that). The conversation rows carry incoming, for unread
// counts.
const (
	stmtInsertConvDir = `INSERT INTO conversation (account, uid, peer_account, peer_uid, msgid, incoming) VALUES (?, ?, ?, ?, ?, ?) USING TTL ?`
	stmtSetLast       = `UPDATE conv_summary USING TIMESTAMP ? AND TTL ? SET last_msgid = ? WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ?`
	stmtSetReadMark   = `UPDATE conv_summary USING TIMESTAMP ? AND TTL ? SET read_mark = ? WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ?`
	stmtReadMark      = `SELECT read_mark FROM conv_summary WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ?`
	stmtSummaries     = `SELECT peer_account, peer_uid, last_msgid, read_mark FROM conv_summary WHERE account = ? AND uid = ?`
	stmtUnread        = `SELECT incoming FROM conversation WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ? AND msgid >= ?`
	stmtConvNewest    = `SELECT msgid, incoming FROM conversation WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ? AND msgid <= ? ORDER BY msgid DESC LIMIT ?`
	stmtTrimSummary   = `DELETE last_msgid FROM conv_summary USING TIMESTAMP ? WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ?`

	stmtSetGroupRead = `UPDATE group_reads USING TIMESTAMP ? SET read_seq = ? WHERE account = ? AND uid = ? AND group_id = ?`
	stmtGroupRead    = `SELECT read_seq FROM group_reads WHERE account = ? AND uid = ? AND group_id = ?`
	stmtGroupReads   = `SELECT group_id, read_seq FROM group_reads WHERE account = ? AND uid = ? AND group_id IN ?`
)

// convWorkers bounds the unread counts (one query each) that one
// Conversations call runs at once.
const convWorkers = 8

// addConvRows appends to a message's batch the conversation row and the
// summary cell of one side: u's, with peer. The summary's timestamp is the
// msgid itself (not the batch's, the msgid's millisecond, which two
// messages may share), so the newest msgid always wins.
func addConvRows(b *gocql.Batch, u, peer *pb.User, id int64, incoming bool, ttl int) {
	acc, uid, pacc, puid := i32(u.GetAccount()), i64(u.GetUid()), i32(peer.GetAccount()), i64(peer.GetUid())
	add(b, stmtInsertConvDir, acc, uid, pacc, puid, id, incoming, ttl)
	add(b, stmtSetLast, id, ttl, id, acc, uid, pacc, puid)
}

// Conversations implements das.ConvStore: the summaries (one partition,
// paged), the bodies of their last messages from u's timeline (one IN
// query per bucket and 100 msgids), then the unread counts of the
// conversations withUnread selects, up to convWorkers at once, each one
// read of the conversation's rows above the mark. The order is the
// clustering order of the peers (account system, then uid).
//
// The summary and the timeline row of a message are written by one logged
// batch, which is atomic but not isolated: a read racing the write may
// see the summary first. The summary then names a message whose body is not
// visible yet; the conversation is answered as it was before that message
// (its newest row with a body), so the next sync sees the change.
func (s *Store) Conversations(ctx context.Context, u das.User, withUnread func(das.ConvSummary) bool) ([]das.ConvSummary, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	out, err := s.conversations(ctx, u, withUnread)
	if err != nil {
		return nil, storeErr("conversations", err)
	}
	return out, nil
}

func (s *Store) conversations(ctx context.Context, u das.User, withUnread func(das.ConvSummary) bool) ([]das.ConvSummary, error) {
	var out []das.ConvSummary
	it := s.q(stmtSummaries, i32(u.Account), i64(u.UID)).PageSize(1000).IterContext(ctx)
	var (
		pacc       int32
		puid, last int64
		mark       *int64
	)
	for it.Scan(&pacc, &puid, &last, &mark) {
		if last <= 0 {
			continue // a read mark alone, or a summary trimmed by MaxCount
		}
		c := das.ConvSummary{Peer: das.User{Account: uint32(pacc), UID: uint64(puid)}, Last: &pb.C2CMessage{Msgid: uint64(last)}, Unread: -1}
		if mark != nil {
			c.Read = uint64(*mark)
		}
		out = append(out, c)
		mark = nil
	}
	if err := it.Close(); err != nil {
		return nil, err
	}

	ids := make([]int64, len(out))
	for i, c := range out {
		ids[i] = i64(c.Last.Msgid)
	}
	bodies, err := s.timelineBodies(ctx, u, ids)
	if err != nil {
		return nil, err
	}
	for i := range out {
		c := &out[i]
		if m, ok := bodies[i64(c.Last.Msgid)]; ok {
			c.Last = m
			continue
		}
		if c.Last, err = s.newestWithBody(ctx, u, c.Peer, c.Last.Msgid); err != nil {
			return nil, err
		}
	}

	var todo []int
	for i, c := range out {
		if withUnread == nil || withUnread(c) {
			todo = append(todo, i)
		}
	}
	return out, s.countUnread(ctx, u, out, todo)
}

// timelineBodies reads the messages ids from u's timeline, by bucket.
func (s *Store) timelineBodies(ctx context.Context, u das.User, ids []int64) (map[int64]*pb.C2CMessage, error) {
	ids = slices.Clone(ids)
	slices.Sort(ids)
	bodies := make(map[int64]*pb.C2CMessage, len(ids))
	for i := 0; i < len(ids); {
		b := bucketOf(uint64(ids[i]))
		j := i + 1
		for j < len(ids) && j-i < ackChunk && bucketOf(uint64(ids[j])) == b {
			j++
		}
		page, err := scanMessages(s.q(stmtTLIn, i32(u.Account), i64(u.UID), b, ids[i:j]).IterContext(ctx), j-i)
		if err != nil {
			return nil, err
		}
		for _, m := range page {
			bodies[i64(m.Msgid)] = m
		}
		i = j
	}
	return bodies, nil
}

// newestWithBody returns the newest message of u's conversation with peer
// up to last whose timeline row is visible. With none (the rows expired,
// or are still being written), it returns a message that has only the
// msgid last and the users, so that the conversation stays listed.
func (s *Store) newestWithBody(ctx context.Context, u, peer das.User, last uint64) (*pb.C2CMessage, error) {
	const look = 4
	it := s.q(stmtConvNewest, i32(u.Account), i64(u.UID), i32(peer.Account), i64(peer.UID), i64(last), look).IterContext(ctx)
	var (
		ids      []int64
		id       int64
		incoming *bool
		lastIn   bool
	)
	for it.Scan(&id, &incoming) {
		if id == i64(last) && incoming != nil {
			lastIn = *incoming
		}
		ids = append(ids, id)
		incoming = nil
	}
	if err := it.Close(); err != nil {
		return nil, err
	}
	bodies, err := s.timelineBodies(ctx, u, ids)
	if err != nil {
		return nil, err
	}
	for _, id := range ids { // newest first
		if m, ok := bodies[id]; ok {
			return m, nil
		}
	}
	s.log.Debug("conversation summary without a visible message", "user", u, "peer", peer, "msgid", last)
	from, to := u, peer
	if lastIn {
		from, to = peer, u
	}
	return &pb.C2CMessage{Msgid: last, From: &pb.User{Account: from.Account, Uid: from.UID}, To: &pb.User{Account: to.Account, Uid: to.UID}}, nil
}

// countUnread fills in Unread of out[i] for each i in todo.
func (s *Store) countUnread(ctx context.Context, u das.User, out []das.ConvSummary, todo []int) error {
	if len(todo) == 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		next = make(chan int)
	)
	for range min(convWorkers, len(todo)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				n, err := s.unread(ctx, u, out[i].Peer, out[i].Read)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					cancel()
					continue
				}
				out[i].Unread = n
			}
		}()
	}
	for _, i := range todo {
		if ctx.Err() != nil {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return ctx.Err()
}

// unread counts the rows of u's conversation with peer above mark (and
// within retention) that came from peer, up to das.MaxUnread. Rows written
// before the incoming column existed have none: they count. A note to
// oneself is never unread.
func (s *Store) unread(ctx context.Context, u, peer das.User, mark uint64) (int, error) {
	if u == peer || mark >= das.MaxMsgid {
		return 0, nil
	}
	from := mark + 1
	if maxAge := s.cfg.Retention.MaxAge; maxAge > 0 {
		from = max(from, das.MsgidAt(s.now().Add(-maxAge)))
	}
	it := s.q(stmtUnread, i32(u.Account), i64(u.UID), i32(peer.Account), i64(peer.UID), i64(from)).
		PageSize(das.MaxUnread).IterContext(ctx)
	var (
		incoming *bool
		n        int
	)
	for n < das.MaxUnread && it.Scan(&incoming) {
		if incoming == nil || *incoming {
			n++
		}
		incoming = nil
	}
	if err := it.Close(); err != nil {
		return 0, err
	}
	return n, nil
}

// MarkRead implements das.ConvStore: an update of read_mark USING
// TIMESTAMP upTo (a lower mark written later loses to it, a higher one
// wins), then a read of the mark at the same consistency. With
// Retention.MaxAge the mark expires max_age after its msgid's time, when
// every message it covers has expired; a mark already that old is not
// written. upTo above das.MaxMsgid is ErrInvalid.
func (s *Store) MarkRead(ctx context.Context, u, peer das.User, upTo uint64) (uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, err
	}
	defer s.gate.Exit()
	if upTo > das.MaxMsgid {
		return 0, fmt.Errorf("%w: read mark %d above the largest msgid", ErrInvalid, upTo)
	}
	key := []any{i32(u.Account), i64(u.UID), i32(peer.Account), i64(peer.UID)}
	if upTo > 0 {
		if ttl := ttlSeconds(s.cfg.Retention.MaxAge, das.MsgTime(upTo), s.now()); ttl >= 0 {
			args := append([]any{i64(upTo), ttl, i64(upTo)}, key...)
			if err := s.q(stmtSetReadMark, args...).ExecContext(ctx); err != nil {
				return 0, storeErr("mark read", err)
			}
		}
	}
	var mark *int64
	if err := s.q(stmtReadMark, key...).ScanContext(ctx, &mark); err != nil && !errors.Is(err, gocql.ErrNotFound) {
		return 0, storeErr("mark read", err)
	}
	if mark == nil {
		return 0, nil
	}
	return uint64(*mark), nil
}

// GroupReads implements das.ConvStore: one IN query per 100 groups.
func (s *Store) GroupReads(ctx context.Context, u das.User, ids []uint64) ([]uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	reads := make(map[uint64]uint64, len(ids))
	uniq := slices.Compact(slices.Sorted(slices.Values(ids)))
	for i := 0; i < len(uniq); i += ackChunk {
		chunk := make([]int64, 0, ackChunk)
		for _, id := range uniq[i:min(i+ackChunk, len(uniq))] {
			chunk = append(chunk, i64(id))
		}
		it := s.q(stmtGroupReads, i32(u.Account), i64(u.UID), chunk).IterContext(ctx)
		var id, seq int64
		for it.Scan(&id, &seq) {
			reads[uint64(id)] = uint64(seq)
		}
		if err := it.Close(); err != nil {
			return nil, storeErr("group reads", err)
		}
	}
	out := make([]uint64, len(ids))
	for i, id := range ids {
		out[i] = reads[id]
	}
	return out, nil
}

// MarkGroupRead implements das.ConvStore: an update USING TIMESTAMP seq,
// then a read. seq above 2^63-1 is ErrInvalid.
func (s *Store) MarkGroupRead(ctx context.Context, u das.User, id uint64, seq uint64) (uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, err
	}
	defer s.gate.Exit()
	if seq > das.MaxMsgid {
		return 0, fmt.Errorf("%w: group read seq %d above 2^63-1", ErrInvalid, seq)
	}
	if seq > 0 {
		if err := s.q(stmtSetGroupRead, i64(seq), i64(seq), i32(u.Account), i64(u.UID), i64(id)).ExecContext(ctx); err != nil {
			return 0, storeErr("mark group read", err)
		}
	}
	var cur *int64
	if err := s.q(stmtGroupRead, i32(u.Account), i64(u.UID), i64(id)).ScanContext(ctx, &cur); err != nil && !errors.Is(err, gocql.ErrNotFound) {
		return 0, storeErr("mark group read", err)
	}
	if cur == nil {
		return 0, nil
	}
	return uint64(*cur), nil
}
