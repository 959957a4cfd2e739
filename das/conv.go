package das

import (
	"context"

	"github.com/imd-dev/imd/schema/pb"
)

// The conversation list (PROTOCOL.md, "Conversation list"): for each
// one-to-one conversation of a user the store keeps a summary that PutC2C
// updates in the same atomic write as the message (both sides): the
// newest message and its msgid (the conversation's version). Read marks
// are the user's (shared by its terminals) and only move forward; for
// groups the store keeps the user's read seq (the group's head and last
// message come from the group stream, so a group message still costs one
// write whatever the group's size).

// ConvSummary is one one-to-one conversation of a user.
type ConvSummary struct {
	Peer User
	// Last is the newest message of the conversation (either direction);
	// its Msgid is the conversation's version.
	Last *pb.C2CMessage
	// Read is the user's read mark: every message with msgid <= Read is
	// read. 0: nothing read.
	Read uint64
	// Unread counts the messages from Peer with msgid > Read, capped at
	// MaxUnread.
	Unread int
}

// MaxUnread caps unread counts: a conversation with more shows "1000+".
const MaxUnread = 1000

// ConvStore is the storage of conversation summaries and read marks. It is
// implemented by the engines beside Store and GroupStore. Every method is
// safe for concurrent use.
type ConvStore interface {
	// Conversations returns every one-to-one conversation of u that has a
	// message still kept (retention), with its summary. Unread is
	// computed only for the conversations withUnread selects (nil: all);
	// it is called with the summary's Peer, Last and Read filled in, so
	// that a sync of 200 conversations of which 3 changed counts 3. The
	// others have Unread -1.
	Conversations(ctx context.Context, u User, withUnread func(ConvSummary) bool) ([]ConvSummary, error)

	// MarkRead moves u's read mark of the conversation with peer to upTo
	// unless it is there or beyond, and returns the mark now.
	MarkRead(ctx context.Context, u, peer User, upTo uint64) (uint64, error)

	// GroupReads returns u's read seq of each group in ids, in order (0
	// where none).
	GroupReads(ctx context.Context, u User, ids []uint64) ([]uint64, error)

	// MarkGroupRead moves u's read seq of group id to seq unless it is
	// there or beyond, and returns the mark now.
	MarkGroupRead(ctx context.Context, u User, id uint64, seq uint64) (uint64, error)
}
