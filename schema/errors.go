package schema

import (
	"errors"

	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Frame decoding errors. Each means the byte stream can no longer be trusted:
// the receiver answers with an error frame (where it can) and closes.
var (
	// ErrShortHeader: fewer than HeaderLen bytes were given to ParseHeader.
	ErrShortHeader = errors.New("schema: short frame header")
	// ErrBadMagic: the first two bytes are not 0x58 0x44.
	ErrBadMagic = errors.New("schema: bad frame magic")
	// ErrBadVersion: the version byte is not Version.
	ErrBadVersion = errors.New("schema: unsupported frame version")
	// ErrBadFlags: reserved flag bits are set or the kind is 3.
	ErrBadFlags = errors.New("schema: bad frame flags")
	// ErrBodyTooLarge: bodylen is over the configured maximum.
	ErrBodyTooLarge = errors.New("schema: frame body over the maximum")
)

// StatusOf maps a decoding error to the status code sent to the peer.
func StatusOf(err error) Status {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, ErrBadMagic), errors.Is(err, ErrShortHeader), errors.Is(err, ErrBadFlags):
		return StatusBadFrame
	case errors.Is(err, ErrBadVersion):
		return StatusBadVersion
	case errors.Is(err, ErrBodyTooLarge):
		return StatusBodyTooLarge
	}
	return StatusInternal
}

// ErrorBody is the Error body of a response with status st: every side
// that answers with an error (gateway, internal RPC) encodes it here.
func ErrorBody(st Status, msg string) []byte {
	body, _ := proto.Marshal(&pb.Error{Code: uint32(st), Message: msg, Retryable: st.Retryable()})
	return body
}

// DecodeError is the *Error of a response whose status is not OK, with
// the message of its Error body when the body is one.
func DecodeError(h *Header, body []byte) *Error {
	var e pb.Error
	msg := ""
	if proto.Unmarshal(body, &e) == nil {
		msg = e.GetMessage()
	}
	return &Error{Status: h.Status, Message: msg}
}
