// Package das is data access: the only code that talks to storage. One
// interface, Store, has two engines: an embedded key-value store for one
// machine (das/embedded) and Apache Cassandra for clusters. The conformance
// suite in das/dastest runs against both.
//
// Layout (the same logical tables in both engines):
//   - inbox: per recipient terminal (account, uid, appcode), clustered by
//     msgid: what that terminal has not acknowledged yet;
//   - timeline: per user (account, uid), clustered by msgid: both sides of
//     every conversation, for roaming history, bounded by retention;
//   - idempotency keys: per sender terminal and client message id, mapping
//     to the msgid first stored, kept for IdempotencyTTL.
//
// Groups will add group messages (by group and time bucket) and per-member
// cursors; the interface leaves room for them beside the c2c methods.
package das

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/imd-dev/imd/schema/pb"
)

// User is a person in one account system.
type User struct {
	Account uint32
	UID     uint64
}

// Terminal is one appcode of a user: the unit that owns an offline inbox.
type Terminal struct {
	Account uint32
	UID     uint64
	AppCode uint32
}

// User returns the user the terminal belongs to.
func (t Terminal) User() User { return User{Account: t.Account, UID: t.UID} }

// ErrUnavailable wraps engine failures that a retry may cure (store down,
// timeout). Logic maps it to a retryable status.
var ErrUnavailable = errors.New("das: store unavailable")

// ErrInvalid wraps errors of the caller's making (a limit <= 0, a message
// without sender, one too large for the engine): retrying cannot help.
var ErrInvalid = errors.New("das: invalid argument")

// ErrClosed is returned by calls on a closed store.
var ErrClosed = errors.New("das: store closed")

// Store is the storage of c2c messages. Every method is safe for concurrent
// use. A nil error from a write means the write is durable.
type Store interface {
	// PutC2C stores m (whose Msgid the caller has assigned) on the
	// timelines of sender and recipient, in the inbox of each recipient
	// terminal (appcode) in inbox and of each of the sender's own
	// terminals in senderInbox (the sender's other devices, which show
	// what the user sent elsewhere), unless the sender terminal (m.From,
	// m.FromAppcode) already stored a message with the same m.ClientMsgId
	// within the idempotency window: then the stored message is completed
	// (rows a first attempt that died half way did not write) and its
	// msgid is returned with dup = true. All or nothing: after an error,
	// either every row was written or none is visible.
	PutC2C(ctx context.Context, m *pb.C2CMessage, inbox, senderInbox []uint32) (msgid uint64, dup bool, err error)

	// SentMsgid returns the msgid of the message that sender stored with
	// clientMsgID within the idempotency window, and ok = false when there
	// is none: the check behind ordered sends (a send names the client id
	// of its predecessor). Where claiming the id and writing the message
	// are two steps (das/cassandra), ok may be true while the first
	// attempt's rows are still being written; that attempt's retry
	// completes them.
	SentMsgid(ctx context.Context, sender Terminal, clientMsgID string) (msgid uint64, ok bool, err error)

	// PutInbox stores m (from an app-server: an s2c message kept for
	// recipients who were offline) in the inbox of each terminal, and on
	// no timeline, with no idempotency key. m.From and m.To may be zero
	// users. All or nothing, durable when it returns nil.
	PutInbox(ctx context.Context, m *pb.C2CMessage, terminals []Terminal) error

	// InboxCount returns how many messages t has not acknowledged, and
	// the oldest one's msgid (0 when empty).
	InboxCount(ctx context.Context, t Terminal) (n int, oldest uint64, err error)

	// InboxPage returns up to limit messages of t's inbox with msgid >
	// after, oldest first, and whether more follow.
	InboxPage(ctx context.Context, t Terminal, after uint64, limit int) (msgs []*pb.C2CMessage, more bool, err error)

	// Ack removes exactly the given msgids from t's inbox. It returns the
	// messages it removed (so logic can send delivered receipts to their
	// senders) and the msgids that were not there (never delivered to t,
	// or already acked).
	Ack(ctx context.Context, t Terminal, msgids []uint64) (acked []*pb.C2CMessage, missing []uint64, err error)

	// History returns up to limit messages of u's timeline with msgid >
	// since, oldest first: every conversation, or only the one with peer
	// when peer is not nil. more says whether more follow.
	History(ctx context.Context, u User, peer *User, since uint64, limit int) (msgs []*pb.C2CMessage, more bool, err error)

	// Close flushes and releases the store.
	Close() error
}

type logIDKey struct{}

// WithLogID returns ctx carrying the trace id of the request that causes a
// store call, for the engines' log lines.
func WithLogID(ctx context.Context, logid uint64) context.Context {
	if logid == 0 {
		return ctx
	}
	return context.WithValue(ctx, logIDKey{}, logid)
}

// LogID returns the trace id WithLogID put in ctx, or 0.
func LogID(ctx context.Context) uint64 {
	id, _ := ctx.Value(logIDKey{}).(uint64)
	return id
}

// LogWrite logs the outcome of an engine's write of message msgid at debug
// level with the trace id in ctx (warn when it failed). It costs nothing
// when debug logging is off and the write succeeded.
func LogWrite(ctx context.Context, log *slog.Logger, op string, msgid uint64, dup bool, err error) {
	switch {
	case err != nil:
		log.Warn("store write failed", "op", op, "msgid", msgid, "err", err, "logid", LogID(ctx))
	case log.Enabled(ctx, slog.LevelDebug):
		log.Debug("stored", "op", op, "msgid", msgid, "dup", dup, "logid", LogID(ctx))
	}
}

// Retention bounds the timelines (roaming history) and the idempotency keys.
type Retention struct {
	// MaxAge drops timeline messages older than this. 0 keeps them forever.
	MaxAge time.Duration
	// MaxCount keeps at most this many messages per user timeline (the
	// newest). 0 means no bound.
	MaxCount int
	// IdempotencyTTL is how long a client message id is remembered.
	// Default 24h.
	IdempotencyTTL time.Duration
}
