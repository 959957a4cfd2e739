package embedded

import "time"

// SnowflakeEpoch is the epoch of bwmarrin/snowflake's default node, in Unix
// milliseconds. msgids are snowflake ids: the time in milliseconds since
// this epoch, shifted left by 22 bits above the node and sequence.
const SnowflakeEpoch = 1288834974657

const snowflakeTimeShift = 22

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
