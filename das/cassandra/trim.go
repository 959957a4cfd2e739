package cassandra

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// Retention.MaxCount on Cassandra: a background round (every
// Config.TrimInterval, or Trim) trims the timelines that grew since the
// last round to their newest MaxCount messages. See README.md, "Count
// retention".
const (
	// DefaultTrimInterval is the pause between trim rounds.
	DefaultTrimInterval = time.Minute
	// trimUsersPerRound bounds the users one round checks; the others
	// wait for the next round.
	trimUsersPerRound = 10000
	// trimWorkers is how many users a round trims at once.
	trimWorkers = 4
	// trimPage is the page size of the trim's reads.
	trimPage = 500
)

// trimRowsPerUser bounds the timeline rows one round removes from one
// user; a user with more to remove stays for the next round. A variable
// for tests.
var trimRowsPerUser = 1000

const (
	stmtTrimBuckets = `SELECT bucket FROM timeline_buckets WHERE account = ? AND uid = ? AND bucket >= ?`
	stmtTrimCount   = `SELECT COUNT(*) FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid >= ?`
	stmtTrimNewest  = `SELECT msgid FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid >= ? ORDER BY msgid DESC LIMIT ?`
	stmtTrimOldest  = `SELECT msgid, msg FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid >= ? AND msgid < ? LIMIT ?`
	stmtTrimTL      = `DELETE FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid <= ?`
	stmtTrimTLB     = `DELETE FROM timeline_buckets WHERE account = ? AND uid = ? AND bucket = ?`
	stmtTrimConv    = `DELETE FROM conversation WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ? AND msgid <= ?`
)

// TrimStats counts what one trim round did.
type TrimStats struct {
	Users    int // timelines checked
	Trimmed  int // timelines that had messages beyond MaxCount
	Timeline int // timeline rows removed (each with its conversation row)
	Left     int // timelines left for the next round (over a bound, or failed)
}

// trimSet holds the users whose timeline grew since they were last
// trimmed. It is memory only, per process: each logic node trims the
// timelines it wrote to, and after a restart a timeline is trimmed again
// at its next message.
type trimSet struct {
	mu sync.Mutex
	m  map[das.User]struct{}
}

func (d *trimSet) add(us ...das.User) {
	d.mu.Lock()
	if d.m == nil {
		d.m = make(map[das.User]struct{})
	}
	for _, u := range us {
		d.m[u] = struct{}{}
	}
	d.mu.Unlock()
}

// take removes and returns up to n users.
func (d *trimSet) take(n int) []das.User {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]das.User, 0, min(n, len(d.m)))
	for u := range d.m {
		if len(out) == n {
			break
		}
		out = append(out, u)
		delete(d.m, u)
	}
	return out
}

// markGrown notes that m went onto its sender's and recipient's timelines.
func (s *Store) markGrown(m *pb.C2CMessage) {
	if s.cfg.Retention.MaxCount <= 0 || m == nil {
		return
	}
	s.grown.add(das.User{Account: m.GetFrom().GetAccount(), UID: m.GetFrom().GetUid()},
		das.User{Account: m.GetTo().GetAccount(), UID: m.GetTo().GetUid()})
}

// startTrimmer starts the background trim rounds when MaxCount is set.
func (s *Store) startTrimmer() {
	s.life, s.endLife = context.WithCancel(context.Background())
	if s.cfg.Retention.MaxCount <= 0 || s.cfg.TrimInterval <= 0 {
		return
	}
	s.trimmer.Add(1)
	go func() {
		defer s.trimmer.Done()
		t := time.NewTicker(s.cfg.TrimInterval)
		defer t.Stop()
		for {
			select {
			case <-s.life.Done():
				return
			case <-t.C:
			}
			st, err := s.trim(s.life)
			switch {
			case err != nil && s.life.Err() == nil:
				s.log.Error("timeline trim (retention max_count) failed", "err", err, "stats", st)
			case st.Timeline > 0 || st.Left > 0:
				s.log.Info("timeline trim (retention max_count)", "users", st.Users, "trimmed", st.Trimmed, "rows", st.Timeline, "left", st.Left)
			}
		}
	}()
}

// stopTrimmer ends the background rounds and waits for the one running.
func (s *Store) stopTrimmer() {
	if s.endLife != nil {
		s.endLife()
	}
	s.trimmer.Wait()
}

// Trim runs one trim round now (the store runs one every TrimInterval):
// each timeline that grew since its last trim keeps its newest
// Retention.MaxCount messages; older ones leave the timeline and the
// conversation index. Inbox rows are never removed. Without MaxCount it
// does nothing. Close interrupts it.
func (s *Store) Trim(ctx context.Context) (TrimStats, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return TrimStats{}, err
	}
	defer s.gate.Exit()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.life, cancel)()
	return s.trim(ctx)
}

func (s *Store) trim(ctx context.Context) (TrimStats, error) {
	var st TrimStats
	maxCount := s.cfg.Retention.MaxCount
	if maxCount <= 0 {
		return st, nil
	}
	s.trimMu.Lock() // one round at a time per store
	defer s.trimMu.Unlock()
	users := s.grown.take(trimUsersPerRound)
	st.Users = len(users)
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
		next = make(chan das.User)
	)
	for range min(trimWorkers, len(users)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range next {
				n, more, err := s.trimUser(ctx, u, maxCount)
				mu.Lock()
				st.Timeline += n
				if n > 0 {
					st.Trimmed++
				}
				if more || err != nil {
					st.Left++
					s.grown.add(u)
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("user %d/%d: %w", u.Account, u.UID, err))
				}
				mu.Unlock()
			}
		}()
	}
	i := 0
	for ; i < len(users) && ctx.Err() == nil; i++ {
		next <- users[i]
	}
	close(next)
	wg.Wait()
	if i < len(users) {
		s.grown.add(users[i:]...)
		st.Left += len(users) - i
	}
	if len(errs) > 0 {
		return st, storeErr("trim", errors.Join(errs...))
	}
	return st, ctx.Err()
}

// trimUser removes from u's timeline the messages older than its newest
// maxCount, oldest first, at most trimRowsPerUser of them; more says whether
// some are left. It deletes only below a cutoff msgid that had maxCount newer
// messages when it was read: messages only arrive above it (one with a
// smaller msgid is beyond maxCount anyway), so concurrent trims of the same
// timeline from several nodes, or a trim racing new messages, never remove
// one of the newest maxCount.
func (s *Store) trimUser(ctx context.Context, u das.User, maxCount int) (removed int, more bool, err error) {
	horizon := uint64(0) // rows below it have expired (or are about to)
	if a := s.cfg.Retention.MaxAge; a > 0 {
		horizon = das.MsgidAt(s.now().Add(-a))
	}
	acc, uid := i32(u.Account), i64(u.UID)
	var buckets []int32
	it := s.q(stmtTrimBuckets, acc, uid, bucketOf(horizon)).IterContext(ctx)
	var b int32
	for it.Scan(&b) {
		buckets = append(buckets, b)
	}
	if err := it.Close(); err != nil {
		return 0, false, err
	}
	// Count newest first to the bucket where the newest maxCount end.
	cross, newer := -1, 0
	for i := len(buckets) - 1; i >= 0; i-- {
		var n int64
		if err := s.q(stmtTrimCount, acc, uid, buckets[i], i64(horizon)).ScanContext(ctx, &n); err != nil {
			return 0, false, err
		}
		if newer+int(n) > maxCount {
			cross = i
			break
		}
		newer += int(n)
	}
	if cross < 0 {
		return 0, false, nil
	}
	// cut: every row of buckets[:cross+1] below it goes.
	x := buckets[cross]
	cut := das.MsgidAt(bucketEnd(x)) // all of x, when the newer buckets hold maxCount
	if need := maxCount - newer; need > 0 {
		it := s.q(stmtTrimNewest, acc, uid, x, i64(horizon), need).PageSize(min(need, 5000)).IterContext(ctx)
		var id int64
		seen := 0
		for it.Scan(&id) {
			seen++
			cut = uint64(id)
		}
		if err := it.Close(); err != nil {
			return 0, false, err
		}
		if seen < need { // rows expired or were trimmed since the count
			return 0, false, nil
		}
	}

	// Read what goes, oldest first, for the peers of its conversation rows.
	type span struct {
		bucket int32
		last   int64
		whole  bool
	}
	var (
		spans []span
		peers = map[das.User]struct{}{}
		last  int64
	)
	budget := trimRowsPerUser
	wholeCut := das.MsgidAt(bucketEnd(x)) // cut when all of x goes
	for _, b := range buckets[:cross+1] {
		if budget == 0 {
			more = true
			break
		}
		it := s.q(stmtTrimOldest, acc, uid, b, i64(horizon), i64(cut), budget+1).PageSize(min(budget+1, trimPage)).IterContext(ctx)
		var (
			id    int64
			body  []byte
			n     int
			extra bool // a row beyond the budget
			sp    = span{bucket: b}
		)
		for it.Scan(&id, &body) {
			if n == budget {
				extra = true
				break
			}
			m, err := unmarshal(id, body)
			if err != nil {
				_ = it.Close()
				return 0, false, err
			}
			peers[peerOf(u, m)] = struct{}{}
			sp.last, last = id, id
			n++
		}
		if err := it.Close(); err != nil {
			return 0, false, err
		}
		// The bucket's row in timeline_buckets goes once all of it has.
		sp.whole = !extra && (b != x || cut == wholeCut)
		budget -= n
		removed += n
		if n > 0 || sp.whole {
			spans = append(spans, sp)
		}
		if extra {
			more = true
			break
		}
	}
	if removed == 0 {
		return 0, more, nil
	}
	// Summaries and conversation rows first: if the round dies half way,
	// a timeline row left in place is found again by the next trim, while
	// a conversation row or summary left without its timeline row could
	// not be. Every row of u's timeline up to last goes, so a conversation
	// whose newest msgid is at most last is left with no message: its
	// summary goes, by a deletion with timestamp last, which removes the
	// summary cell only if its msgid (its timestamp, conv.go) is at most
	// last and never the cell of a newer message written meanwhile.
	for p := range peers {
		if err := s.q(stmtTrimSummary, last, acc, uid, i32(p.Account), i64(p.UID)).ExecContext(ctx); err != nil {
			return 0, false, err
		}
		if err := s.q(stmtTrimConv, acc, uid, i32(p.Account), i64(p.UID), last).ExecContext(ctx); err != nil {
			return 0, false, err
		}
	}
	for _, sp := range spans {
		if sp.last != 0 {
			if err := s.q(stmtTrimTL, acc, uid, sp.bucket, sp.last).ExecContext(ctx); err != nil {
				return 0, false, err
			}
		}
		if sp.whole {
			if err := s.q(stmtTrimTLB, acc, uid, sp.bucket).ExecContext(ctx); err != nil {
				return 0, false, err
			}
		}
	}
	return removed, more, nil
}

// peerOf is the other side of m on u's timeline (u for a note to oneself).
func peerOf(u das.User, m *pb.C2CMessage) das.User {
	from := das.User{Account: m.GetFrom().GetAccount(), UID: m.GetFrom().GetUid()}
	if from != u {
		return from
	}
	return das.User{Account: m.GetTo().GetAccount(), UID: m.GetTo().GetUid()}
}
