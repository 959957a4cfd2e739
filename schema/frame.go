// Package schema holds the wire contract of the platform: the fixed 40-byte
// frame header, the command table, status codes and the protobuf bodies
// (package schema/pb). Every tier and the SDK speak through this package, so
// it has no dependency on any of them.
package schema

import (
	"encoding/binary"
	"fmt"
)

// Frame layout constants. The header is fixed; a change needs a new Version.
const (
	HeaderLen = 40
	Magic0    = 0x58 // 'X'
	Magic1    = 0x44 // 'D'
	Version   = 1

	// DefaultMaxBody is the body limit a decoder applies when none is configured.
	DefaultMaxBody = 64 << 10
)

// Kind is the low two bits of the flags byte.
type Kind uint8

// Frame kinds.
const (
	KindRequest  Kind = 0
	KindResponse Kind = 1
	KindNotify   Kind = 2
)

func (k Kind) String() string {
	switch k {
	case KindRequest:
		return "request"
	case KindResponse:
		return "response"
	case KindNotify:
		return "notify"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Flag bits above the kind.
const (
	FlagCompressed uint8 = 1 << 2
	FlagEncrypted  uint8 = 1 << 3
	// FlagOrdered on a request asks the gateway to serve it only after
	// the connection's earlier ordered requests were answered, and not at
	// all (3005) when one of those queued before it failed (PROTOCOL.md,
	// "Ordered sends").
	FlagOrdered uint8 = 1 << 4

	kindMask     uint8 = 0x03
	reservedMask uint8 = 0xE0
)

// Header is the decoded 40-byte frame header. It is a plain value: encoding and
// decoding never allocate.
type Header struct {
	Version uint8
	Flags   uint8
	Cmd     Cmd
	Status  Status
	AppCode uint32
	MsgType uint32
	UID     uint64
	Seq     uint32
	LogID   uint64
	BodyLen uint32
}

// Kind returns the frame kind from the flags byte.
func (h *Header) Kind() Kind { return Kind(h.Flags & kindMask) }

// SetKind replaces the kind bits of the flags byte.
func (h *Header) SetKind(k Kind) { h.Flags = h.Flags&^kindMask | uint8(k)&kindMask }

// Put writes the header into b, which must hold at least HeaderLen bytes.
// Magic and version are always written as this package's constants unless
// h.Version is set (tests use that to produce bad frames).
func (h *Header) Put(b []byte) {
	_ = b[HeaderLen-1]
	v := h.Version
	if v == 0 {
		v = Version
	}
	b[0], b[1], b[2], b[3] = Magic0, Magic1, v, h.Flags
	binary.BigEndian.PutUint16(b[4:], uint16(h.Cmd))
	binary.BigEndian.PutUint16(b[6:], uint16(h.Status))
	binary.BigEndian.PutUint32(b[8:], h.AppCode)
	binary.BigEndian.PutUint32(b[12:], h.MsgType)
	binary.BigEndian.PutUint64(b[16:], h.UID)
	binary.BigEndian.PutUint32(b[24:], h.Seq)
	binary.BigEndian.PutUint64(b[28:], h.LogID)
	binary.BigEndian.PutUint32(b[36:], h.BodyLen)
}

// ParseHeader decodes and validates a header from b (at least HeaderLen
// bytes). maxBody bounds BodyLen; 0 means DefaultMaxBody. On error the
// returned header holds whatever fields could be read, so the caller can
// answer with the right seq and command.
func ParseHeader(b []byte, maxBody uint32) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, ErrShortHeader
	}
	h := Header{
		Version: b[2],
		Flags:   b[3],
		Cmd:     Cmd(binary.BigEndian.Uint16(b[4:])),
		Status:  Status(binary.BigEndian.Uint16(b[6:])),
		AppCode: binary.BigEndian.Uint32(b[8:]),
		MsgType: binary.BigEndian.Uint32(b[12:]),
		UID:     binary.BigEndian.Uint64(b[16:]),
		Seq:     binary.BigEndian.Uint32(b[24:]),
		LogID:   binary.BigEndian.Uint64(b[28:]),
		BodyLen: binary.BigEndian.Uint32(b[36:]),
	}
	if b[0] != Magic0 || b[1] != Magic1 {
		return h, ErrBadMagic
	}
	if h.Version != Version {
		return h, ErrBadVersion
	}
	if h.Flags&reservedMask != 0 || h.Flags&kindMask == 3 {
		return h, ErrBadFlags
	}
	if maxBody == 0 {
		maxBody = DefaultMaxBody
	}
	if h.BodyLen > maxBody {
		return h, ErrBodyTooLarge
	}
	return h, nil
}

// AppendFrame appends the header (with BodyLen set to len(body)) and body to
// dst and returns the extended slice.
func AppendFrame(dst []byte, h *Header, body []byte) []byte {
	h.BodyLen = uint32(len(body))
	n := len(dst)
	if cap(dst)-n < HeaderLen+len(body) {
		nd := make([]byte, n, n+HeaderLen+len(body))
		copy(nd, dst)
		dst = nd
	}
	dst = dst[:n+HeaderLen]
	h.Put(dst[n:])
	return append(dst, body...)
}
