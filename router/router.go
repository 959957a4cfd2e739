// Package router holds the online-state table: which sessions each user has
// and on which gateway connection each session lives. The state is soft:
// gateways are its source of truth and re-announce their sessions when a
// router restarts.
package router

import "context"

// User is a person: an account system plus a uid in it. Messages are
// addressed to users.
type User struct {
	Account uint32
	UID     uint64
}

// Session is one logged-in terminal of a user: (appcode, uid) on one gateway
// connection. Epoch grows with every login, so a stale disconnect of an old
// connection never removes a newer session.
type Session struct {
	Account  uint32
	AppCode  uint32
	UID      uint64
	Gate     string // id of the gateway holding the connection
	Conn     uint64 // connection id, unique within that gateway's lifetime
	Epoch    uint64
	DeviceID string
	LoginMS  int64 // unix milliseconds of the login
}

// User returns the user the session belongs to.
func (s *Session) User() User { return User{Account: s.Account, UID: s.UID} }

// Same reports whether s and o are the same login (not merely the same
// terminal).
func (s *Session) Same(o *Session) bool {
	return s.AppCode == o.AppCode && s.UID == o.UID && s.Gate == o.Gate && s.Conn == o.Conn && s.Epoch == o.Epoch
}

// Router is the online-state table. All methods are safe for concurrent use.
type Router interface {
	// Register adds s as a session of its user. If the user then has more
	// than maxPerTerminal sessions on s.AppCode, the oldest of them are
	// removed and returned so the caller can kick them. maxPerTerminal < 1
	// means 1. Registering a login the table holds already (Same) replaces
	// it and evicts nothing.
	Register(ctx context.Context, s Session, maxPerTerminal int) (evicted []Session, err error)

	// Unregister removes s if the table still holds exactly that login
	// (same gate, connection and epoch) and reports whether it did.
	Unregister(ctx context.Context, s Session) (bool, error)

	// Lookup returns the sessions of u, in login order. The slice is the
	// caller's.
	Lookup(ctx context.Context, u User) ([]Session, error)

	// LookupMany returns the sessions of each user in us; out[i] belongs to
	// us[i]. Fan-outs use it so that one call serves many recipients.
	LookupMany(ctx context.Context, us []User) ([][]Session, error)

	// PurgeGate removes every session held by gate, for a gateway that
	// stopped or stopped heartbeating, and returns how many it removed.
	PurgeGate(ctx context.Context, gate string) (int, error)

	// Stats returns the numbers of users and sessions in the table.
	Stats(ctx context.Context) (Stats, error)
}

// Stats counts the table.
type Stats struct {
	Users    int
	Sessions int
}
