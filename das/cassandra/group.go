package cassandra

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"weak"

	gocql "github.com/apache/cassandra-gocql-driver/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

var _ das.GroupStore = (*Store)(nil)

// Groups on Cassandra (README.md, "Groups"; schema/cql/002_groups.cql).
//
// The sequencer is a lightweight transaction on the group's row of
// group_meta: an append of seq h+1 is `UPDATE ... SET head = h+1, last_msg
// = <the message with its seq> IF head = h ...`, so the message and its seq
// become durable in one Paxos round and no seq is given twice or skipped.
// Before each transaction the writer copies the current head message
// (last_msg) to group_stream, so every seq below the head is always in the
// stream and only the head may be in group_meta alone; after it, the
// writer copies its own message. Readers take the head from group_meta.
//
// Membership changes are appends of event messages that also set
// member_seq, members, dissolved and member_event in the same transaction;
// the member rows (group_members, user_groups) follow, written with the
// event's seq as their write timestamp, and then applied_seq. A writer that
// dies in between leaves applied_seq < member_seq; whoever reads the
// membership next (Members, UserGroups, the member check of an append, the
// next change) applies member_event first. Only the latest change can be
// pending: a change is made only after its predecessor's rows are written.

const (
	// streamShift sizes the group_stream buckets: 4096 seqs a partition.
	// It is part of the stored layout.
	streamShift = 12
	// seqAttempts bounds the transactions of one append that lose to
	// other writers before it gives up with das.ErrUnavailable.
	seqAttempts = 256
	// memberChunk is how many users' rows go into one logged batch.
	memberChunk = 50
	// inChunk bounds the values of one IN query.
	inChunk = 100
	// groupStripes is the number of in-process locks that serialise the
	// appends of one Store to a group.
	groupStripes = 1024
	// Bounds of the in-process caches (entries); a full cache is emptied.
	headCacheMax   = 1 << 16
	memberCacheMax = 1 << 18
)

// streamBucket returns the group_stream partition of a seq.
func streamBucket(seq uint64) int32 { return int32(seq >> streamShift) }

// Statements of the group tables. Only the transactions on group_meta
// (stmtCreateGroup, stmtAppendChat, stmtAppendEvent) are not idempotent.
const (
	stmtCreateGroup = `INSERT INTO group_meta (group_id, head, last_msg, member_seq, members, dissolved, member_event) VALUES (?, 1, ?, 1, ?, false, ?) IF NOT EXISTS`
	// The conditions beyond head = ? hold whenever head does (every change
	// of the row moves head); they are there because a transaction that is
	// not applied returns the current values of the columns it names, which
	// is the state the next attempt needs.
	stmtAppendChat  = `UPDATE group_meta SET head = ?, last_msg = ? WHERE group_id = ? IF head = ? AND member_seq = ? AND members = ? AND dissolved = false AND last_msg != 0x`
	stmtAppendEvent = `UPDATE group_meta SET head = ?, last_msg = ?, member_seq = ?, members = ?, dissolved = ?, member_event = ? WHERE group_id = ? IF head = ? AND member_seq = ? AND members = ? AND dissolved = false AND last_msg != 0x`

	stmtGroupHead    = `SELECT head, last_msg, member_seq, members, dissolved FROM group_meta WHERE group_id = ?`
	stmtGroupInfo    = `SELECT head, member_seq, members, dissolved FROM group_meta WHERE group_id = ?`
	stmtGroupApplied = `SELECT member_seq, applied_seq FROM group_meta WHERE group_id = ?`
	stmtGroupsLag    = `SELECT group_id, member_seq, applied_seq FROM group_meta WHERE group_id IN ?`
	stmtGroupEvent   = `SELECT member_seq, member_event FROM group_meta WHERE group_id = ?`
	stmtSetApplied   = `UPDATE group_meta SET applied_seq = ? WHERE group_id = ?`

	stmtStreamInsert = `INSERT INTO group_stream (group_id, bucket, seq, msg) VALUES (?, ?, ?, ?) USING TTL ?`
	stmtStreamPage   = `SELECT seq, msg FROM group_stream WHERE group_id = ? AND bucket = ? AND seq >= ? AND seq <= ? LIMIT ?`
	stmtStreamOne    = `SELECT msg FROM group_stream WHERE group_id = ? AND bucket = ? AND seq = ?`
	stmtMsgidInsert  = `INSERT INTO group_msgids (group_id, msgid, seq) VALUES (?, ?, ?) USING TTL ?`
	stmtMsgidSeq     = `SELECT seq FROM group_msgids WHERE group_id = ? AND msgid = ?`

	stmtMemberInsert = `INSERT INTO group_members (group_id, account, uid, join_seq) VALUES (?, ?, ?, ?)`
	stmtMemberDelete = `DELETE FROM group_members WHERE group_id = ? AND account = ? AND uid = ?`
	stmtMembersDrop  = `DELETE FROM group_members WHERE group_id = ?`
	stmtMemberOne    = `SELECT join_seq FROM group_members WHERE group_id = ? AND account = ? AND uid = ?`
	stmtMembersIn    = `SELECT uid FROM group_members WHERE group_id = ? AND account = ? AND uid IN ?`
	stmtMembersAll   = `SELECT account, uid, join_seq FROM group_members WHERE group_id = ?`

	stmtUserGroupJoin   = `INSERT INTO user_groups (account, uid, group_id, join_seq, left_seq) VALUES (?, ?, ?, ?, 0)`
	stmtUserGroupLeave  = `UPDATE user_groups SET left_seq = ? WHERE account = ? AND uid = ? AND group_id = ?`
	stmtUserGroups      = `SELECT group_id, join_seq, left_seq FROM user_groups WHERE account = ? AND uid = ?`
	stmtUserGroupOne    = `SELECT join_seq, left_seq FROM user_groups WHERE account = ? AND uid = ? AND group_id = ?`
	stmtUserGroupForget = `DELETE FROM user_groups USING TIMESTAMP ? WHERE account = ? AND uid = ? AND group_id = ?`

	stmtCursorSet    = `UPDATE member_cursors SET seq = ? WHERE account = ? AND uid = ? AND group_id = ? AND appcode = ?`
	stmtCursorsIn    = `SELECT group_id, seq FROM member_cursors WHERE account = ? AND uid = ? AND group_id IN ? AND appcode = ?`
	stmtCursorsGroup = `SELECT seq FROM member_cursors WHERE account = ? AND uid = ? AND group_id = ?`
	stmtCursorsDrop  = `DELETE FROM member_cursors USING TIMESTAMP ? WHERE account = ? AND uid = ? AND group_id = ?`
)

// groupHead is a group's row of group_meta as a writer last saw it: one
// consistent state, since every change of the row moves head.
type groupHead struct {
	head      uint64
	memberSeq uint64
	members   int
	dissolved bool
	lastMsgid uint64 // the msgid of the message at head
	lastMsg   []byte // the message at head, while not known to be in group_stream
	copied    bool   // the message at head is in group_stream
}

// withLastMsgid fills in st.lastMsgid from st.lastMsg.
func withLastMsgid(st groupHead) (groupHead, error) {
	m, err := unmarshal(i64(st.head), st.lastMsg)
	if err != nil {
		return groupHead{}, err
	}
	if m.Seq != st.head {
		return groupHead{}, fmt.Errorf("das/cassandra: group head %d holds seq %d", st.head, m.Seq)
	}
	st.lastMsgid = m.Msgid
	return st, nil
}

// groupState is a Store's in-process group state: the locks that keep its
// own appends to one group from contending in Paxos, and caches that only
// save reads (a stale entry costs a lost transaction, never a wrong one).
type groupState struct {
	sems [groupStripes]chan struct{}

	mu      sync.Mutex
	heads   map[uint64]groupHead // group -> last known head
	applied map[uint64]uint64    // group -> member_seq whose rows are written
	members map[memberKey]uint64 // (group, user) -> member_seq at which it was a member
}

type memberKey struct {
	gid uint64
	u   das.User
}

// groupStates holds each Store's groupState, keyed weakly so that a Store
// that is dropped takes its state with it. (It lives beside Store rather
// than in it so that groups stay in this file.)
var groupStates sync.Map // weak.Pointer[Store] -> *groupState

func (s *Store) groups() *groupState {
	key := weak.Make(s)
	if v, ok := groupStates.Load(key); ok {
		return v.(*groupState)
	}
	gs := &groupState{heads: map[uint64]groupHead{}, applied: map[uint64]uint64{}, members: map[memberKey]uint64{}}
	for i := range gs.sems {
		gs.sems[i] = make(chan struct{}, 1)
	}
	v, loaded := groupStates.LoadOrStore(key, gs)
	if !loaded {
		runtime.AddCleanup(s, func(k weak.Pointer[Store]) { groupStates.Delete(k) }, key)
	}
	return v.(*groupState)
}

// lock takes the in-process lock of group gid, or gives up when ctx ends.
func (gs *groupState) lock(ctx context.Context, gid uint64) (func(), error) {
	sem := gs.sems[gid%groupStripes]
	select {
	case sem <- struct{}{}:
		return func() { <-sem }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for the group's lock: %w", das.ErrUnavailable, ctx.Err())
	}
}

func (gs *groupState) head(gid uint64) (groupHead, bool) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	h, ok := gs.heads[gid]
	return h, ok
}

func (gs *groupState) setHead(gid uint64, h groupHead) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if len(gs.heads) >= headCacheMax {
		clear(gs.heads)
	}
	gs.heads[gid] = h
}

func (gs *groupState) dropHead(gid uint64) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	delete(gs.heads, gid)
}

func (gs *groupState) appliedSeq(gid uint64) uint64 {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	return gs.applied[gid]
}

func (gs *groupState) setApplied(gid, seq uint64) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if len(gs.applied) >= headCacheMax {
		clear(gs.applied)
	}
	gs.applied[gid] = max(gs.applied[gid], seq)
}

func (gs *groupState) memberAt(gid uint64, u das.User) (uint64, bool) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	v, ok := gs.members[memberKey{gid, u}]
	return v, ok
}

func (gs *groupState) setMember(gid uint64, u das.User, memberSeq uint64) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if len(gs.members) >= memberCacheMax {
		clear(gs.members)
	}
	gs.members[memberKey{gid, u}] = memberSeq
}

// seqWrite is what one transaction appends: msg (Seq set) and its body,
// and for a membership change the group's new membership fields. When
// existing is set, msg is in the group already, at that seq, and nothing
// is written.
type seqWrite struct {
	msg       *pb.C2CMessage
	body      []byte
	event     bool
	members   int
	dissolved bool
	existing  uint64
}

// decideFunc looks at the group's state and says what to append as seq
// st.head+1: a write, nothing (nil, nil), or an error of the group's.
type decideFunc func(ctx context.Context, st groupHead) (*seqWrite, error)

// sequence appends to group gid what decide says, as the next seq, and
// returns it (nil when decide chose nothing) with the group's state after
// it. It holds the group's in-process lock throughout.
func (s *Store) sequence(ctx context.Context, gid uint64, decide decideFunc) (*seqWrite, groupHead, error) {
	gs := s.groups()
	unlock, err := gs.lock(ctx, gid)
	if err != nil {
		return nil, groupHead{}, err
	}
	defer unlock()
	st, ok := gs.head(gid)
	if !ok {
		// A read at Consistency is enough: a stale head only makes the
		// first transaction fail, and that returns the current row.
		if st, err = s.readHead(ctx, gid, s.cons); err != nil {
			return nil, groupHead{}, err
		}
	}
	unknown := 0
	for attempt := 0; ; attempt++ {
		if !st.copied {
			// Every seq below the head we are about to add must be in
			// the stream before the head moves past it.
			if err := s.copyToStream(ctx, gid, st.lastMsg, nil); err != nil {
				gs.dropHead(gid)
				return nil, st, storeErr("group: copy the head message", err)
			}
			st.copied, st.lastMsg = true, nil
			gs.setHead(gid, st)
		}
		w, err := decide(ctx, st)
		if err != nil || w == nil || w.existing != 0 {
			return w, st, err
		}
		applied, cur, err := s.casAppend(ctx, gid, st, w)
		if err != nil {
			if permanent(err) {
				gs.dropHead(gid)
				return nil, st, storeErr("group append", err)
			}
			// The outcome is unknown: a serial read completes or
			// aborts the round, then tells whether w is at its seq.
			ours, now, rerr := s.resolveAppend(ctx, gid, w)
			if rerr != nil {
				gs.dropHead(gid)
				return nil, st, rerr
			}
			if !ours && unknown >= max(s.cfg.Retries, 0) {
				gs.dropHead(gid)
				return nil, st, storeErr("group append", err)
			}
			unknown++
			applied, cur = ours, now
		}
		if applied {
			next := groupHead{head: w.msg.Seq, memberSeq: st.memberSeq, members: st.members, dissolved: st.dissolved,
				lastMsgid: w.msg.Msgid, lastMsg: w.body}
			if w.event {
				next.memberSeq, next.members, next.dissolved = w.msg.Seq, w.members, w.dissolved
			}
			// The message is durable in group_meta already; the copy
			// only saves readers the fallback, and the next writer
			// makes it if this one fails.
			if err := s.copyToStream(ctx, gid, w.body, w.msg); err != nil {
				s.log.Warn("group message stored but not copied to the stream yet", "group", gid, "seq", w.msg.Seq, "err", err)
			} else {
				next.copied, next.lastMsg = true, nil
			}
			gs.setHead(gid, next)
			return w, next, nil
		}
		if cur.head == 0 {
			gs.dropHead(gid)
			return nil, st, das.ErrGroupUnknown
		}
		if cur.lastMsgid == 0 {
			if cur, err = withLastMsgid(cur); err != nil {
				gs.dropHead(gid)
				return nil, st, err
			}
		}
		st = cur
		gs.setHead(gid, st)
		// A lost round means another writer's round succeeded: the group
		// progresses, so trying again at once cannot livelock, and waiting
		// would only hand the next round to a writer that does not wait.
		if attempt+1 >= seqAttempts {
			return nil, st, fmt.Errorf("%w: group %d: %d appends lost to other writers in a row", das.ErrUnavailable, gid, seqAttempts)
		}
	}
}

// casAppend runs the transaction that appends w at st.head+1. When it is
// not applied it returns the row as it is (head 0: no such group).
func (s *Store) casAppend(ctx context.Context, gid uint64, st groupHead, w *seqWrite) (bool, groupHead, error) {
	var q *gocql.Query
	if w.event {
		q = s.s.Query(stmtAppendEvent, i64(w.msg.Seq), w.body, i64(w.msg.Seq), w.members, w.dissolved, w.body,
			i64(gid), i64(st.head), i64(st.memberSeq), st.members)
	} else {
		q = s.s.Query(stmtAppendChat, i64(w.msg.Seq), w.body, i64(gid), i64(st.head), i64(st.memberSeq), st.members)
	}
	// Not idempotent: a blind retry of a round that was applied but not
	// answered would fail against its own result. sequence resolves that.
	q = q.Consistency(s.cons).SerialConsistency(s.serial)
	row := map[string]any{}
	applied, err := q.MapScanCASContext(ctx, row)
	if err != nil || applied {
		return applied, groupHead{}, err
	}
	return false, headFromRow(row), nil
}

func headFromRow(row map[string]any) groupHead {
	head, _ := row["head"].(int64)
	ms, _ := row["member_seq"].(int64)
	n, _ := row["members"].(int)
	d, _ := row["dissolved"].(bool)
	last, _ := row["last_msg"].([]byte)
	return groupHead{head: uint64(head), memberSeq: uint64(ms), members: n, dissolved: d, lastMsg: last}
}

// readHead reads group gid's row at consistency c; ErrGroupUnknown if
// there is none.
func (s *Store) readHead(ctx context.Context, gid uint64, c gocql.Consistency) (groupHead, error) {
	var (
		head, ms int64
		last     []byte
		n        int
		d        bool
	)
	err := s.q(stmtGroupHead, i64(gid)).Consistency(c).ScanContext(ctx, &head, &last, &ms, &n, &d)
	if errors.Is(err, gocql.ErrNotFound) || (err == nil && head == 0) {
		return groupHead{}, das.ErrGroupUnknown
	}
	if err != nil {
		return groupHead{}, storeErr("group: read the head", err)
	}
	return withLastMsgid(groupHead{head: uint64(head), memberSeq: uint64(ms), members: n, dissolved: d, lastMsg: last})
}

// resolveAppend finds out, after a transaction whose outcome is unknown,
// whether w was appended at its seq. A serial read finishes any round in
// flight, so its answer is final. It also returns the current state.
func (s *Store) resolveAppend(ctx context.Context, gid uint64, w *seqWrite) (bool, groupHead, error) {
	cur, err := s.readHead(ctx, gid, s.serial)
	if err != nil {
		return false, groupHead{}, err
	}
	seq := w.msg.Seq
	switch {
	case cur.head < seq:
		return false, cur, nil
	case cur.head == seq:
		return cur.lastMsgid == w.msg.Msgid, cur, nil
	}
	m, err := s.streamMessage(ctx, gid, seq)
	if err != nil {
		return false, groupHead{}, err
	}
	return m != nil && m.Msgid == w.msg.Msgid, cur, nil
}

// streamMessage reads seq from group_stream (nil if it is not there).
func (s *Store) streamMessage(ctx context.Context, gid, seq uint64) (*pb.C2CMessage, error) {
	var body []byte
	err := s.q(stmtStreamOne, i64(gid), streamBucket(seq), i64(seq)).ScanContext(ctx, &body)
	if errors.Is(err, gocql.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return unmarshal(i64(seq), body)
}

// copyToStream writes a group message (body, and m if the caller has it
// decoded) to group_stream, with its msgid row in group_msgids when it has
// a client id. The write timestamp is the msgid's time, so every copy of
// one message writes identical cells.
func (s *Store) copyToStream(ctx context.Context, gid uint64, body []byte, m *pb.C2CMessage) error {
	if m == nil {
		var err error
		if m, err = unmarshal(0, body); err != nil {
			return err
		}
	}
	if m.Seq == 0 || m.Msgid == 0 {
		return fmt.Errorf("das/cassandra: group %d: head message without seq or msgid", gid)
	}
	now := s.now()
	born := das.MsgTime(m.Msgid)
	ttl := ttlSeconds(s.cfg.Retention.MaxAge, born, now)
	if ttl < 0 {
		return nil // past retention: readers would not see it anyway
	}
	ts := writeTime(m.Msgid)
	idTTL := ttlSeconds(s.cfg.Retention.IdempotencyTTL, born, now)
	if m.ClientMsgId == "" || idTTL < 0 {
		return s.q(stmtStreamInsert, i64(gid), streamBucket(m.Seq), i64(m.Seq), body, ttl).WithTimestamp(ts).ExecContext(ctx)
	}
	// Logged: a stream row without its msgid row would let a retry of
	// the message append it a second time.
	b := s.s.Batch(gocql.LoggedBatch).WithTimestamp(ts).Consistency(s.cons)
	add(b, stmtStreamInsert, i64(gid), streamBucket(m.Seq), i64(m.Seq), body, ttl)
	add(b, stmtMsgidInsert, i64(gid), i64(m.Msgid), i64(m.Seq), idTTL)
	return b.ExecContext(ctx)
}

// validateEvent checks an event message of the caller's.
func validateEvent(ev *pb.C2CMessage) error {
	switch {
	case ev == nil:
		return fmt.Errorf("%w: nil group event", ErrInvalid)
	case ev.Msgid == 0 || ev.Msgid > das.MaxMsgid:
		return fmt.Errorf("%w: group event msgid %d", ErrInvalid, ev.Msgid)
	}
	return nil
}

// eventMessage returns the stored form of event ev: a copy with the group,
// the seq, the kind and the users set.
func eventMessage(ev *pb.C2CMessage, gid, seq uint64, kind pb.GroupEventKind, users []das.User) *pb.C2CMessage {
	m := proto.Clone(ev).(*pb.C2CMessage)
	m.GroupId, m.Seq = gid, seq
	if m.Event == nil {
		m.Event = &pb.GroupEvent{}
	}
	m.Event.Kind = kind
	if users != nil {
		m.Event.Users = pbUsers(users)
	}
	return m
}

// setEvent gives the caller's ev what the store recorded: its seq and users.
func setEvent(ev, stored *pb.C2CMessage) {
	ev.GroupId, ev.Seq = stored.GroupId, stored.Seq
	if ev.Event == nil {
		ev.Event = &pb.GroupEvent{}
	}
	ev.Event.Kind = stored.Event.Kind
	ev.Event.Users = stored.Event.Users
}

func pbUsers(us []das.User) []*pb.User {
	out := make([]*pb.User, len(us))
	for i, u := range us {
		out[i] = &pb.User{Account: u.Account, Uid: u.UID}
	}
	return out
}

// dedupUsers returns users without repeats, in first-seen order.
func dedupUsers(users []das.User) []das.User {
	seen := make(map[das.User]bool, len(users))
	out := make([]das.User, 0, len(users))
	for _, u := range users {
		if !seen[u] {
			seen[u] = true
			out = append(out, u)
		}
	}
	return out
}

// CreateGroup implements das.GroupStore: an INSERT ... IF NOT EXISTS of the
// group's row with head 1 and the CREATED event, then the member rows and
// the event's stream row.
func (s *Store) CreateGroup(ctx context.Context, id uint64, members []das.User, maxSize int, ev *pb.C2CMessage) (das.GroupInfo, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return das.GroupInfo{}, err
	}
	defer s.gate.Exit()
	if err := validateEvent(ev); err != nil {
		return das.GroupInfo{}, err
	}
	if id == 0 || id > das.MaxMsgid {
		return das.GroupInfo{}, fmt.Errorf("%w: group id %d", ErrInvalid, id)
	}
	users := dedupUsers(members)
	if len(users) == 0 || (maxSize > 0 && len(users) > maxSize) {
		return das.GroupInfo{}, fmt.Errorf("%w: %d members, at most %d", das.ErrGroupFull, len(users), maxSize)
	}
	stored := eventMessage(ev, id, 1, pb.GroupEventKind_GROUP_EVENT_CREATED, users)
	body, err := proto.Marshal(stored)
	if err != nil {
		return das.GroupInfo{}, fmt.Errorf("%w: marshal group event: %w", ErrInvalid, err)
	}
	row := map[string]any{}
	applied, err := s.s.Query(stmtCreateGroup, i64(id), body, len(users), body).
		Consistency(s.cons).SerialConsistency(s.serial).MapScanCASContext(ctx, row)
	if err != nil && permanent(err) {
		return das.GroupInfo{}, storeErr("create group", err)
	}
	if err != nil || !applied {
		// Ours if the row holds this very event: a round that was applied
		// but not answered, or a retry with the same event msgid.
		cur, rerr := s.readEvent(ctx, id, s.serial)
		switch {
		case rerr != nil && errors.Is(rerr, das.ErrGroupUnknown) && err != nil:
			return das.GroupInfo{}, storeErr("create group", err)
		case rerr != nil:
			return das.GroupInfo{}, rerr
		case cur == nil || cur.Msgid != stored.Msgid || cur.Seq != 1:
			return das.GroupInfo{}, das.ErrGroupExists
		}
	}
	setEvent(ev, stored)
	if err := s.applyEvent(ctx, id, stored); err != nil {
		s.log.Warn("group created; its member rows are left to the next reader", "group", id, "err", err)
	} else {
		s.groups().setApplied(id, 1)
	}
	next := groupHead{head: 1, memberSeq: 1, members: len(users), lastMsgid: stored.Msgid, lastMsg: body}
	if err := s.copyToStream(ctx, id, body, stored); err != nil {
		s.log.Warn("group created; its first message is not in the stream yet", "group", id, "err", err)
	} else {
		next.copied, next.lastMsg = true, nil
	}
	s.groups().setHead(id, next)
	return das.GroupInfo{ID: id, Head: 1, MemberSeq: 1, Members: len(users)}, nil
}

// readEvent reads the group's last membership event (nil if it has none)
// at consistency c, or ErrGroupUnknown.
func (s *Store) readEvent(ctx context.Context, gid uint64, c gocql.Consistency) (*pb.C2CMessage, error) {
	var (
		ms   int64
		body []byte
	)
	err := s.q(stmtGroupEvent, i64(gid)).Consistency(c).ScanContext(ctx, &ms, &body)
	if errors.Is(err, gocql.ErrNotFound) || (err == nil && ms == 0) {
		return nil, das.ErrGroupUnknown
	}
	if err != nil {
		return nil, storeErr("group: read the membership event", err)
	}
	if len(body) == 0 {
		return nil, nil
	}
	m, err := unmarshal(ms, body)
	if err != nil {
		return nil, err
	}
	if m.Seq != uint64(ms) || m.Event == nil {
		return nil, fmt.Errorf("das/cassandra: group %d: membership event at %d is seq %d", gid, ms, m.Seq)
	}
	return m, nil
}

// AddMembers implements das.GroupStore.
func (s *Store) AddMembers(ctx context.Context, id uint64, users []das.User, maxSize int, ev *pb.C2CMessage) (uint64, []das.User, error) {
	return s.changeMembers(ctx, id, users, maxSize, ev, pb.GroupEventKind_GROUP_EVENT_JOINED)
}

// RemoveMembers implements das.GroupStore.
func (s *Store) RemoveMembers(ctx context.Context, id uint64, users []das.User, ev *pb.C2CMessage) (uint64, []das.User, error) {
	return s.changeMembers(ctx, id, users, 0, ev, pb.GroupEventKind_GROUP_EVENT_LEFT)
}

// changeMembers records a JOINED or LEFT event of the users that are not
// members (JOINED) or are (LEFT), then writes their rows.
func (s *Store) changeMembers(ctx context.Context, id uint64, users []das.User, maxSize int, ev *pb.C2CMessage, kind pb.GroupEventKind) (uint64, []das.User, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, nil, err
	}
	defer s.gate.Exit()
	if err := validateEvent(ev); err != nil {
		return 0, nil, err
	}
	users = dedupUsers(users)
	var changed []das.User
	w, _, err := s.sequence(ctx, id, func(ctx context.Context, st groupHead) (*seqWrite, error) {
		if st.dissolved {
			return nil, das.ErrGroupUnknown
		}
		if err := s.ensureApplied(ctx, id, st.memberSeq); err != nil {
			return nil, err
		}
		present, err := s.membersAmong(ctx, id, users)
		if err != nil {
			return nil, err
		}
		changed = changed[:0]
		for _, u := range users {
			if present[u] == (kind == pb.GroupEventKind_GROUP_EVENT_LEFT) {
				changed = append(changed, u)
			}
		}
		if len(changed) == 0 {
			return nil, nil
		}
		n := st.members + len(changed)
		if kind == pb.GroupEventKind_GROUP_EVENT_LEFT {
			n = st.members - len(changed)
		} else if maxSize > 0 && n > maxSize {
			return nil, fmt.Errorf("%w: %d members and %d more, at most %d", das.ErrGroupFull, st.members, len(changed), maxSize)
		}
		return s.eventWrite(ev, id, st.head+1, kind, changed, n, false)
	})
	if err != nil || w == nil {
		return 0, nil, err
	}
	setEvent(ev, w.msg)
	s.applyAfterAppend(ctx, id, w.msg)
	return w.msg.Seq, slices.Clone(changed), nil
}

// Dissolve implements das.GroupStore.
func (s *Store) Dissolve(ctx context.Context, id uint64, ev *pb.C2CMessage) (uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, err
	}
	defer s.gate.Exit()
	if err := validateEvent(ev); err != nil {
		return 0, err
	}
	w, _, err := s.sequence(ctx, id, func(ctx context.Context, st groupHead) (*seqWrite, error) {
		if st.dissolved {
			return nil, das.ErrGroupUnknown
		}
		if err := s.ensureApplied(ctx, id, st.memberSeq); err != nil {
			return nil, err
		}
		return s.eventWrite(ev, id, st.head+1, pb.GroupEventKind_GROUP_EVENT_DISSOLVED, nil, 0, true)
	})
	if err != nil {
		return 0, err
	}
	setEvent(ev, w.msg)
	s.applyAfterAppend(ctx, id, w.msg)
	return w.msg.Seq, nil
}

func (s *Store) eventWrite(ev *pb.C2CMessage, gid, seq uint64, kind pb.GroupEventKind, users []das.User, members int, dissolved bool) (*seqWrite, error) {
	m := eventMessage(ev, gid, seq, kind, users)
	body, err := proto.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("%w: marshal group event: %w", ErrInvalid, err)
	}
	return &seqWrite{msg: m, body: body, event: true, members: members, dissolved: dissolved}, nil
}

// applyAfterAppend writes the rows of the membership event just appended.
// The event is durable already; if this fails, the next reader of the
// membership writes them.
func (s *Store) applyAfterAppend(ctx context.Context, gid uint64, ev *pb.C2CMessage) {
	if err := s.applyEvent(ctx, gid, ev); err != nil {
		s.log.Warn("group membership change stored; its member rows are left to the next reader",
			"group", gid, "seq", ev.Seq, "err", err)
		return
	}
	s.groups().setApplied(gid, ev.Seq)
}

// applyEvent writes the member rows of membership event ev, each with
// write timestamp ev.Seq, so that a late or repeated application never
// undoes a later change, then records ev.Seq as applied_seq.
func (s *Store) applyEvent(ctx context.Context, gid uint64, ev *pb.C2CMessage) error {
	seq := ev.Seq
	ts := i64(seq)
	var users []das.User
	for _, u := range ev.GetEvent().GetUsers() {
		users = append(users, das.User{Account: u.GetAccount(), UID: u.GetUid()})
	}
	kind := ev.GetEvent().GetKind()
	if kind == pb.GroupEventKind_GROUP_EVENT_DISSOLVED {
		// The members are whoever has a row: the rows are dropped last,
		// so a repeated application finds them all again.
		ms, err := s.memberRows(ctx, gid)
		if err != nil {
			return err
		}
		users = users[:0]
		for _, m := range ms {
			users = append(users, m.User)
		}
	}
	for chunk := range slices.Chunk(users, memberChunk) {
		b := s.s.Batch(gocql.LoggedBatch).WithTimestamp(ts).Consistency(s.cons)
		for _, u := range chunk {
			switch kind {
			case pb.GroupEventKind_GROUP_EVENT_CREATED, pb.GroupEventKind_GROUP_EVENT_JOINED:
				add(b, stmtMemberInsert, i64(gid), i32(u.Account), i64(u.UID), ts)
				add(b, stmtUserGroupJoin, i32(u.Account), i64(u.UID), i64(gid), ts)
			case pb.GroupEventKind_GROUP_EVENT_LEFT:
				add(b, stmtMemberDelete, i64(gid), i32(u.Account), i64(u.UID))
				add(b, stmtUserGroupLeave, ts, i32(u.Account), i64(u.UID), i64(gid))
			case pb.GroupEventKind_GROUP_EVENT_DISSOLVED:
				add(b, stmtUserGroupLeave, ts, i32(u.Account), i64(u.UID), i64(gid))
			default:
				return fmt.Errorf("das/cassandra: group %d: membership event %d of kind %v", gid, seq, kind)
			}
		}
		if err := b.ExecContext(ctx); err != nil {
			return err
		}
	}
	if kind == pb.GroupEventKind_GROUP_EVENT_DISSOLVED {
		if err := s.q(stmtMembersDrop, i64(gid)).WithTimestamp(ts).ExecContext(ctx); err != nil {
			return err
		}
	}
	return s.q(stmtSetApplied, ts, i64(gid)).WithTimestamp(ts).ExecContext(ctx)
}

// ensureApplied makes sure the member rows of the group's membership
// change at memberSeq (and so of every earlier one) are written.
func (s *Store) ensureApplied(ctx context.Context, gid, memberSeq uint64) error {
	if s.groups().appliedSeq(gid) >= memberSeq {
		return nil
	}
	_, err := s.applyPending(ctx, gid)
	return err
}

// applyPending reads the group's membership version and, when its member
// rows lag behind it (a writer died between the event and the rows),
// writes them from member_event. It returns the version.
func (s *Store) applyPending(ctx context.Context, gid uint64) (uint64, error) {
	var ms, ap int64
	err := s.q(stmtGroupApplied, i64(gid)).ScanContext(ctx, &ms, &ap)
	if errors.Is(err, gocql.ErrNotFound) || (err == nil && ms == 0) {
		return 0, das.ErrGroupUnknown
	}
	if err != nil {
		return 0, storeErr("group: read the membership version", err)
	}
	if ap >= ms {
		s.groups().setApplied(gid, uint64(ms))
		return uint64(ms), nil
	}
	ev, err := s.readEvent(ctx, gid, s.cons)
	if err != nil {
		return 0, err
	}
	if ev == nil {
		return 0, fmt.Errorf("das/cassandra: group %d: membership version %d without its event", gid, ms)
	}
	s.log.Info("group membership rows lag behind their event: writing them", "group", gid, "seq", ev.Seq, "applied", ap)
	if err := s.applyEvent(ctx, gid, ev); err != nil {
		return 0, storeErr("group: write lagging member rows", err)
	}
	s.groups().setApplied(gid, ev.Seq)
	return ev.Seq, nil
}

// membersAmong returns which of users have a row in group_members.
func (s *Store) membersAmong(ctx context.Context, gid uint64, users []das.User) (map[das.User]bool, error) {
	byAccount := map[uint32][]int64{}
	for _, u := range users {
		byAccount[u.Account] = append(byAccount[u.Account], i64(u.UID))
	}
	out := make(map[das.User]bool, len(users))
	for acc, uids := range byAccount {
		for chunk := range slices.Chunk(uids, inChunk) {
			it := s.q(stmtMembersIn, i64(gid), i32(acc), chunk).IterContext(ctx)
			var uid int64
			for it.Scan(&uid) {
				out[das.User{Account: acc, UID: uint64(uid)}] = true
			}
			if err := it.Close(); err != nil {
				return nil, storeErr("group: read members", err)
			}
		}
	}
	return out, nil
}

// memberRows reads every row of group_members of the group.
func (s *Store) memberRows(ctx context.Context, gid uint64) ([]das.Member, error) {
	it := s.q(stmtMembersAll, i64(gid)).PageSize(1000).IterContext(ctx)
	var (
		out  []das.Member
		acc  int32
		uid  int64
		join int64
	)
	for it.Scan(&acc, &uid, &join) {
		out = append(out, das.Member{User: das.User{Account: uint32(acc), UID: uint64(uid)}, JoinSeq: uint64(join)})
	}
	if err := it.Close(); err != nil {
		return nil, storeErr("group: read members", err)
	}
	return out, nil
}

// isMember reports whether u is a member of the group in the state whose
// membership version is memberSeq. The member rows it reads may be newer
// than that state; the transaction that follows is conditioned on
// memberSeq, so an answer about a newer state is never acted on.
func (s *Store) isMember(ctx context.Context, gid, memberSeq uint64, u das.User) (bool, error) {
	gs := s.groups()
	if at, ok := gs.memberAt(gid, u); ok && at == memberSeq {
		return true, nil
	}
	if err := s.ensureApplied(ctx, gid, memberSeq); err != nil {
		return false, err
	}
	var join int64
	err := s.q(stmtMemberOne, i64(gid), i32(u.Account), i64(u.UID)).ScanContext(ctx, &join)
	if errors.Is(err, gocql.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, storeErr("group: read member", err)
	}
	gs.setMember(gid, u, memberSeq)
	return true, nil
}

// Group implements das.GroupStore.
func (s *Store) Group(ctx context.Context, id uint64) (das.GroupInfo, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return das.GroupInfo{}, err
	}
	defer s.gate.Exit()
	var (
		head, ms int64
		n        int
		d        bool
	)
	err := s.q(stmtGroupInfo, i64(id)).ScanContext(ctx, &head, &ms, &n, &d)
	if errors.Is(err, gocql.ErrNotFound) || (err == nil && head == 0) {
		return das.GroupInfo{}, das.ErrGroupUnknown
	}
	if err != nil {
		return das.GroupInfo{}, storeErr("group", err)
	}
	return das.GroupInfo{ID: id, Head: uint64(head), MemberSeq: uint64(ms), Members: n, Dissolved: d}, nil
}

// Members implements das.GroupStore. It writes lagging member rows first,
// then reads the rows, and reads the version again: a change in between
// makes it read once more, so the members returned are those of the
// version returned.
func (s *Store) Members(ctx context.Context, id uint64) ([]das.Member, uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, 0, err
	}
	defer s.gate.Exit()
	var (
		members []das.Member
		ms      uint64
	)
	for range 3 {
		v, err := s.applyPending(ctx, id)
		if err != nil {
			return nil, 0, err
		}
		if members, err = s.memberRows(ctx, id); err != nil {
			return nil, 0, err
		}
		ms = v
		var again, ap int64
		if err := s.q(stmtGroupApplied, i64(id)).ScanContext(ctx, &again, &ap); err != nil {
			return nil, 0, storeErr("group: read the membership version", err)
		}
		if uint64(again) == v {
			break
		}
	}
	// Changing all the time: the rows may be newer than ms, which only
	// makes a cache holding them reload sooner.
	return members, ms, nil
}

// UserGroups implements das.GroupStore. A group whose member rows lag
// behind its membership version gets them written first.
func (s *Store) UserGroups(ctx context.Context, u das.User) ([]das.Membership, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	for attempt := 0; ; attempt++ {
		ms, err := s.userGroupRows(ctx, u)
		if err != nil {
			return nil, err
		}
		ids := make([]int64, len(ms))
		for i, m := range ms {
			ids[i] = i64(m.GroupID)
		}
		repaired := false
		for chunk := range slices.Chunk(ids, inChunk) {
			it := s.q(stmtGroupsLag, chunk).IterContext(ctx)
			var gid, mseq, ap int64
			var lagging []uint64
			for it.Scan(&gid, &mseq, &ap) {
				if ap < mseq {
					lagging = append(lagging, uint64(gid))
				} else {
					s.groups().setApplied(uint64(gid), uint64(mseq))
				}
			}
			if err := it.Close(); err != nil {
				return nil, storeErr("user groups: read the groups", err)
			}
			for _, gid := range lagging {
				if _, err := s.applyPending(ctx, gid); err != nil {
					return nil, err
				}
				repaired = true
			}
		}
		if !repaired || attempt > 0 {
			if repaired {
				return s.userGroupRows(ctx, u)
			}
			return ms, nil
		}
	}
}

func (s *Store) userGroupRows(ctx context.Context, u das.User) ([]das.Membership, error) {
	it := s.q(stmtUserGroups, i32(u.Account), i64(u.UID)).PageSize(1000).IterContext(ctx)
	var (
		out              []das.Membership
		gid, join, leftS int64
	)
	for it.Scan(&gid, &join, &leftS) {
		if join == 0 {
			continue // only a left_seq: the join it follows is forgotten
		}
		out = append(out, das.Membership{GroupID: uint64(gid), JoinSeq: uint64(join), LeftSeq: uint64(leftS)})
	}
	if err := it.Close(); err != nil {
		return nil, storeErr("user groups", err)
	}
	return out, nil
}

// claimKey is the idempotency key of a group message: the client id in a
// namespace of the group's own, so that it never meets a c2c message's
// key or the same client id in another group.
func claimKey(m *pb.C2CMessage) string {
	return "group/" + strconv.FormatUint(m.GroupId, 10) + "/" + m.ClientMsgId
}

// AppendGroup implements das.GroupStore.
//
// With a client message id it first claims (sender terminal, group, client
// id) in the idempotency table, as PutC2C does, storing the message; then
// it appends. Whoever appends a message with a client id (the claim's
// winner, or a retry that found the claim) first looks for its msgid in
// the group, in the state its transaction is conditioned on: at the head
// (group_meta), and below it in group_msgids, which every copy of such a
// message to the stream writes in the same logged batch, before the head
// moves past it. Found, nothing is written; otherwise the transaction
// appends it, and only if the head is still the one looked at. So
// concurrent tries, and a retry after a first attempt that died between
// its claim and its append, store the message exactly once, with the
// first attempt's msgid. A retry answers Dup with that seq and msgid.
func (s *Store) AppendGroup(ctx context.Context, m *pb.C2CMessage) (das.Appended, error) {
	a, err := s.appendGroup(ctx, m)
	das.LogWrite(ctx, s.log, "append_group", cmp.Or(a.Msgid, m.GetMsgid()), a.Dup, err)
	return a, err
}

func (s *Store) appendGroup(ctx context.Context, m *pb.C2CMessage) (das.Appended, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return das.Appended{}, err
	}
	defer s.gate.Exit()
	switch {
	case m == nil:
		return das.Appended{}, fmt.Errorf("%w: nil message", ErrInvalid)
	case m.Msgid == 0 || m.Msgid > das.MaxMsgid:
		return das.Appended{}, fmt.Errorf("%w: msgid %d", ErrInvalid, m.Msgid)
	case m.GroupId == 0 || m.GroupId > das.MaxMsgid:
		return das.Appended{}, fmt.Errorf("%w: message %d: group id %d", ErrInvalid, m.Msgid, m.GroupId)
	case m.From == nil:
		return das.Appended{}, fmt.Errorf("%w: message %d without sender", ErrInvalid, m.Msgid)
	case m.Event != nil:
		return das.Appended{}, fmt.Errorf("%w: message %d: events are recorded by the membership calls", ErrInvalid, m.Msgid)
	}
	stored := proto.Clone(m).(*pb.C2CMessage)
	stored.Seq = 0
	if stored.To == nil {
		stored.To = &pb.User{} // the idempotency record wants a recipient
	}
	body, err := proto.Marshal(stored)
	if err != nil {
		return das.Appended{}, fmt.Errorf("%w: marshal message %d: %w", ErrInvalid, m.Msgid, err)
	}
	// The message is written to group_meta, to group_stream (with its
	// group_msgids row, one logged batch) and to the idempotency table.
	if n := len(body) + 300; n > s.cfg.MaxBatchBytes {
		return das.Appended{}, fmt.Errorf("%w: message %d: %d bytes, more than MaxBatchBytes %d allows",
			ErrInvalid, m.Msgid, len(body), s.cfg.MaxBatchBytes)
	}
	if m.ClientMsgId == "" {
		return s.appendChat(ctx, stored, false, 0)
	}
	// Heads only grow: a head known before the claim is at most the head
	// when the claim was made, and no one can append this msgid before
	// finding the claim. So the winner need only look above it.
	known, _ := s.groups().head(m.GroupId)
	key := &pb.C2CMessage{Msgid: m.Msgid, From: m.From, FromAppcode: m.FromAppcode, ClientMsgId: claimKey(m)}
	won, c, err := s.claim(ctx, key, body, nil, writeTime(m.Msgid))
	if err != nil {
		return das.Appended{}, storeErr("append group: idempotency claim", err)
	}
	if won {
		return s.appendChat(ctx, stored, false, known.head)
	}
	if c.msg.GroupId != m.GroupId || c.msg.Event != nil {
		return das.Appended{}, fmt.Errorf("%w: client message id %q of %d/%d/%d is taken by message %d of group %d",
			ErrInvalid, m.ClientMsgId, m.From.GetAccount(), m.From.GetUid(), m.FromAppcode, c.msg.Msgid, c.msg.GroupId)
	}
	c.msg.Seq = 0
	return s.appendChat(ctx, c.msg, true, 0)
}

// appendChat appends m (not an event) if its sender is a member. A
// message with a client id is first looked for above seq after (see
// AppendGroup) and, if there, not appended again. dup is what to answer.
func (s *Store) appendChat(ctx context.Context, m *pb.C2CMessage, dup bool, after uint64) (das.Appended, error) {
	from := das.User{Account: m.From.GetAccount(), UID: m.From.GetUid()}
	gid := m.GroupId
	w, st, err := s.sequence(ctx, gid, func(ctx context.Context, st groupHead) (*seqWrite, error) {
		if m.ClientMsgId != "" {
			if st.lastMsgid == m.Msgid {
				return &seqWrite{msg: m, existing: st.head}, nil
			}
			if st.head > after+1 {
				var seq int64
				err := s.q(stmtMsgidSeq, i64(gid), i64(m.Msgid)).ScanContext(ctx, &seq)
				if err == nil && seq > 0 {
					return &seqWrite{msg: m, existing: uint64(seq)}, nil
				}
				if err != nil && !errors.Is(err, gocql.ErrNotFound) {
					return nil, storeErr("append group: look for the message", err)
				}
			}
		}
		if st.dissolved {
			return nil, das.ErrGroupUnknown
		}
		ok, err := s.isMember(ctx, gid, st.memberSeq, from)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, das.ErrNotMember
		}
		m.Seq = st.head + 1
		body, err := proto.Marshal(m)
		if err != nil {
			return nil, fmt.Errorf("%w: marshal message %d: %w", ErrInvalid, m.Msgid, err)
		}
		return &seqWrite{msg: m, body: body}, nil
	})
	if err != nil {
		return das.Appended{}, err
	}
	seq := w.msg.Seq
	if w.existing != 0 {
		seq = w.existing
	}
	return das.Appended{Seq: seq, Msgid: m.Msgid, Dup: dup, MemberSeq: st.memberSeq}, nil
}

// GroupPage implements das.GroupStore. It reads the group's head first:
// every seq below it is in group_stream by then, read bucket by bucket;
// the head itself comes from group_meta when the page reaches it.
func (s *Store) GroupPage(ctx context.Context, id uint64, after, upTo uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, false, err
	}
	defer s.gate.Exit()
	if limit <= 0 {
		return nil, false, fmt.Errorf("%w: group page limit %d", ErrInvalid, limit)
	}
	limit = min(limit, s.cfg.MaxPage)
	st, err := s.readHead(ctx, id, s.cons)
	if err != nil {
		return nil, false, err
	}
	hi := st.head
	if upTo > 0 && upTo < hi {
		hi = upTo
	}
	if after >= hi {
		return nil, false, nil
	}
	last := hi
	if hi == st.head {
		last = hi - 1 // the head is read from group_meta
	}
	want := limit + 1
	var msgs []*pb.C2CMessage
	if after < last {
		for b := streamBucket(after + 1); b <= streamBucket(last) && len(msgs) < want; b++ {
			need := want - len(msgs)
			it := s.q(stmtStreamPage, i64(id), b, i64(after+1), i64(last), need).PageSize(need).IterContext(ctx)
			page, err := scanMessages(it, need)
			if err != nil {
				return nil, false, storeErr("group page", err)
			}
			msgs = append(msgs, page...)
		}
	}
	if len(msgs) < want && hi == st.head {
		m, err := unmarshal(i64(st.head), st.lastMsg)
		if err != nil {
			return nil, false, err
		}
		msgs = append(msgs, m)
	}
	if len(msgs) > limit {
		return msgs[:limit], true, nil
	}
	return msgs, false, nil
}

// GroupCursors implements das.GroupStore.
func (s *Store) GroupCursors(ctx context.Context, t das.Terminal, ids []uint64) ([]uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	uniq := make([]int64, 0, len(ids))
	for _, id := range ids {
		uniq = append(uniq, i64(id))
	}
	slices.Sort(uniq)
	uniq = slices.Compact(uniq)
	got := make(map[uint64]uint64, len(uniq))
	for chunk := range slices.Chunk(uniq, inChunk) {
		it := s.q(stmtCursorsIn, i32(t.Account), i64(t.UID), chunk, i32(t.AppCode)).IterContext(ctx)
		var gid, seq int64
		for it.Scan(&gid, &seq) {
			got[uint64(gid)] = uint64(seq)
		}
		if err := it.Close(); err != nil {
			return nil, storeErr("group cursors", err)
		}
	}
	out := make([]uint64, len(ids))
	for i, id := range ids {
		out[i] = got[id]
	}
	return out, nil
}

// AckGroup implements das.GroupStore: one write whose timestamp is the
// seq, so the highest seq written wins whatever the order of arrival.
func (s *Store) AckGroup(ctx context.Context, t das.Terminal, id uint64, seq uint64) error {
	if err := s.gate.Enter(ctx); err != nil {
		return err
	}
	defer s.gate.Exit()
	if seq == 0 {
		return nil
	}
	if seq > das.MaxMsgid {
		return fmt.Errorf("%w: group %d: ack of seq %d", ErrInvalid, id, seq)
	}
	err := s.q(stmtCursorSet, i64(seq), i32(t.Account), i64(t.UID), i64(id), i32(t.AppCode)).WithTimestamp(i64(seq)).ExecContext(ctx)
	return storeErr("ack group", err)
}

// ForgetGroup implements das.GroupStore. The deletes carry the timestamp
// of the user's left seq (or of a cursor beyond it), so they remove what
// the user had up to leaving and nothing of a later return to the group:
// that one's rows and acks have higher seqs, hence higher timestamps.
func (s *Store) ForgetGroup(ctx context.Context, u das.User, id uint64) error {
	if err := s.gate.Enter(ctx); err != nil {
		return err
	}
	defer s.gate.Exit()
	var join, left int64
	err := s.q(stmtUserGroupOne, i32(u.Account), i64(u.UID), i64(id)).ScanContext(ctx, &join, &left)
	if errors.Is(err, gocql.ErrNotFound) {
		return nil
	}
	if err != nil {
		return storeErr("forget group", err)
	}
	if left == 0 {
		return nil // still a member
	}
	it := s.q(stmtCursorsGroup, i32(u.Account), i64(u.UID), i64(id)).IterContext(ctx)
	ts := left
	var seq int64
	for it.Scan(&seq) {
		ts = max(ts, seq)
	}
	if err := it.Close(); err != nil {
		return storeErr("forget group: read cursors", err)
	}
	// Cursors first: a failure after it leaves the membership record, and
	// a retry finds it and completes.
	if err := s.q(stmtCursorsDrop, ts, i32(u.Account), i64(u.UID), i64(id)).ExecContext(ctx); err != nil {
		return storeErr("forget group: cursors", err)
	}
	if err := s.q(stmtUserGroupForget, left, i32(u.Account), i64(u.UID), i64(id)).ExecContext(ctx); err != nil {
		return storeErr("forget group", err)
	}
	return nil
}
