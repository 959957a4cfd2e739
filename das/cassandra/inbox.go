package cassandra

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// inboxMeta is a terminal's read state: the low watermark and the oldest
// late row (0: none).
type inboxMeta struct {
	floor, late uint64
}

// start returns where reads of the inbox begin: every unacknowledged row
// is at or above it.
func (im inboxMeta) start() uint64 {
	if im.late != 0 && im.late < im.floor {
		return im.late
	}
	return im.floor
}

func (s *Store) meta(ctx context.Context, t das.Terminal) (inboxMeta, error) {
	var floor, late int64
	err := s.q(stmtMeta, i32(t.Account), i64(t.UID), i32(t.AppCode)).ScanContext(ctx, &floor, &late)
	if err != nil && !errors.Is(err, gocql.ErrNotFound) {
		return inboxMeta{}, err
	}
	return inboxMeta{floor: uint64(max(floor, 0)), late: uint64(max(late, 0))}, nil
}

// InboxCount implements das.Store. It counts the rows from the terminal's
// read start on, so tombstones of acknowledged rows below it are not read.
func (s *Store) InboxCount(ctx context.Context, t das.Terminal) (int, uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, 0, err
	}
	defer s.gate.Exit()
	im, err := s.meta(ctx, t)
	if err != nil {
		return 0, 0, storeErr("inbox count", err)
	}
	var n, oldest int64
	err = s.q(stmtInboxCount, i32(t.Account), i64(t.UID), i32(t.AppCode), i64(im.start())).ScanContext(ctx, &n, &oldest)
	if err != nil {
		return 0, 0, storeErr("inbox count", err)
	}
	return int(n), uint64(oldest), nil
}

// InboxPage implements das.Store. limit <= 0 is ErrInvalid; a limit above
// Config.MaxPage is served as MaxPage. The page is one keyset query (msgid
// > after, from the read start on), so it is one request however large the
// inbox and needs no driver paging state between pulls.
func (s *Store) InboxPage(ctx context.Context, t das.Terminal, after uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, false, err
	}
	defer s.gate.Exit()
	if limit <= 0 {
		return nil, false, fmt.Errorf("%w: inbox page limit %d", ErrInvalid, limit)
	}
	limit = min(limit, s.cfg.MaxPage)
	if after >= das.MaxMsgid {
		return nil, false, nil
	}
	im, err := s.meta(ctx, t)
	if err != nil {
		return nil, false, storeErr("inbox page", err)
	}
	from := max(after+1, im.start())
	it := s.q(stmtInboxPage, i32(t.Account), i64(t.UID), i32(t.AppCode), i64(from), limit+1).
		PageSize(limit + 1).IterContext(ctx)
	msgs, err := scanMessages(it, limit+1)
	if err != nil {
		return nil, false, storeErr("inbox page", err)
	}
	if len(msgs) > limit {
		return msgs[:limit], true, nil
	}
	return msgs, false, nil
}

// scanMessages reads (msgid, msg) rows.
func scanMessages(it *gocql.Iter, capHint int) ([]*pb.C2CMessage, error) {
	msgs := make([]*pb.C2CMessage, 0, min(capHint, 64))
	var (
		id   int64
		body []byte
	)
	for it.Scan(&id, &body) {
		m, err := unmarshal(id, body)
		if err != nil {
			_ = it.Close()
			return nil, err
		}
		msgs = append(msgs, m)
	}
	return msgs, it.Close()
}

func unmarshal(id int64, body []byte) (*pb.C2CMessage, error) {
	m := new(pb.C2CMessage)
	if err := proto.Unmarshal(body, m); err != nil {
		return nil, fmt.Errorf("das/cassandra: corrupt message %d: %w", id, err)
	}
	return m, nil
}

// ackChunk bounds the msgids of one IN query.
const ackChunk = 100

// Ack implements das.Store. It reads the listed rows (one IN query per 100
// msgids), deletes those that exist with one row delete each (a batch on
// the terminal's partition; logged only when late markers go too), and
// returns them in the order listed; the others are missing. A msgid listed
// twice counts once. Each delete's timestamp is above the row's write
// timestamp, so it wins over a later re-write of the same message by an
// idempotent retry, and over clock skew between logic nodes.
//
// Acks of one terminal in this process are serialised, so of two
// concurrent acks of one msgid here exactly one reports it; across
// processes both may (the receipt is then sent twice; receipts are
// idempotent by msgid).
//
// Then Ack moves the terminal's low watermark up when it has fallen more
// than InboxLag/2 behind (README.md); a failure there is logged, not
// returned, since the acknowledgement itself is done.
func (s *Store) Ack(ctx context.Context, t das.Terminal, msgids []uint64) ([]*pb.C2CMessage, []uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, nil, err
	}
	defer s.gate.Exit()
	if len(msgids) == 0 {
		return nil, nil, nil
	}
	ids := make([]uint64, 0, len(msgids))
	seen := make(map[uint64]struct{}, len(msgids))
	for _, id := range msgids {
		if _, dup := seen[id]; !dup {
			seen[id] = struct{}{}
			ids = append(ids, id)
		}
	}
	mu := s.ackStripe(t)
	mu.Lock()
	defer mu.Unlock()

	// The watermark is only needed after the deletes; read it meanwhile.
	var (
		meta    inboxMeta
		metaErr error
		metaWG  sync.WaitGroup
	)
	metaWG.Add(1)
	go func() {
		defer metaWG.Done()
		meta, metaErr = s.meta(ctx, t)
	}()
	defer metaWG.Wait()

	type row struct {
		m    *pb.C2CMessage
		late bool
		wt   int64
	}
	found := make(map[uint64]row, len(ids))
	for chunk := range slices.Chunk(ids, ackChunk) {
		in := make([]int64, 0, len(chunk))
		for _, id := range chunk {
			if id != 0 && id <= das.MaxMsgid {
				in = append(in, i64(id))
			}
		}
		if len(in) == 0 {
			continue
		}
		it := s.q(stmtInboxAcked, i32(t.Account), i64(t.UID), i32(t.AppCode), in).IterContext(ctx)
		var (
			id   int64
			body []byte
			late bool
			wt   int64
		)
		for it.Scan(&id, &body, &late, &wt) {
			m, err := unmarshal(id, body)
			if err != nil {
				s.log.Error("corrupt inbox row acknowledged", "terminal", t, "msgid", id, "err", err, "logid", das.LogID(ctx))
				m = &pb.C2CMessage{Msgid: uint64(id)}
			}
			found[uint64(id)] = row{m, late, wt}
		}
		if err := it.Close(); err != nil {
			return nil, nil, storeErr("ack", err)
		}
	}
	var (
		acked   []*pb.C2CMessage
		missing []uint64
	)
	if len(found) == 0 {
		return nil, ids, nil
	}
	now := s.now()
	nowMicros := now.UnixMicro()
	typ := gocql.UnloggedBatch // one partition: atomic and isolated without the batchlog
	for _, r := range found {
		if r.late {
			typ = gocql.LoggedBatch
			break
		}
	}
	b := s.s.Batch(typ).Consistency(s.cons)
	for _, id := range ids {
		r, ok := found[id]
		if !ok {
			missing = append(missing, id)
			continue
		}
		acked = append(acked, r.m)
		ts := max(nowMicros, r.wt+1)
		b.Entries = append(b.Entries, gocql.BatchEntry{Stmt: stmtDeleteRow, Idempotent: true,
			Args: []any{ts, i32(t.Account), i64(t.UID), i32(t.AppCode), i64(id)}})
		if r.late {
			b.Entries = append(b.Entries, gocql.BatchEntry{Stmt: stmtDeleteLate, Idempotent: true,
				Args: []any{ts, i32(t.Account), i64(t.UID), i32(t.AppCode), i64(id)}})
		}
	}
	if err := b.ExecContext(ctx); err != nil {
		return nil, nil, storeErr("ack", err)
	}
	metaWG.Wait()
	err := metaErr
	if err == nil {
		err = s.raiseFloor(ctx, t, meta, now)
	}
	if err != nil && ctx.Err() == nil {
		s.log.Warn("inbox watermark not moved", "terminal", t, "err", err, "logid", das.LogID(ctx))
	}
	return acked, missing, nil
}

// raiseFloor moves t's low watermark up to the first unacknowledged row,
// but never above now - InboxLag, and only when it trails that by more
// than InboxLag/2 (so most acks of an online terminal skip it). A PutC2C
// decides at time w that its rows are not late only if their msgid time is
// after w - InboxLag/2, and finishes by w + InboxLag/4; a floor computed
// at time r is at most das.MsgidAt(r - InboxLag) and at most the first row
// visible then. A row that is not late and not yet visible at r has its
// decision after r - InboxLag/4, so its msgid is above das.MsgidAt(r -
// 3·InboxLag/4), above the floor: the floor never passes a row that reads
// cannot reach. Late rows are listed in inbox_meta and read from there.
//
// It also drops a late marker whose row is gone (acknowledged before a
// re-write of its message marked it late), once no re-write can come any
// more: older than IdempotencyTTL + InboxLag.
func (s *Store) raiseFloor(ctx context.Context, t das.Terminal, im inboxMeta, now time.Time) error {
	lag := s.cfg.InboxLag
	if im.late != 0 && im.late < das.MsgidAt(now.Add(-s.cfg.Retention.IdempotencyTTL-lag)) {
		var id int64
		err := s.q(stmtInboxOne, i32(t.Account), i64(t.UID), i32(t.AppCode), i64(im.late)).ScanContext(ctx, &id)
		switch {
		case errors.Is(err, gocql.ErrNotFound):
			err = s.q(stmtDeleteLate, now.UnixMicro(), i32(t.Account), i64(t.UID), i32(t.AppCode), i64(im.late)).ExecContext(ctx)
			if err != nil {
				return err
			}
			s.log.Info("stale late inbox marker dropped", "terminal", t, "msgid", im.late)
		case err != nil:
			return err
		}
	}
	ceiling := das.MsgidAt(now.Add(-lag))
	if im.floor >= das.MsgidAt(now.Add(-lag-lag/2)) || im.floor >= ceiling {
		return nil
	}
	next := ceiling
	var first int64
	err := s.q(stmtInboxFirst, i32(t.Account), i64(t.UID), i32(t.AppCode), i64(im.floor), i64(ceiling)).ScanContext(ctx, &first)
	switch {
	case err == nil:
		next = uint64(first)
	case !errors.Is(err, gocql.ErrNotFound):
		return err
	}
	if next <= im.floor {
		return nil
	}
	return s.q(stmtSetFloor, i64(next), i32(t.Account), i64(t.UID), i32(t.AppCode)).ExecContext(ctx)
}

// PutInbox implements das.Store: one inbox row per terminal, each with the
// body, on no timeline and with no idempotency key, all with the msgid's
// write timestamp. The rows go in logged batches of at most MaxBatchBytes
// (one batch for most pushes: 100 terminals of a 300-byte message are
// 40 KB), written concurrently. Each batch is all or nothing; a push that
// needs several is not: after an error some terminals may have it, and
// calling PutInbox again with the same message writes the same cells again
// without reviving rows acknowledged in between.
func (s *Store) PutInbox(ctx context.Context, m *pb.C2CMessage, terminals []das.Terminal) error {
	if err := s.gate.Enter(ctx); err != nil {
		return err
	}
	defer s.gate.Exit()
	body, err := das.EncodeInbox(m, terminals)
	if err != nil {
		return err
	}
	ts := slices.Clone(terminals)
	slices.SortFunc(ts, compareTerminals)
	ts = slices.Compact(ts)
	now := s.now()
	late := s.isLate(m.Msgid, now)
	rowBytes := len(body) + 100
	if late {
		rowBytes += 100
	}
	if rowBytes > s.cfg.MaxBatchBytes {
		return fmt.Errorf("%w: message %d of %d bytes: over MaxBatchBytes %d", ErrInvalid, m.Msgid, len(body), s.cfg.MaxBatchBytes)
	}
	per := max(1, s.cfg.MaxBatchBytes/rowBytes)
	wt := writeTime(m.Msgid)
	id := i64(m.Msgid)
	ctx, cancel := context.WithTimeout(ctx, s.cfg.InboxLag/4)
	defer cancel()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		sem   = make(chan struct{}, 8)
	)
	for chunk := range slices.Chunk(ts, per) {
		typ := gocql.LoggedBatch
		if len(chunk) == 1 && !late {
			typ = gocql.UnloggedBatch // one partition: atomic without the batchlog
		}
		b := s.s.Batch(typ).WithTimestamp(wt).Consistency(s.cons)
		for _, t := range chunk {
			addInboxRow(b, t, id, body, late)
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := b.ExecContext(ctx); err != nil {
				mu.Lock()
				first = cmp.Or(first, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return storeErr("put inbox", first)
	}
	return nil
}

func compareTerminals(a, b das.Terminal) int {
	return cmp.Or(cmp.Compare(a.Account, b.Account), cmp.Compare(a.UID, b.UID), cmp.Compare(a.AppCode, b.AppCode))
}
