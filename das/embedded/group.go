package embedded

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// Groups (das.GroupStore) in the embedded engine. A group is an h row
// (its head seq, membership version, member count and whether it is
// dissolved), its messages as n rows by seq, its members as p rows and,
// per user, u rows listing the user's memberships (see keys.go).
//
// Sequencing: every write to a group (append, create, join, removal,
// dissolution, forgetting) runs under the group's lock, one of lockStripes
// mutexes chosen by the group id. Under it the writer reads the head,
// takes head+1 and commits the message row and the new head in one synced
// batch. The lock is the sequencer: no two writers read the same head, and
// since the seq and the head are written together a seq is never given
// twice nor skipped.
//
// Crash safety: each operation is one Pebble batch committed with a WAL
// sync before the call returns, so a SIGKILL (or power loss) between two
// operations loses nothing that was acknowledged, and one during an
// operation leaves either all of its rows or none: never a message without
// its head, a member without its membership row, or an idempotency key
// without its message. After a restart the next append reads the head
// from disk and continues from it; the lock is memory only and needs no
// recovery.
//
// Throughput: the appends of one group are serialised, fsync included
// (about one per millisecond on a fast disk); different groups commit
// concurrently and share fsyncs through Pebble's group commit.

var _ das.GroupStore = (*Store)(nil)

func (s *Store) groupLock(id uint64) *sync.Mutex {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], id)
	return &s.groupLocks[s.stripe(b[:])]
}

// readGroup returns the state of group id, or false if there is none.
func (s *Store) readGroup(r pebble.Reader, id uint64) (groupMeta, bool, error) {
	v, closer, err := r.Get(groupKey(id))
	if errors.Is(err, pebble.ErrNotFound) {
		return groupMeta{}, false, nil
	}
	if err != nil {
		return groupMeta{}, false, unavailable("read group", err)
	}
	defer closer.Close()
	g, ok := decodeGroupMeta(v)
	if !ok {
		return groupMeta{}, false, fmt.Errorf("das/embedded: corrupt group state %d", id)
	}
	return g, true, nil
}

// liveGroup returns the state of group id, or das.ErrGroupUnknown if it
// does not exist or is dissolved.
func (s *Store) liveGroup(id uint64) (groupMeta, error) {
	g, ok, err := s.readGroup(s.db, id)
	if err != nil {
		return groupMeta{}, err
	}
	if !ok || g.dissolved {
		return groupMeta{}, fmt.Errorf("%w: %d", das.ErrGroupUnknown, id)
	}
	return g, nil
}

// memberJoin returns u's join seq in group id, or false if u is not a
// member.
func (s *Store) memberJoin(id uint64, u das.User) (uint64, bool, error) {
	v, closer, err := s.db.Get(groupMemberKey(id, u))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, unavailable("read member", err)
	}
	defer closer.Close()
	if len(v) != 8 {
		return 0, false, fmt.Errorf("das/embedded: corrupt member row of group %d", id)
	}
	return binary.BigEndian.Uint64(v), true, nil
}

func info(id uint64, g groupMeta) das.GroupInfo {
	return das.GroupInfo{ID: id, Head: g.head, MemberSeq: g.memberSeq, Members: int(g.members), Dissolved: g.dissolved}
}

// validGroupMessage reports, wrapped in das.ErrInvalid, what makes m (an
// event of group id, or with id 0 a message appended to its own group)
// unstorable.
func validGroupMessage(m *pb.C2CMessage, id uint64) error {
	switch {
	case m == nil:
		return fmt.Errorf("%w: nil group message", das.ErrInvalid)
	case m.Msgid == 0 || m.Msgid > das.MaxMsgid:
		return fmt.Errorf("%w: msgid %d", das.ErrInvalid, m.Msgid)
	case m.GroupId == 0 && id == 0:
		return fmt.Errorf("%w: message %d without group", das.ErrInvalid, m.Msgid)
	case id != 0 && m.GroupId != 0 && m.GroupId != id:
		return fmt.Errorf("%w: event %d of group %d for group %d", das.ErrInvalid, m.Msgid, m.GroupId, id)
	}
	return nil
}

// withSeq returns the marshalled message body with seq set. Protobuf
// readers keep the last value of a scalar field, so appending the field
// to a body marshalled before the seq was known overrides any seq in it;
// the message is marshalled outside the group's lock.
func withSeq(body []byte, seq uint64) []byte {
	b := make([]byte, 0, len(body)+1+binary.MaxVarintLen64)
	b = append(b, body...)
	b = protowire.AppendTag(b, 11, protowire.VarintType) // C2CMessage.seq
	return protowire.AppendVarint(b, seq)
}

// marshalEvent marshals ev for group id as seq, with users as its
// event's users when setUsers (JOINED and LEFT name those the store
// actually added or removed).
func marshalEvent(ev *pb.C2CMessage, id, seq uint64, kind pb.GroupEventKind, setUsers bool, users []das.User) ([]byte, error) {
	c := proto.Clone(ev).(*pb.C2CMessage)
	c.GroupId = id
	c.Seq = seq
	if c.Event == nil {
		c.Event = &pb.GroupEvent{Kind: kind}
	}
	if setUsers {
		c.Event.Users = make([]*pb.User, len(users))
		for i, u := range users {
			c.Event.Users[i] = &pb.User{Account: u.Account, Uid: u.UID}
		}
	}
	body, err := proto.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("%w: marshal event %d: %w", das.ErrInvalid, ev.Msgid, err)
	}
	return body, nil
}

// dedupUsers returns us without repeats, in first-seen order.
func dedupUsers(us []das.User) []das.User {
	seen := make(map[das.User]struct{}, len(us))
	out := make([]das.User, 0, len(us))
	for _, u := range us {
		if _, ok := seen[u]; !ok {
			seen[u] = struct{}{}
			out = append(out, u)
		}
	}
	return out
}

func (s *Store) commitGroup(b *pebble.Batch, op string) error {
	if err := b.Commit(pebble.Sync); err != nil {
		return unavailable(op, err)
	}
	return nil
}

// CreateGroup implements das.GroupStore: the group's state, the event as
// seq 1 and a member and a membership row per member, in one synced
// batch. The event is recorded as given (it names the members).
func (s *Store) CreateGroup(ctx context.Context, id uint64, members []das.User, maxSize int, ev *pb.C2CMessage) (das.GroupInfo, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return das.GroupInfo{}, err
	}
	defer s.gate.Exit()
	if id == 0 {
		return das.GroupInfo{}, fmt.Errorf("%w: group id 0", das.ErrInvalid)
	}
	if err := validGroupMessage(ev, id); err != nil {
		return das.GroupInfo{}, err
	}
	users := dedupUsers(members)
	if len(users) == 0 || len(users) > maxSize {
		return das.GroupInfo{}, fmt.Errorf("%w: %d members, at most %d", das.ErrGroupFull, len(users), maxSize)
	}
	body, err := marshalEvent(ev, id, 1, pb.GroupEventKind_GROUP_EVENT_CREATED, false, nil)
	if err != nil {
		return das.GroupInfo{}, err
	}

	mu := s.groupLock(id)
	mu.Lock()
	defer mu.Unlock()
	if _, ok, err := s.readGroup(s.db, id); err != nil {
		return das.GroupInfo{}, err
	} else if ok {
		return das.GroupInfo{}, fmt.Errorf("%w: %d", das.ErrGroupExists, id)
	}
	g := groupMeta{head: 1, memberSeq: 1, members: uint32(len(users))}
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Set(groupKey(id), g.encode(), nil)
	_ = b.Set(groupMsgKey(id, 1), encodeGroupMsgValue(ev.Msgid, body), nil)
	for _, u := range users {
		_ = b.Set(groupMemberKey(id, u), binary.BigEndian.AppendUint64(nil, 1), nil)
		_ = b.Set(userGroupKey(u, id), encodeMembership(1, 0), nil)
	}
	if err := s.commitGroup(b, "create group"); err != nil {
		return das.GroupInfo{}, err
	}
	return info(id, g), nil
}

// AddMembers implements das.GroupStore.
func (s *Store) AddMembers(ctx context.Context, id uint64, users []das.User, maxSize int, ev *pb.C2CMessage) (uint64, []das.User, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, nil, err
	}
	defer s.gate.Exit()
	if err := validGroupMessage(ev, id); err != nil {
		return 0, nil, err
	}
	users = dedupUsers(users)

	mu := s.groupLock(id)
	mu.Lock()
	defer mu.Unlock()
	g, err := s.liveGroup(id)
	if err != nil {
		return 0, nil, err
	}
	var added []das.User
	for _, u := range users {
		_, member, err := s.memberJoin(id, u)
		if err != nil {
			return 0, nil, err
		}
		if !member {
			added = append(added, u)
		}
	}
	if len(added) == 0 {
		return 0, nil, nil
	}
	if int(g.members)+len(added) > maxSize {
		return 0, nil, fmt.Errorf("%w: %d members and %d new, at most %d", das.ErrGroupFull, g.members, len(added), maxSize)
	}
	seq := g.head + 1
	body, err := marshalEvent(ev, id, seq, pb.GroupEventKind_GROUP_EVENT_JOINED, true, added)
	if err != nil {
		return 0, nil, err
	}
	g.head, g.memberSeq, g.members = seq, seq, g.members+uint32(len(added))
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Set(groupKey(id), g.encode(), nil)
	_ = b.Set(groupMsgKey(id, seq), encodeGroupMsgValue(ev.Msgid, body), nil)
	for _, u := range added {
		// A user who left earlier joins again: its record starts anew
		// at seq.
		_ = b.Set(groupMemberKey(id, u), binary.BigEndian.AppendUint64(nil, seq), nil)
		_ = b.Set(userGroupKey(u, id), encodeMembership(seq, 0), nil)
	}
	if err := s.commitGroup(b, "add members"); err != nil {
		return 0, nil, err
	}
	return seq, added, nil
}

// RemoveMembers implements das.GroupStore.
func (s *Store) RemoveMembers(ctx context.Context, id uint64, users []das.User, ev *pb.C2CMessage) (uint64, []das.User, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, nil, err
	}
	defer s.gate.Exit()
	if err := validGroupMessage(ev, id); err != nil {
		return 0, nil, err
	}
	users = dedupUsers(users)

	mu := s.groupLock(id)
	mu.Lock()
	defer mu.Unlock()
	g, err := s.liveGroup(id)
	if err != nil {
		return 0, nil, err
	}
	var (
		removed []das.User
		joins   []uint64
	)
	for _, u := range users {
		join, member, err := s.memberJoin(id, u)
		if err != nil {
			return 0, nil, err
		}
		if member {
			removed = append(removed, u)
			joins = append(joins, join)
		}
	}
	if len(removed) == 0 {
		return 0, nil, nil
	}
	seq := g.head + 1
	body, err := marshalEvent(ev, id, seq, pb.GroupEventKind_GROUP_EVENT_LEFT, true, removed)
	if err != nil {
		return 0, nil, err
	}
	g.head, g.memberSeq, g.members = seq, seq, g.members-uint32(len(removed))
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Set(groupKey(id), g.encode(), nil)
	_ = b.Set(groupMsgKey(id, seq), encodeGroupMsgValue(ev.Msgid, body), nil)
	for i, u := range removed {
		_ = b.Delete(groupMemberKey(id, u), nil)
		_ = b.Set(userGroupKey(u, id), encodeMembership(joins[i], seq), nil)
	}
	if err := s.commitGroup(b, "remove members"); err != nil {
		return 0, nil, err
	}
	return seq, removed, nil
}

// Dissolve implements das.GroupStore: the event, the end of every
// membership and the dissolved state in one synced batch. The messages
// stay (members read them up to their LeftSeq) until retention removes
// them.
func (s *Store) Dissolve(ctx context.Context, id uint64, ev *pb.C2CMessage) (uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, err
	}
	defer s.gate.Exit()
	if err := validGroupMessage(ev, id); err != nil {
		return 0, err
	}

	mu := s.groupLock(id)
	mu.Lock()
	defer mu.Unlock()
	g, err := s.liveGroup(id)
	if err != nil {
		return 0, err
	}
	seq := g.head + 1
	body, err := marshalEvent(ev, id, seq, pb.GroupEventKind_GROUP_EVENT_DISSOLVED, false, nil)
	if err != nil {
		return 0, err
	}
	b := s.db.NewBatch()
	defer b.Close()
	p := groupMemberPrefix(id)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return 0, unavailable("dissolve", err)
	}
	for valid := it.First(); valid; valid = it.Next() {
		k, v := it.Key(), it.Value()
		if len(k) != groupMemberKeyLen || len(v) != 8 {
			s.log.Error("malformed member row", "group", id, "key", k)
			continue
		}
		_ = b.Delete(k, nil)
		_ = b.Set(userGroupKey(decodeUser(k[len(p):]), id), encodeMembership(binary.BigEndian.Uint64(v), seq), nil)
	}
	if err := it.Close(); err != nil {
		return 0, unavailable("dissolve", err)
	}
	g = groupMeta{head: seq, memberSeq: seq, dissolved: true}
	_ = b.Set(groupKey(id), g.encode(), nil)
	_ = b.Set(groupMsgKey(id, seq), encodeGroupMsgValue(ev.Msgid, body), nil)
	if err := s.commitGroup(b, "dissolve"); err != nil {
		return 0, err
	}
	return seq, nil
}

// Group implements das.GroupStore.
func (s *Store) Group(ctx context.Context, id uint64) (das.GroupInfo, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return das.GroupInfo{}, err
	}
	defer s.gate.Exit()
	g, ok, err := s.readGroup(s.db, id)
	if err != nil {
		return das.GroupInfo{}, err
	}
	if !ok {
		return das.GroupInfo{}, fmt.Errorf("%w: %d", das.ErrGroupUnknown, id)
	}
	return info(id, g), nil
}

// Members implements das.GroupStore. The state and the member rows are
// read from one snapshot, so the members are exactly those at the
// version returned. A dissolved group has none.
func (s *Store) Members(ctx context.Context, id uint64) ([]das.Member, uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, 0, err
	}
	defer s.gate.Exit()
	snap := s.db.NewSnapshot()
	defer snap.Close()
	g, ok, err := s.readGroup(snap, id)
	if err != nil {
		return nil, 0, err
	}
	if !ok {
		return nil, 0, fmt.Errorf("%w: %d", das.ErrGroupUnknown, id)
	}
	p := groupMemberPrefix(id)
	it, err := snap.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return nil, 0, unavailable("members", err)
	}
	members := make([]das.Member, 0, g.members)
	for valid := it.First(); valid; valid = it.Next() {
		k, v := it.Key(), it.Value()
		if len(k) != groupMemberKeyLen || len(v) != 8 {
			s.log.Error("malformed member row", "group", id, "key", k)
			continue
		}
		members = append(members, das.Member{User: decodeUser(k[len(p):]), JoinSeq: binary.BigEndian.Uint64(v)})
	}
	if err := it.Close(); err != nil {
		return nil, 0, unavailable("members", err)
	}
	return members, g.memberSeq, nil
}

// UserGroups implements das.GroupStore, in group id order.
func (s *Store) UserGroups(ctx context.Context, u das.User) ([]das.Membership, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	p := userGroupPrefix(u)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return nil, unavailable("user groups", err)
	}
	var out []das.Membership
	for valid := it.First(); valid; valid = it.Next() {
		k := it.Key()
		join, left, ok := decodeMembership(it.Value())
		if len(k) != userGroupKeyLen || !ok {
			s.log.Error("malformed membership row", "key", k)
			continue
		}
		out = append(out, das.Membership{GroupID: lastMsgid(k), JoinSeq: join, LeftSeq: left})
	}
	if err := it.Close(); err != nil {
		return nil, unavailable("user groups", err)
	}
	return out, nil
}

// AppendGroup implements das.GroupStore. Under the group's lock (and,
// with a client id, the idempotency key's stripe) it checks the group, the
// idempotency key and the
// sender's membership, then commits the message row, the new head and the
// key in one synced batch. A retry is answered before the membership
// check, so a sender removed after its first try still learns its seq.
func (s *Store) AppendGroup(ctx context.Context, m *pb.C2CMessage) (das.Appended, error) {
	a, err := s.appendGroup(ctx, m)
	das.LogWrite(ctx, s.log, "append_group", m.GetMsgid(), a.Dup, err)
	return a, err
}

func (s *Store) appendGroup(ctx context.Context, m *pb.C2CMessage) (das.Appended, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return das.Appended{}, err
	}
	defer s.gate.Exit()
	if err := validGroupMessage(m, 0); err != nil {
		return das.Appended{}, err
	}
	if m.From == nil {
		return das.Appended{}, fmt.Errorf("%w: group message %d without sender", das.ErrInvalid, m.Msgid)
	}
	body, err := proto.Marshal(m)
	if err != nil {
		return das.Appended{}, fmt.Errorf("%w: marshal message %d: %w", das.ErrInvalid, m.Msgid, err)
	}
	id, from := m.GroupId, userOf(m.From)

	mu := s.groupLock(id)
	mu.Lock()
	defer mu.Unlock()
	g, err := s.liveGroup(id)
	if err != nil {
		return das.Appended{}, err
	}
	b := s.db.NewBatch()
	defer b.Close()
	var ik []byte
	now := s.nowMs()
	if m.ClientMsgId != "" {
		ik = groupIdemKey(das.Terminal{Account: from.Account, UID: from.UID, AppCode: m.FromAppcode}, m.ClientMsgId)
		imu := &s.idemLocks[s.stripe(ik)]
		imu.Lock()
		defer imu.Unlock()
		v, closer, err := s.getIdem(ik)
		switch {
		case err == nil:
			msgid, stored, gid, seq, ok := decodeGroupIdemValue(v)
			_ = closer.Close()
			if ok && gid == id && !s.idemExpired(stored, now) {
				return das.Appended{Seq: seq, Msgid: msgid, Dup: true, MemberSeq: g.memberSeq}, nil
			}
			// Expired, or a client id reused in another group: the
			// key is replaced (in this epoch, which lookups read
			// first).
		case !errors.Is(err, pebble.ErrNotFound):
			return das.Appended{}, unavailable("append group: idempotency lookup", err)
		}
	}
	if _, member, err := s.memberJoin(id, from); err != nil {
		return das.Appended{}, err
	} else if !member {
		return das.Appended{}, fmt.Errorf("%w: %v in group %d", das.ErrNotMember, from, id)
	}
	seq := g.head + 1
	g.head = seq
	_ = b.Set(groupKey(id), g.encode(), nil)
	_ = b.Set(groupMsgKey(id, seq), encodeGroupMsgValue(m.Msgid, withSeq(body, seq)), nil)
	if ik != nil {
		s.putIdem(b, ik, now, encodeGroupIdemValue(m.Msgid, now, id, seq))
	}
	if err := s.commitGroup(b, "append group"); err != nil {
		return das.Appended{}, err
	}
	if ik != nil {
		s.idem.add(ik, now)
	}
	return das.Appended{Seq: seq, Msgid: m.Msgid, MemberSeq: g.memberSeq}, nil
}

// GroupPage implements das.GroupStore. limit <= 0 is ErrInvalid; a limit
// above Options.MaxPage is served as MaxPage. An unknown group is
// das.ErrGroupUnknown.
func (s *Store) GroupPage(ctx context.Context, id uint64, after, upTo uint64, limit int) ([]*pb.C2CMessage, bool, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, false, err
	}
	defer s.gate.Exit()
	if limit <= 0 {
		return nil, false, fmt.Errorf("%w: group page limit %d", ErrInvalid, limit)
	}
	limit = min(limit, s.opts.MaxPage)
	snap := s.db.NewSnapshot()
	defer snap.Close()
	if _, ok, err := s.readGroup(snap, id); err != nil {
		return nil, false, err
	} else if !ok {
		return nil, false, fmt.Errorf("%w: %d", das.ErrGroupUnknown, id)
	}
	p := groupMsgPrefix(id)
	lower, ok := afterBound(p, after)
	if !ok || (upTo != 0 && after >= upTo) {
		return nil, false, nil
	}
	upper := prefixEnd(p)
	if upTo != 0 && upTo != math.MaxUint64 {
		upper = groupMsgKey(id, upTo+1)
	}
	it, err := snap.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, false, unavailable("group page", err)
	}
	msgs := make([]*pb.C2CMessage, 0, min(limit, 64))
	more := false
	for valid := it.First(); valid; valid = it.Next() {
		if len(msgs) == limit {
			more = true
			break
		}
		_, body, ok := decodeGroupMsgValue(it.Value())
		m := new(pb.C2CMessage)
		if !ok || proto.Unmarshal(body, m) != nil {
			_ = it.Close()
			return nil, false, fmt.Errorf("das/embedded: corrupt group message %d/%d", id, lastMsgid(it.Key()))
		}
		msgs = append(msgs, m)
	}
	if err := it.Close(); err != nil {
		return nil, false, unavailable("group page", err)
	}
	return msgs, more, nil
}

// GroupCursors implements das.GroupStore.
func (s *Store) GroupCursors(ctx context.Context, t das.Terminal, ids []uint64) ([]uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	out := make([]uint64, len(ids))
	for i, id := range ids {
		seq, err := s.cursor(t, id)
		if err != nil {
			return nil, err
		}
		out[i] = seq
	}
	return out, nil
}

func (s *Store) cursor(t das.Terminal, id uint64) (uint64, error) {
	v, closer, err := s.db.Get(groupCursorKey(t, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, unavailable("group cursor", err)
	}
	defer closer.Close()
	if len(v) != 8 {
		return 0, fmt.Errorf("das/embedded: corrupt cursor of group %d", id)
	}
	return binary.BigEndian.Uint64(v), nil
}

// AckGroup implements das.GroupStore. The read and the write of the
// cursor run under the terminal's Ack lock, so concurrent acks of one
// terminal leave the highest seq.
func (s *Store) AckGroup(ctx context.Context, t das.Terminal, id uint64, seq uint64) error {
	if err := s.gate.Enter(ctx); err != nil {
		return err
	}
	defer s.gate.Exit()
	if seq == 0 {
		return nil
	}
	mu := &s.ackLocks[s.terminalStripe(t)]
	mu.Lock()
	defer mu.Unlock()
	cur, err := s.cursor(t, id)
	if err != nil || cur >= seq {
		return err
	}
	if err := s.db.Set(groupCursorKey(t, id), binary.BigEndian.AppendUint64(nil, seq), pebble.Sync); err != nil {
		return unavailable("ack group", err)
	}
	return nil
}

// ForgetGroup implements das.GroupStore: the membership row and every
// cursor of u in the group, in one synced batch, under the group's lock
// (a concurrent AddMembers may be making u a member again). An AckGroup
// racing with it may leave a cursor behind; that cursor is below any
// later JoinSeq of u, so it never hides a message.
func (s *Store) ForgetGroup(ctx context.Context, u das.User, id uint64) error {
	if err := s.gate.Enter(ctx); err != nil {
		return err
	}
	defer s.gate.Exit()
	mu := s.groupLock(id)
	mu.Lock()
	defer mu.Unlock()
	k := userGroupKey(u, id)
	v, closer, err := s.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil
	}
	if err != nil {
		return unavailable("forget group", err)
	}
	_, left, ok := decodeMembership(v)
	_ = closer.Close()
	if ok && left == 0 {
		return nil // still a member
	}
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Delete(k, nil)
	p := groupCursorPrefix(u, id)
	_ = b.DeleteRange(p, prefixEnd(p), nil)
	return s.commitGroup(b, "forget group")
}

// groupTrimBudget bounds the group messages one sweep deletes, so that a
// large backlog (a lowered MaxAge) is worked off over several rounds
// without holding the sweep for long.
const groupTrimBudget = 16 * sweepBatch

// trimGroupsByAge deletes group messages with msgid < cut. It deletes a
// prefix of each group's stream only (it stops at the first message that
// is new enough), so the kept messages are always a contiguous run of
// seqs up to the head and a page starts at the oldest kept seq. Appends
// write only seqs above the head, so no lock is needed.
func (s *Store) trimGroupsByAge(ctx context.Context, cut uint64, st *SweepStats) error {
	if cut == 0 {
		return nil
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagGroupMsg}, UpperBound: []byte{tagGroupMsg + 1}})
	if err != nil {
		return unavailable("sweep", err)
	}
	w := &batcher{db: s.db}
	defer w.close()
	n := 0
	for valid := it.First(); valid && n < groupTrimBudget; {
		if n%sweepBatch == 0 && ctx.Err() != nil {
			break
		}
		k := it.Key()
		msgid, _, ok := decodeGroupMsgValue(it.Value())
		if len(k) != groupMsgKeyLen || !ok || msgid >= cut {
			valid = it.SeekGE(prefixEnd(k[:1+8]))
			continue
		}
		b := w.batch()
		_ = b.Delete(slices.Clone(k), nil)
		n++
		st.GroupMessages++
		if int(b.Count()) >= sweepBatch {
			if err := w.flush(); err != nil {
				_ = it.Close()
				return err
			}
		}
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
