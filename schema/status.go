package schema

import (
	"fmt"
	"slices"
)

// Status is the 16-bit status of a response frame. 0 is OK; any other value
// is an error whose details travel in an pb.Error body. Codes are grouped by
// who must act: 1xxx the frame itself, 2xxx authentication, 3xxx limits,
// 4xxx the request's content, 5xxx the server (retry).
type Status uint16

// Status codes. Never renumber; add new codes at the end of a group.
const (
	StatusOK Status = 0

	StatusBadFrame      Status = 1001 // bad magic or flags; the connection is closed
	StatusBadVersion    Status = 1002 // unsupported frame version; the connection is closed
	StatusBodyTooLarge  Status = 1003 // bodylen over the maximum; the connection is closed
	StatusBadBody       Status = 1004 // the body is not a valid message for the command
	StatusUnknownCmd    Status = 1005 // the command is not in the table
	StatusNotLoggedIn   Status = 1006 // a command other than login before login; the connection is closed
	StatusUIDMismatch   Status = 1007 // the header uid is neither 0 nor the logged-in uid
	StatusBadKind       Status = 1008 // a response or notify where a request was expected
	StatusAlreadyLogged Status = 1009 // login on a connection that is already logged in

	StatusTokenInvalid   Status = 2001 // the token's signature does not match
	StatusTokenExpired   Status = 2002 // the token's expiry has passed
	StatusTokenMalformed Status = 2003 // the token cannot be parsed
	StatusUnknownAppCode Status = 2004 // the appcode is not configured
	StatusTokenMismatch  Status = 2005 // the token was minted for another appcode or uid
	StatusForbidden      Status = 2006 // the source address or the uid is blacklisted; the connection is closed

	StatusRateLimited     Status = 3001 // too many requests; retry later
	StatusTooManyConns    Status = 3002 // the gateway is at its connection limit; try another
	StatusLoginTimeout    Status = 3003 // no login within the login deadline; the connection is closed
	StatusTooManyInFlight Status = 3004 // too many requests in flight on this connection
	StatusOutOfOrder      Status = 3005 // an ordered send whose predecessor is not stored (yet); send it again once that one is answered

	StatusBadRecipient    Status = 4001 // the recipient address is unknown or malformed
	StatusEmptyContent    Status = 4002 // the message content is empty
	StatusBadArgument     Status = 4003 // a field is out of range (page size, limit, ...)
	StatusUnmappedType    Status = 4004 // no route is configured for this (appcode, msgtype)
	StatusContentTooLarge Status = 4005 // the message content is over the configured maximum
	StatusUnknownConn     Status = 4006 // internal RPC: the gateway does not hold that connection (it closed)
	StatusUnknownGroup    Status = 4007 // the group does not exist (or was dissolved)
	StatusNotMember       Status = 4008 // the user is not a member of the group
	StatusGroupFull       Status = 4009 // the group is at its maximum size
	StatusGroupExists     Status = 4010 // a group with that id exists already
	StatusTooManyFollowed Status = 4011 // a presence subscription over the server's bound
	StatusOtherDC         Status = 4012 // HTTP API: another data center orders this group; call its API

	StatusInternal     Status = 5001 // a bug or unexpected failure; retrying may help
	StatusUnavailable  Status = 5002 // a dependency (store, bus) is down; retry with backoff
	StatusTimeout      Status = 5003 // the request timed out inside the platform; retry
	StatusShuttingDown Status = 5004 // the server is draining; reconnect elsewhere and retry
)

var statusNames = map[Status]string{
	StatusOK:              "ok",
	StatusBadFrame:        "bad frame",
	StatusBadVersion:      "unsupported version",
	StatusBodyTooLarge:    "body too large",
	StatusBadBody:         "bad body",
	StatusUnknownCmd:      "unknown command",
	StatusNotLoggedIn:     "not logged in",
	StatusUIDMismatch:     "uid mismatch",
	StatusBadKind:         "bad frame kind",
	StatusAlreadyLogged:   "already logged in",
	StatusTokenInvalid:    "token invalid",
	StatusTokenExpired:    "token expired",
	StatusTokenMalformed:  "token malformed",
	StatusUnknownAppCode:  "unknown appcode",
	StatusTokenMismatch:   "token mismatch",
	StatusForbidden:       "forbidden",
	StatusRateLimited:     "rate limited",
	StatusTooManyConns:    "too many connections",
	StatusLoginTimeout:    "login timeout",
	StatusTooManyInFlight: "too many requests in flight",
	StatusOutOfOrder:      "out of order",
	StatusBadRecipient:    "bad recipient",
	StatusEmptyContent:    "empty content",
	StatusBadArgument:     "bad argument",
	StatusUnmappedType:    "unmapped message type",
	StatusContentTooLarge: "content too large",
	StatusUnknownConn:     "unknown connection",
	StatusUnknownGroup:    "unknown group",
	StatusNotMember:       "not a member",
	StatusGroupFull:       "group full",
	StatusGroupExists:     "group exists",
	StatusTooManyFollowed: "too many followed",
	StatusOtherDC:         "other data center",
	StatusInternal:        "internal error",
	StatusUnavailable:     "unavailable",
	StatusTimeout:         "timeout",
	StatusShuttingDown:    "shutting down",
}

// Statuses returns every status code (StatusOK included), sorted by number.
func Statuses() []Status {
	ss := make([]Status, 0, len(statusNames))
	for s := range statusNames {
		ss = append(ss, s)
	}
	slices.Sort(ss)
	return ss
}

func (s Status) String() string {
	if n, ok := statusNames[s]; ok {
		return n
	}
	return fmt.Sprintf("status(%d)", uint16(s))
}

// Retryable reports whether a client may retry the same request (after a
// backoff, possibly on another gateway) and expect a different outcome.
func (s Status) Retryable() bool {
	switch s {
	case StatusRateLimited, StatusTooManyConns, StatusTooManyInFlight, StatusOutOfOrder,
		StatusInternal, StatusUnavailable, StatusTimeout, StatusShuttingDown:
		return true
	}
	return false
}

// Fatal reports whether the sender closes the connection after a response
// with this status.
func (s Status) Fatal() bool {
	switch s {
	case StatusBadFrame, StatusBadVersion, StatusBodyTooLarge, StatusNotLoggedIn, StatusLoginTimeout:
		return true
	}
	return false
}

// Error is a status with a human-readable detail; it is the Go error form of
// an error response, so callers can use errors.As and check Retryable.
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("status %d (%s)", uint16(e.Status), e.Status)
	}
	return fmt.Sprintf("status %d (%s): %s", uint16(e.Status), e.Status, e.Message)
}

// Retryable reports whether the request may be retried.
func (e *Error) Retryable() bool { return e.Status.Retryable() }

// Errorf builds an *Error.
func Errorf(s Status, format string, args ...any) *Error {
	return &Error{Status: s, Message: fmt.Sprintf(format, args...)}
}
