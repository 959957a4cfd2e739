package das

import (
	"context"
	"errors"

	"github.com/imd-dev/imd/schema/pb"
)

// Groups (DESIGN.md, "Groups"): a group message is stored once, in the
// group's own stream, and numbered there: seq 1, 2, 3, ... without gaps,
// one order for every member. The store is the group's sequencer: a
// message and its seq are written in one atomic step (the embedded
// engine under a per-group lock, Cassandra by a lightweight transaction on
// the group's head), so no seq is ever given twice or skipped, whichever
// process dies, and a message whose append returned is never reordered.
//
// Membership changes are messages of the stream too (system messages with
// pb.GroupEvent set), so members learn of them in order with the chat, and
// each member's visibility is a range of seqs: from its join (JoinSeq) to
// its removal (LeftSeq, 0 while a member). The group's membership version
// (MemberSeq: the seq of its last membership change) comes back from every
// append, so a cache of the members knows whether it is current for the
// message it fans out.
//
// Each member terminal keeps a cursor per group: every seq up to it is
// acknowledged. Cursors only move forward.

// Group errors; logic maps them to statuses 4007-4010.
var (
	ErrGroupUnknown = errors.New("das: unknown group")
	ErrGroupExists  = errors.New("das: group exists")
	ErrNotMember    = errors.New("das: not a member of the group")
	ErrGroupFull    = errors.New("das: group full")
)

// GroupInfo is a group's state.
type GroupInfo struct {
	ID        uint64
	Head      uint64 // the newest seq
	MemberSeq uint64 // seq of the last membership change (the members' version)
	Members   int
	Dissolved bool
}

// Member is a current member of a group.
type Member struct {
	User    User
	JoinSeq uint64
}

// Membership is one group of a user: the seqs the user may see are
// JoinSeq..LeftSeq (LeftSeq 0: still a member, up to the head).
type Membership struct {
	GroupID uint64
	JoinSeq uint64
	LeftSeq uint64
}

// Appended is the outcome of appending a message to a group.
type Appended struct {
	Seq   uint64
	Msgid uint64 // the stored message's msgid: the first attempt's on a retry
	Dup   bool   // a retry (same sender terminal and client message id) of a stored message
	// MemberSeq is the group's membership version at Seq: a cache of the
	// members loaded at an older version must be reloaded before fanning
	// the message out.
	MemberSeq uint64
}

// GroupStore is the storage of groups. Every method is safe for
// concurrent use; a nil error from a write means it is durable. Event
// messages (ev) carry a Msgid the caller assigned, the group id, and the
// event; the store sets their Seq.
type GroupStore interface {
	// CreateGroup creates group id with members (deduplicated; at least
	// one, at most maxSize, else ErrGroupFull) and records ev (a CREATED
	// event naming them) as seq 1, which is every first member's JoinSeq.
	// ErrGroupExists if the id is taken (even by a dissolved group).
	CreateGroup(ctx context.Context, id uint64, members []User, maxSize int, ev *pb.C2CMessage) (GroupInfo, error)

	// AddMembers adds the users that are not members and records ev (a
	// JOINED event; the store sets its users to those added) as the next
	// seq, their JoinSeq. When none is new nothing is recorded and seq is
	// 0. ErrGroupFull when the group would grow over maxSize: nothing
	// changes. A user removed earlier joins again from the new seq.
	AddMembers(ctx context.Context, id uint64, users []User, maxSize int, ev *pb.C2CMessage) (seq uint64, added []User, err error)

	// RemoveMembers removes the users that are members and records ev (a
	// LEFT event; the store sets its users to those removed) as the next
	// seq, their LeftSeq: the last message they may see. When none is a
	// member nothing is recorded and seq is 0.
	RemoveMembers(ctx context.Context, id uint64, users []User, ev *pb.C2CMessage) (seq uint64, removed []User, err error)

	// Dissolve records ev (a DISSOLVED event) as the group's last seq; it
	// is every member's LeftSeq and the group takes no more messages
	// (ErrGroupUnknown). Dissolving twice is ErrGroupUnknown.
	Dissolve(ctx context.Context, id uint64, ev *pb.C2CMessage) (seq uint64, err error)

	// Group returns the state of group id, or ErrGroupUnknown.
	Group(ctx context.Context, id uint64) (GroupInfo, error)

	// Members returns the current members of group id and the membership
	// version they are at (GroupInfo.MemberSeq).
	Members(ctx context.Context, id uint64) (members []Member, memberSeq uint64, err error)

	// UserGroups returns every membership of u not forgotten yet: the
	// groups it is a member of (LeftSeq 0) and those it left or that were
	// dissolved (LeftSeq set) until ForgetGroup drops them.
	UserGroups(ctx context.Context, u User) ([]Membership, error)

	// AppendGroup stores m (GroupId, From, FromAppcode, Msgid set; To the
	// zero user) as the group's next message if m.From is a member, and
	// returns its seq. A retry with the same sender terminal and
	// ClientMsgId within the idempotency window stores nothing and returns
	// the first seq and msgid with Dup. ErrNotMember, ErrGroupUnknown
	// (unknown or dissolved).
	AppendGroup(ctx context.Context, m *pb.C2CMessage) (Appended, error)

	// GroupPage returns up to limit messages of group id with seq >
	// after and seq <= upTo (0: the head), oldest first, and whether more
	// follow within that bound. Messages older than the retention's MaxAge
	// may be gone: a page then starts at the oldest kept seq.
	GroupPage(ctx context.Context, id uint64, after, upTo uint64, limit int) (msgs []*pb.C2CMessage, more bool, err error)

	// GroupCursors returns terminal t's cursors of the groups in ids, in
	// order (0 where t never acked).
	GroupCursors(ctx context.Context, t Terminal, ids []uint64) ([]uint64, error)

	// AckGroup moves t's cursor of group id to seq unless it is there or
	// beyond already (cursors never move backwards). Bounds are logic's
	// to check.
	AckGroup(ctx context.Context, t Terminal, id uint64, seq uint64) error

	// ForgetGroup drops u's membership record of a group it left (or that
	// was dissolved) and u's terminals' cursors of it; a no-op while u is
	// a member.
	ForgetGroup(ctx context.Context, u User, id uint64) error
}
