package embedded

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// The janitor's batches are committed without a sync: Pebble's WAL is
// ordered, so a crash loses at most a suffix of them whole, and the next
// sweep redoes what was lost. A lost batch never leaves a timeline row
// deleted without its collection mark, since both are in one batch.
const sweepBatch = 512

// SweepStats counts what one sweep removed.
type SweepStats struct {
	Timeline    int // timeline entries (each with its conversation index row)
	Idempotency int // idempotency keys
	Messages    int // message bodies no row pointed to any more
	// GroupMessages counts group messages older than Retention.MaxAge.
	GroupMessages int
}

// dirtyUsers remembers which timelines grew since the last sweep, so that
// enforcing Retention.MaxCount reads only those. It is memory only: after
// Open the first sweep checks every timeline.
type dirtyUsers struct {
	shards [64]struct {
		mu sync.Mutex
		m  map[das.User]struct{}
	}
	mu    sync.Mutex
	swept bool // a count sweep has covered every timeline since Open
}

func (s *Store) markDirty(m *pb.C2CMessage) {
	if s.opts.Retention.MaxCount == 0 {
		return
	}
	s.markUserDirty(userOf(m.From))
	s.markUserDirty(userOf(m.To))
}

func (s *Store) markUserDirty(u das.User) {
	sh := &s.dirty.shards[(u.UID^uint64(u.Account))%uint64(len(s.dirty.shards))]
	sh.mu.Lock()
	if sh.m == nil {
		sh.m = make(map[das.User]struct{})
	}
	sh.m[u] = struct{}{}
	sh.mu.Unlock()
}

// takeDirty returns the users marked since the last call and clears them.
func (s *Store) takeDirty() []das.User {
	var users []das.User
	for i := range s.dirty.shards {
		sh := &s.dirty.shards[i]
		sh.mu.Lock()
		for u := range sh.m {
			users = append(users, u)
		}
		sh.m = nil
		sh.mu.Unlock()
	}
	// Key order, so that the sweep's seeks move forward.
	slices.SortFunc(users, func(a, b das.User) int {
		if c := cmp.Compare(a.Account, b.Account); c != 0 {
			return c
		}
		return cmp.Compare(a.UID, b.UID)
	})
	return users
}

func (s *Store) runJanitor(interval time.Duration) {
	defer s.janitor.Done()
	ctx := s.life
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := s.sweep(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			s.log.Error("retention sweep failed", "err", err, "removed", st)
		case st != (SweepStats{}):
			s.log.Info("retention sweep", "timeline", st.Timeline, "idempotency", st.Idempotency, "messages", st.Messages, "group_messages", st.GroupMessages)
		}
	}
}

// Sweep runs one retention pass now (the janitor runs one every
// JanitorInterval): it removes timeline entries beyond Retention.MaxAge
// and MaxCount, group messages beyond MaxAge (at most groupTrimBudget per
// pass), idempotency keys older than IdempotencyTTL, and messages
// that no inbox or timeline row points to. Inbox rows are never removed.
// Close interrupts a running sweep.
func (s *Store) Sweep(ctx context.Context) (SweepStats, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return SweepStats{}, err
	}
	defer s.gate.Exit()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.life, cancel)()
	return s.sweep(ctx)
}

func (s *Store) sweep(ctx context.Context) (SweepStats, error) {
	s.sweepMu.Lock()
	defer s.sweepMu.Unlock()
	var st SweepStats
	err := s.trimTimelines(ctx, &st)
	if err == nil && s.opts.Retention.MaxAge > 0 {
		err = s.trimGroupsByAge(ctx, das.MsgidAt(s.now().Add(-s.opts.Retention.MaxAge)), &st)
	}
	if err == nil {
		err = s.expireIdempotency(ctx, &st)
	}
	if err == nil {
		err = s.collect(ctx, &st)
	}
	return st, err
}

// batcher commits a janitor batch every sweepBatch operations.
type batcher struct {
	db *pebble.DB
	b  *pebble.Batch
}

func (w *batcher) flush() error {
	if w.b == nil || w.b.Empty() {
		return nil
	}
	err := w.b.Commit(pebble.NoSync)
	_ = w.b.Close()
	w.b = nil
	if err != nil {
		return unavailable("sweep", err)
	}
	return nil
}

func (w *batcher) batch() *pebble.Batch {
	if w.b == nil {
		w.b = w.db.NewBatch()
	}
	return w.b
}

func (w *batcher) close() {
	if w.b != nil {
		_ = w.b.Close()
	}
}

// deleteTimelineRow removes one timeline entry (key k, value peer) and its
// conversation row, and marks the message for collection.
func (s *Store) deleteTimelineRow(w *batcher, k, peer []byte) error {
	if len(k) != tlKeyLen || len(peer) != userLen {
		s.log.Error("malformed timeline row", "key", k)
		return nil
	}
	u, id := decodeUser(k[1:]), lastMsgid(k)
	b := w.batch()
	_ = b.Delete(k, nil)
	_ = b.Delete(convKey(u, decodeUser(peer), id), nil)
	_ = b.Set(gcKey(id, s.gcEvent.Add(1)), nil, nil)
	if int(b.Count()) >= 3*sweepBatch {
		return w.flush()
	}
	return nil
}

func (s *Store) trimTimelines(ctx context.Context, st *SweepStats) error {
	r := s.opts.Retention
	if r.MaxAge > 0 {
		if err := s.trimByAge(ctx, das.MsgidAt(s.now().Add(-r.MaxAge)), st); err != nil {
			return err
		}
	}
	if r.MaxCount > 0 {
		return s.trimByCount(ctx, r.MaxCount, st)
	}
	return nil
}

// trimByAge deletes timeline entries with msgid < cut. Each timeline is
// sorted oldest first, so it deletes from the start of each user's range
// and then seeks to the next user: one seek per user plus the deletions.
func (s *Store) trimByAge(ctx context.Context, cut uint64, st *SweepStats) error {
	if cut == 0 {
		return nil
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagTimeline}, UpperBound: []byte{tagTimeline + 1}})
	if err != nil {
		return unavailable("sweep", err)
	}
	w := &batcher{db: s.db}
	defer w.close()
	n := 0
	for valid := it.First(); valid; {
		if n++; n%sweepBatch == 0 && ctx.Err() != nil {
			break
		}
		k := it.Key()
		if len(k) != tlKeyLen || lastMsgid(k) >= cut {
			valid = it.SeekGE(prefixEnd(k[:1+userLen]))
			continue
		}
		if err := s.deleteTimelineRow(w, slices.Clone(k), slices.Clone(it.Value())); err != nil {
			_ = it.Close()
			return err
		}
		st.Timeline++
		valid = it.Next()
	}
	if err := it.Close(); err != nil {
		return unavailable("sweep", err)
	}
	if err := w.flush(); err != nil {
		return err
	}
	return ctx.Err()
}

// trimByCount keeps the newest max entries of each timeline that grew
// since the last sweep (every timeline on the first sweep after Open).
func (s *Store) trimByCount(ctx context.Context, max int, st *SweepStats) error {
	s.dirty.mu.Lock()
	all := !s.dirty.swept
	s.dirty.swept = true
	s.dirty.mu.Unlock()
	users := s.takeDirty()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagTimeline}, UpperBound: []byte{tagTimeline + 1}})
	if err != nil {
		return unavailable("sweep", err)
	}
	w := &batcher{db: s.db}
	defer w.close()
	trim := func(u das.User) error {
		p := timelinePrefix(u)
		kept := 0
		for valid := it.SeekLT(prefixEnd(p)); valid; valid = it.Prev() {
			k := it.Key()
			if len(k) != tlKeyLen || !hasPrefix(k, p) {
				break
			}
			if kept < max {
				kept++
				continue
			}
			if err := s.deleteTimelineRow(w, slices.Clone(k), slices.Clone(it.Value())); err != nil {
				return err
			}
			st.Timeline++
		}
		return nil
	}
	if all {
		users = users[:0]
		for valid := it.First(); valid; valid = it.SeekGE(prefixEnd(it.Key()[:1+userLen])) {
			if len(it.Key()) < 1+userLen {
				break
			}
			users = append(users, decodeUser(it.Key()[1:]))
		}
	}
	reached := len(users)
	for i, u := range users {
		if i%64 == 0 && ctx.Err() != nil {
			reached = i
			break
		}
		if err := trim(u); err != nil {
			reached = i
			break
		}
	}
	err = errors.Join(err, it.Close(), w.flush())
	if reached < len(users) || err != nil {
		// Timelines not trimmed stay candidates for the next sweep.
		if all {
			s.dirty.mu.Lock()
			s.dirty.swept = false
			s.dirty.mu.Unlock()
		} else {
			for _, u := range users[reached:] {
				s.markUserDirty(u)
			}
		}
	}
	if err != nil {
		return unavailable("sweep", err)
	}
	return ctx.Err()
}

func hasPrefix(k, p []byte) bool { return len(k) >= len(p) && string(k[:len(p)]) == string(p) }

// expireIdempotency removes the idempotency keys of every epoch whose
// keys all expired: epoch e holds keys stored before (e+1) * epoch, all
// expired once that is at or before now - IdempotencyTTL. One range
// deletion drops them (counted first, for the stats); writers only ever
// add to the current epoch, so no lock is needed. A key lives at most an
// epoch (a quarter of the TTL) past its expiry; lookups count it absent
// meanwhile. Then the keys of a store of before the epochs, while any is
// left (expireLegacyIdempotency).
func (s *Store) expireIdempotency(ctx context.Context, st *SweepStats) error {
	now := s.nowMs()
	s.idem.expire(now)
	ttl := uint64(s.opts.Retention.IdempotencyTTL.Milliseconds())
	if now > ttl {
		lower, upper := []byte{tagIdemEpoch}, idemEpochStart(s.idemEpoch(now-ttl))
		it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
		if err != nil {
			return unavailable("sweep", err)
		}
		n := 0
		for valid := it.First(); valid && ctx.Err() == nil; valid = it.Next() {
			n++
		}
		if err := it.Close(); err != nil {
			return unavailable("sweep", err)
		}
		if n > 0 && ctx.Err() == nil {
			if err := s.db.DeleteRange(lower, upper, pebble.NoSync); err != nil {
				return unavailable("sweep", err)
			}
			st.Idempotency += n
		}
	}
	if !s.legacyIdem.Load() {
		return ctx.Err()
	}
	return s.expireLegacyIdempotency(ctx, st, now-min(ttl, now))
}

// expireLegacyIdempotency removes the keys a store of before the epochs
// kept as is, stored at or before cut, reading them in storage-time order
// from the x queue; once the queue is empty no lookup reads them any more.
// The stripes of a chunk's keys are held (in ascending order, so two
// sweeps cannot deadlock and PutC2C holds at most one) from the check to
// the commit.
func (s *Store) expireLegacyIdempotency(ctx context.Context, st *SweepStats, cut uint64) error {
	upper := binary.BigEndian.AppendUint64([]byte{tagIdemQueue}, cut+1)
	for ctx.Err() == nil {
		it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagIdemQueue}, UpperBound: upper})
		if err != nil {
			return unavailable("sweep", err)
		}
		var qkeys [][]byte
		for valid := it.First(); valid && len(qkeys) < sweepBatch; valid = it.Next() {
			qkeys = append(qkeys, slices.Clone(it.Key()))
		}
		if err := it.Close(); err != nil {
			return unavailable("sweep", err)
		}
		if len(qkeys) == 0 {
			return s.checkLegacyIdemGone()
		}
		n, err := s.expireChunk(qkeys, cut)
		st.Idempotency += n
		if err != nil {
			return err
		}
	}
	return ctx.Err()
}

// checkLegacyIdemGone stops the lookups of keys of before the epochs once
// the queue holds none.
func (s *Store) checkLegacyIdemGone() error {
	left, err := s.legacyIdemLeft()
	if err != nil {
		return unavailable("sweep", err)
	}
	if !left {
		s.legacyIdem.Store(false)
		s.log.Info("idempotency keys of before the epochs all expired")
	}
	return nil
}

func (s *Store) expireChunk(qkeys [][]byte, cut uint64) (int, error) {
	var stripes []int
	for _, q := range qkeys {
		stripes = append(stripes, s.stripe(q[idemQueueHead:]))
	}
	slices.Sort(stripes)
	stripes = slices.Compact(stripes)
	for _, i := range stripes {
		s.idemLocks[i].Lock()
	}
	defer func() {
		for _, i := range stripes {
			s.idemLocks[i].Unlock()
		}
	}()
	b := s.db.NewBatch()
	defer b.Close()
	removed := 0
	for _, q := range qkeys {
		_ = b.Delete(q, nil)
		ik := q[idemQueueHead:]
		v, closer, err := s.db.Get(ik)
		if errors.Is(err, pebble.ErrNotFound) {
			continue
		}
		if err != nil {
			return removed, unavailable("sweep", err)
		}
		_, stored, ok := decodeIdemValue(v)
		_ = closer.Close()
		if !ok || stored <= cut {
			_ = b.Delete(ik, nil)
			removed++
		}
	}
	if err := b.Commit(pebble.NoSync); err != nil {
		return 0, unavailable("sweep", err)
	}
	return removed, nil
}

// collect deletes the messages whose collection marks it finds and that
// no inbox or timeline row points to any more. Rows pointing to a message
// are only ever removed after PutC2C wrote them all in one batch, so once
// none is left none can appear: the check needs no lock.
func (s *Store) collect(ctx context.Context, st *SweepStats) error {
	for ctx.Err() == nil {
		it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagGC}, UpperBound: []byte{tagGC + 1}})
		if err != nil {
			return unavailable("sweep", err)
		}
		var marks [][]byte
		for valid := it.First(); valid && len(marks) < sweepBatch; valid = it.Next() {
			marks = append(marks, slices.Clone(it.Key()))
		}
		if err := it.Close(); err != nil {
			return unavailable("sweep", err)
		}
		if len(marks) == 0 {
			return nil
		}
		b := s.db.NewBatch()
		var last uint64
		for _, k := range marks {
			_ = b.Delete(k, nil)
			if len(k) != gcKeyLen {
				continue
			}
			id := binary.BigEndian.Uint64(k[1:])
			if id == last {
				continue
			}
			last = id
			unref, err := s.unreferenced(id)
			if err != nil {
				_ = b.Close()
				return err
			}
			if unref {
				_ = b.Delete(msgKey(id), nil)
				st.Messages++
			}
		}
		err = b.Commit(pebble.NoSync)
		_ = b.Close()
		if err != nil {
			return unavailable("sweep", err)
		}
	}
	return ctx.Err()
}

// unreferenced reports whether message id exists and no inbox or timeline
// row points to it.
func (s *Store) unreferenced(id uint64) (bool, error) {
	v, closer, err := s.db.Get(msgKey(id))
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, unavailable("sweep", err)
	}
	if ts, ok := decodeInboxTerminals(v); ok {
		_ = closer.Close()
		for _, t := range ts {
			if _, c, err := s.db.Get(inboxKey(t, id)); err == nil {
				_ = c.Close()
				return false, nil
			} else if !errors.Is(err, pebble.ErrNotFound) {
				return false, unavailable("sweep", err)
			}
		}
		return true, nil
	}
	appcodes, senderAppcodes, body, ok := decodeMessageValue(v)
	m := new(pb.C2CMessage)
	if ok {
		ok = proto.Unmarshal(body, m) == nil
	}
	appcodes = slices.Clone(appcodes)
	senderAppcodes = slices.Clone(senderAppcodes)
	_ = closer.Close()
	if !ok {
		s.log.Error("corrupt message kept", "msgid", id)
		return false, nil
	}
	from, to := userOf(m.From), userOf(m.To)
	keys := [][]byte{timelineKey(from, id), timelineKey(to, id)}
	for i := 0; i+4 <= len(appcodes); i += 4 {
		t := das.Terminal{Account: to.Account, UID: to.UID, AppCode: binary.BigEndian.Uint32(appcodes[i:])}
		keys = append(keys, inboxKey(t, id))
	}
	for i := 0; i+4 <= len(senderAppcodes); i += 4 {
		t := das.Terminal{Account: from.Account, UID: from.UID, AppCode: binary.BigEndian.Uint32(senderAppcodes[i:])}
		keys = append(keys, inboxKey(t, id))
	}
	for _, k := range keys {
		_, c, err := s.db.Get(k)
		if err == nil {
			_ = c.Close()
			return false, nil
		}
		if !errors.Is(err, pebble.ErrNotFound) {
			return false, unavailable("sweep", err)
		}
	}
	return true, nil
}
