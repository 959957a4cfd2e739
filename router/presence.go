package router

import "context"

// Change is a user's presence change: its first session registered (Online)
// or its last one left. Version grows with every change of that user, on
// whichever logic node made it, so that notifies can be ordered and their
// duplicates dropped. A zero Version means the call changed nothing.
type Change struct {
	User    User
	Online  bool
	Version uint64
	AtMS    int64    // unix milliseconds of the change
	Apps    []uint32 // the appcodes online, when Online
}

// Changed reports whether the change happened.
func (c Change) Changed() bool { return c.Version != 0 }

// State is a user's presence now: its sessions and the version of its last
// change (0 when none is remembered).
type State struct {
	Sessions []Session
	Version  uint64
}

// Presence is what presence needs from the online-state table beyond
// Router: the same changes, told apart when they bring a user online or
// offline, and the subscriptions of sessions to users. Memory and Redis
// implement it; the subscriptions live next to the sessions so that every
// logic node sees them. All methods are safe for concurrent use.
type Presence interface {
	Router

	// RegisterChange is Register, and reports the change when s is its
	// user's first session.
	RegisterChange(ctx context.Context, s Session, maxPerTerminal int) (evicted []Session, ch Change, err error)
	// UnregisterChange is Unregister, and reports the change when s was
	// its user's last session.
	UnregisterChange(ctx context.Context, s Session) (removed bool, ch Change, err error)
	// PurgeGateChanges is PurgeGate, and returns the sessions it removed
	// and the users that lost their last session.
	PurgeGateChanges(ctx context.Context, gate string) (purged []Session, offline []Change, err error)
	// States returns the presence of each user in us; out[i] is us[i]'s.
	States(ctx context.Context, us []User) ([]State, error)

	// Follow replaces the users sub follows with us.
	Follow(ctx context.Context, sub Session, us []User) error
	// Unfollow drops every subscription of sub, for a session that ended.
	Unfollow(ctx context.Context, sub Session) error
	// Followers returns the sessions that follow u.
	Followers(ctx context.Context, u User) ([]Session, error)
}

// sessionKey is a login's identity (Session.Same) as a map key.
type sessionKey struct {
	Account uint32
	AppCode uint32
	UID     uint64
	Gate    string
	Conn    uint64
	Epoch   uint64
}

func keyOf(s *Session) sessionKey {
	return sessionKey{Account: s.Account, AppCode: s.AppCode, UID: s.UID, Gate: s.Gate, Conn: s.Conn, Epoch: s.Epoch}
}
