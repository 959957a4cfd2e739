package cassandra

import (
	"github.com/imd-dev/imd/das"
	"math"
	"time"
)

// Values are stored bit for bit: uint32 account systems and appcodes as
// CQL int, uint64 uids and msgids as bigint. Partition keys only need
// equality, so the sign does not matter there; msgids are clustering keys
// and must sort, which bigint does for every snowflake id (they stay below
// 2^63 until 2080). PutC2C refuses a msgid above math.MaxInt64.
func i32(v uint32) int32 { return int32(v) }
func i64(v uint64) int64 { return int64(v) }

// bucketWidth is the time span of one timeline partition. A busy user's
// week is tens of thousands of small rows, far below the partition sizes
// Cassandra handles well; a quiet user's history spans few buckets, and
// timeline_buckets lists the non-empty ones. It is part of the stored data
// layout: changing it needs a new table.
const bucketWidth = 7 * 24 * time.Hour

// bucketOf returns the timeline bucket of a msgid: weeks since the
// snowflake epoch.
func bucketOf(msgid uint64) int32 {
	return int32((das.MsgTime(msgid).UnixMilli() - das.SnowflakeEpoch) / bucketWidth.Milliseconds())
}

// bucketEnd returns the time after the last msgid of bucket b.
func bucketEnd(b int32) time.Time {
	return time.UnixMilli(das.SnowflakeEpoch + (int64(b)+1)*bucketWidth.Milliseconds())
}

// ttlSeconds returns the TTL that makes a row expire at expiry, seen at
// now: 0 (no TTL) when maxAge is 0, and -1 when the row has expired
// already and must not be written. Cassandra counts a TTL from the write,
// so a message re-applied later still expires at the same instant.
func ttlSeconds(maxAge time.Duration, born, now time.Time) int {
	if maxAge <= 0 {
		return 0
	}
	left := born.Add(maxAge).Sub(now)
	if left <= 0 {
		return -1
	}
	const maxTTL = 630720000 // Cassandra's limit: 20 years
	return int(min(math.Ceil(left.Seconds()), maxTTL))
}

// Statements. gocql prepares each one on first use on each connection and
// keeps the prepared ids in its cache; values are always bound, never
// formatted into the text. Every statement except the idempotency claim
// (an LWT) is idempotent, and only those are marked so and retried.
const (
	stmtInsertInbox = `INSERT INTO inbox (account, uid, appcode, msgid, msg, late) VALUES (?, ?, ?, ?, ?, ?)`
	stmtInsertLate  = `INSERT INTO inbox_meta (account, uid, appcode, late) VALUES (?, ?, ?, ?)`
	stmtInsertTL    = `INSERT INTO timeline (account, uid, bucket, msgid, msg) VALUES (?, ?, ?, ?, ?) USING TTL ?`
	stmtInsertTLB   = `INSERT INTO timeline_buckets (account, uid, bucket) VALUES (?, ?, ?) USING TTL ?`
	stmtInsertConv  = `INSERT INTO conversation (account, uid, peer_account, peer_uid, msgid) VALUES (?, ?, ?, ?, ?) USING TTL ?`
	stmtClaim       = `INSERT INTO idempotency (account, uid, appcode, client_msg_id, msgid, msg, inbox, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?`
	stmtClaimMsgid  = `SELECT msgid FROM idempotency WHERE account = ? AND uid = ? AND appcode = ? AND client_msg_id = ?`

	stmtMeta       = `SELECT floor, late FROM inbox_meta WHERE account = ? AND uid = ? AND appcode = ? LIMIT 1`
	stmtSetFloor   = `UPDATE inbox_meta SET floor = ? WHERE account = ? AND uid = ? AND appcode = ?`
	stmtDeleteLate = `DELETE FROM inbox_meta USING TIMESTAMP ? WHERE account = ? AND uid = ? AND appcode = ? AND late = ?`

	stmtInboxCount = `SELECT COUNT(msgid), MIN(msgid) FROM inbox WHERE account = ? AND uid = ? AND appcode = ? AND msgid >= ?`
	stmtInboxPage  = `SELECT msgid, msg FROM inbox WHERE account = ? AND uid = ? AND appcode = ? AND msgid >= ? LIMIT ?`
	stmtInboxFirst = `SELECT msgid FROM inbox WHERE account = ? AND uid = ? AND appcode = ? AND msgid >= ? AND msgid < ? LIMIT 1`
	stmtInboxOne   = `SELECT msgid FROM inbox WHERE account = ? AND uid = ? AND appcode = ? AND msgid = ?`
	stmtInboxAcked = `SELECT msgid, msg, late, WRITETIME(msg) FROM inbox WHERE account = ? AND uid = ? AND appcode = ? AND msgid IN ?`
	stmtDeleteRow  = `DELETE FROM inbox USING TIMESTAMP ? WHERE account = ? AND uid = ? AND appcode = ? AND msgid = ?`

	stmtBuckets  = `SELECT bucket FROM timeline_buckets WHERE account = ? AND uid = ? AND bucket >= ?`
	stmtTLPage   = `SELECT msgid, msg FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid >= ? LIMIT ?`
	stmtTLIn     = `SELECT msgid, msg FROM timeline WHERE account = ? AND uid = ? AND bucket = ? AND msgid IN ?`
	stmtConvPage = `SELECT msgid FROM conversation WHERE account = ? AND uid = ? AND peer_account = ? AND peer_uid = ? AND msgid >= ? LIMIT ?`
)
