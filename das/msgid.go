package das

import (
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// SnowflakeEpoch is the epoch of bwmarrin/snowflake's default node, in Unix
// milliseconds. msgids are snowflake ids: the time in milliseconds since
// this epoch, shifted left by 22 bits above the node and sequence.
const SnowflakeEpoch = 1288834974657

const snowflakeTimeShift = 22

// MaxMsgid is the largest msgid (snowflake ids are positive int64s).
const MaxMsgid = math.MaxInt64

// MsgTime returns the time encoded in a snowflake msgid.
func MsgTime(msgid uint64) time.Time {
	return time.UnixMilli(int64(msgid>>snowflakeTimeShift) + SnowflakeEpoch)
}

// MsgidAt returns the smallest msgid whose time is t, so that every msgid
// below it is older than t. It is 0 for times before the epoch.
func MsgidAt(t time.Time) uint64 {
	ms := t.UnixMilli() - SnowflakeEpoch
	if ms <= 0 {
		return 0
	}
	return uint64(ms) << snowflakeTimeShift
}

// EncodeC2C validates and marshals m, and returns the inbox appcodes of
// the recipient and of the sender sorted, each once: what every engine's
// PutC2C starts with. A note to oneself (sender = recipient) has one set
// of terminals: the sender's appcodes join the recipient's.
func EncodeC2C(m *pb.C2CMessage, inbox, senderInbox []uint32) (body []byte, appcodes, senderAppcodes []uint32, err error) {
	if body, err = encode(m); err != nil {
		return nil, nil, nil, err
	}
	appcodes = slices.Clone(inbox)
	if m.From.GetAccount() == m.To.GetAccount() && m.From.GetUid() == m.To.GetUid() {
		appcodes = append(appcodes, senderInbox...)
		senderInbox = nil
	}
	slices.Sort(appcodes)
	senderAppcodes = slices.Clone(senderInbox)
	slices.Sort(senderAppcodes)
	return body, slices.Compact(appcodes), slices.Compact(senderAppcodes), nil
}

// EncodeInbox validates and marshals m for PutInbox to terminals.
func EncodeInbox(m *pb.C2CMessage, terminals []Terminal) ([]byte, error) {
	if err := ValidateMessage(m); err != nil {
		return nil, err
	}
	if len(terminals) == 0 {
		return nil, fmt.Errorf("%w: no terminals for message %d", ErrInvalid, m.Msgid)
	}
	return encode(m)
}

func encode(m *pb.C2CMessage) ([]byte, error) {
	if err := ValidateMessage(m); err != nil {
		return nil, err
	}
	body, err := proto.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("%w: marshal message %d: %w", ErrInvalid, m.Msgid, err)
	}
	return body, nil
}

// ValidateMessage reports, wrapped in ErrInvalid, what makes m unstorable.
func ValidateMessage(m *pb.C2CMessage) error {
	switch {
	case m == nil:
		return fmt.Errorf("%w: nil message", ErrInvalid)
	case m.Msgid == 0 || m.Msgid > MaxMsgid:
		return fmt.Errorf("%w: msgid %d", ErrInvalid, m.Msgid)
	case m.From == nil || m.To == nil:
		return fmt.Errorf("%w: message %d without sender or recipient", ErrInvalid, m.Msgid)
	}
	return nil
}
