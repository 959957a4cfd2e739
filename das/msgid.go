package das

import (
	"fmt"
	"math"
	"time"

	"github.com/imd-dev/imd/schema/pb"
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
