package embedded

import (
	"encoding/binary"
	"math"

	"github.com/imd-dev/imd/das"
)

// Key layout. Every key starts with a one-byte table tag; integers are
// big-endian so that Pebble's bytewise order is numeric order and a prefix
// scan of an index returns msgids oldest first (snowflake ids grow with
// time). The tables mirror the Cassandra ones (partition key, then the
// clustering msgid):
//
//	m | msgid                                   -> header + pb.C2CMessage   (message, stored once)
//	i | account | uid | appcode | msgid         -> ""                       (inbox of one terminal)
//	t | account | uid | msgid                   -> peer account | peer uid  (timeline of one user)
//	c | account | uid | peer acct | peer uid | msgid -> direction          (conversation index)
//	e | account | uid | peer acct | peer uid    -> read mark (msgid)        (conversation read mark)
//	k | account | uid | appcode | client_msg_id -> msgid | stored ms        (idempotency key)
//	x | stored ms | k-key                       -> ""                       (idempotency expiry queue)
//	g | msgid | event                           -> ""                       (collection candidate)
//
// Groups (see group.go) have tables of their own:
//
//	h | group                                   -> head | member seq | members | flags  (group state)
//	n | group | seq                             -> msgid | pb.C2CMessage    (group message, stored once)
//	p | group | account | uid                   -> join seq                 (current members)
//	u | account | uid | group                   -> join seq | left seq      (a user's memberships)
//	r | account | uid | group | appcode         -> seq                      (a terminal's group cursor)
//	q | account | uid | appcode | client_msg_id -> msgid | stored ms | group | seq  (group idempotency key)
//	w | account | uid | group                   -> read seq                 (a user's group read mark)
//
// Group idempotency keys share the x queue (and so the janitor's expiry)
// with the c2c ones; their own tag keeps a client id of a c2c send from
// answering a group send. Cursors are clustered by user and group rather
// than by terminal, so that ForgetGroup drops every terminal's cursor of a
// group with one range deletion; GroupCursors reads them by point lookups
// either way.
// The message body is stored once, in the m table, and every index row
// points to it by msgid. A message to a user with two terminals would
// otherwise be written five times (two timelines, three inboxes... ) and
// every copy goes through the WAL, the memtable and each compaction level;
// with one copy the index rows stay a few dozen bytes. The price is one
// point lookup per message on reads (the index and the message are read
// from one snapshot, so they are consistent) and a collector: an Ack or a
// retention delete cannot know cheaply whether it removed the last
// reference, so it drops a g row and the janitor deletes the message once
// nothing points to it (see janitor.go).
//
// History(peer) reads the c table, a second index per conversation, rather
// than filtering the timeline by the peer stored in its value: a support
// agent or merchant talks to thousands of peers, and filtering would scan
// the whole timeline to fill one page of one conversation. The c rows cost
// about 40 bytes per participant per message and are written in the same
// batch, so both indexes are always equal.
//
// The conversation list (das.ConvStore, conv.go) is read from the c table
// too: a user's conversations are the peers under the user's c prefix, and
// each one's newest message is the last row of its range, so there is no
// summary to keep up to date: the c rows are written in the message's
// batch, concurrent PutC2C calls of one conversation cannot leave an older
// message as the newest, and retention, which deletes timeline and c rows
// together, removes a conversation from the list with its last message.
// Each c row's value says whether the message came from the peer, for
// unread counts: convOutgoing on the sender's row (and on the only row of
// a note to oneself), convIncoming on the recipient's. Rows written before
// the direction existed have an empty value: unknown, counted as unread
// when they are above the read mark.
const (
	tagMessage   = 'm'
	tagInbox     = 'i'
	tagTimeline  = 't'
	tagConv      = 'c'
	tagIdem      = 'k' // the logical idempotency key (idemKey); stored under tagIdemEpoch, or as is by stores of before
	tagIdemQueue = 'x' // the expiry queue of those stores of before (idemQueueKey)
	tagIdemEpoch = 'y' // idempotency keys by storage epoch (idemEpochKey)
	tagMeta      = 'z' // the store's own settings
	tagGC        = 'g'

	tagGroup       = 'h'
	tagGroupMsg    = 'n'
	tagGroupMember = 'p'
	tagUserGroup   = 'u'
	tagGroupCursor = 'r'
	tagGroupIdem   = 'q'

	tagConvRead  = 'e'
	tagGroupRead = 'w'
)

// Directions of a conversation index row (its value).
const (
	convOutgoing = 1
	convIncoming = 2
)

const (
	userLen     = 4 + 8
	terminalLen = userLen + 4
	inboxKeyLen = 1 + terminalLen + 8
	tlKeyLen    = 1 + userLen + 8
	convKeyLen  = 1 + userLen + userLen + 8
	msgKeyLen   = 1 + 8
	gcKeyLen    = 1 + 8 + 8

	groupKeyLen       = 1 + 8
	groupMsgKeyLen    = 1 + 8 + 8
	groupMemberKeyLen = 1 + 8 + userLen
	userGroupKeyLen   = 1 + userLen + 8
	groupCursorKeyLen = 1 + userLen + 8 + 4
	groupIdemValueLen = 8 + 8 + 8 + 8
)

func appendUser(b []byte, u das.User) []byte {
	b = binary.BigEndian.AppendUint32(b, u.Account)
	return binary.BigEndian.AppendUint64(b, u.UID)
}

func appendTerminal(b []byte, t das.Terminal) []byte {
	b = appendUser(b, t.User())
	return binary.BigEndian.AppendUint32(b, t.AppCode)
}

func msgKey(msgid uint64) []byte {
	b := make([]byte, 0, msgKeyLen)
	b = append(b, tagMessage)
	return binary.BigEndian.AppendUint64(b, msgid)
}

// inboxPrefix is the key prefix of t's inbox.
func inboxPrefix(t das.Terminal) []byte {
	b := make([]byte, 0, inboxKeyLen)
	b = append(b, tagInbox)
	return appendTerminal(b, t)
}

func inboxKey(t das.Terminal, msgid uint64) []byte {
	return binary.BigEndian.AppendUint64(inboxPrefix(t), msgid)
}

func timelinePrefix(u das.User) []byte {
	b := make([]byte, 0, tlKeyLen)
	b = append(b, tagTimeline)
	return appendUser(b, u)
}

func timelineKey(u das.User, msgid uint64) []byte {
	return binary.BigEndian.AppendUint64(timelinePrefix(u), msgid)
}

func convPrefix(u, peer das.User) []byte {
	b := make([]byte, 0, convKeyLen)
	b = append(b, tagConv)
	b = appendUser(b, u)
	return appendUser(b, peer)
}

func convKey(u, peer das.User, msgid uint64) []byte {
	return binary.BigEndian.AppendUint64(convPrefix(u, peer), msgid)
}

// convReadKey is u's read mark of the conversation with peer.
func convReadKey(u, peer das.User) []byte {
	k := convPrefix(u, peer)
	k[0] = tagConvRead
	return k
}

// groupReadKey is u's read mark of group id.
func groupReadKey(u das.User, id uint64) []byte {
	k := userGroupKey(u, id)
	k[0] = tagGroupRead
	return k
}

// idemKey is the idempotency key of a sender terminal and client message
// id. The id is last, so its variable length needs no separator.
func idemKey(t das.Terminal, clientMsgID string) []byte {
	b := make([]byte, 0, 1+terminalLen+len(clientMsgID))
	b = append(b, tagIdem)
	b = appendTerminal(b, t)
	return append(b, clientMsgID...)
}

// idemEpochHead is the tag and epoch that start an idemEpochKey; the
// logical idempotency key (idemKey, groupIdemKey) follows.
const idemEpochHead = 1 + 4

// idemEpochKey is where the idempotency key ik stored in epoch e lives
// (Store.idemEpochMs long; see expireIdempotency). The keys of an epoch
// are contiguous, so the janitor drops an expired epoch with one range
// deletion instead of reading and deleting each key.
func idemEpochKey(e uint32, ik []byte) []byte {
	b := make([]byte, 0, idemEpochHead+len(ik))
	b = append(b, tagIdemEpoch)
	b = binary.BigEndian.AppendUint32(b, e)
	return append(b, ik...)
}

// idemEpochStart is the first key of epoch e.
func idemEpochStart(e uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{tagIdemEpoch}, e)
}

// metaIdemEpoch holds the idempotency epoch's length in ms, fixed when the
// store is created (a key's epoch must not change under it).
var metaIdemEpoch = []byte{tagMeta, 'i', 'd', 'e', 'm', '-', 'e', 'p', 'o', 'c', 'h', '-', 'm', 's'}

// idemQueueHead is the tag and stored time that start an idemQueueKey;
// the idempotency key follows. Stores of before idemEpochKey kept each
// key as is and queued it here for expiry; their keys are still read and
// expired this way until the queue is empty.
const idemQueueHead = 1 + 8

// idemQueueKey orders idempotency keys by the time they were stored, so
// the janitor expires them with one bounded scan instead of reading every
// key.
func idemQueueKey(storedMs uint64, ik []byte) []byte {
	b := make([]byte, 0, idemQueueHead+len(ik))
	b = append(b, tagIdemQueue)
	b = binary.BigEndian.AppendUint64(b, storedMs)
	return append(b, ik...)
}

// gcKey marks msgid as possibly unreferenced. The event suffix makes every
// mark a distinct key, so the collector deletes exactly the marks it read
// and never one that a concurrent Ack added after its reference check.
func gcKey(msgid, event uint64) []byte {
	b := make([]byte, 0, gcKeyLen)
	b = append(b, tagGC)
	b = binary.BigEndian.AppendUint64(b, msgid)
	return binary.BigEndian.AppendUint64(b, event)
}

func groupKey(id uint64) []byte {
	b := make([]byte, 0, groupKeyLen)
	b = append(b, tagGroup)
	return binary.BigEndian.AppendUint64(b, id)
}

func groupMsgPrefix(id uint64) []byte {
	b := make([]byte, 0, groupMsgKeyLen)
	b = append(b, tagGroupMsg)
	return binary.BigEndian.AppendUint64(b, id)
}

func groupMsgKey(id, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(groupMsgPrefix(id), seq)
}

func groupMemberPrefix(id uint64) []byte {
	b := make([]byte, 0, groupMemberKeyLen)
	b = append(b, tagGroupMember)
	return binary.BigEndian.AppendUint64(b, id)
}

func groupMemberKey(id uint64, u das.User) []byte {
	return appendUser(groupMemberPrefix(id), u)
}

func userGroupPrefix(u das.User) []byte {
	b := make([]byte, 0, userGroupKeyLen)
	b = append(b, tagUserGroup)
	return appendUser(b, u)
}

func userGroupKey(u das.User, id uint64) []byte {
	return binary.BigEndian.AppendUint64(userGroupPrefix(u), id)
}

// groupCursorPrefix is the prefix of the cursors of every terminal of u
// in group id.
func groupCursorPrefix(u das.User, id uint64) []byte {
	b := make([]byte, 0, groupCursorKeyLen)
	b = append(b, tagGroupCursor)
	b = appendUser(b, u)
	return binary.BigEndian.AppendUint64(b, id)
}

func groupCursorKey(t das.Terminal, id uint64) []byte {
	return binary.BigEndian.AppendUint32(groupCursorPrefix(t.User(), id), t.AppCode)
}

// groupIdemKey is the idempotency key of a group message: the sender
// terminal and client message id, as idemKey, under its own tag.
func groupIdemKey(t das.Terminal, clientMsgID string) []byte {
	k := idemKey(t, clientMsgID)
	k[0] = tagGroupIdem
	return k
}

// Group state (the h value): the newest seq, the seq of the last
// membership change, the number of members and flags.
type groupMeta struct {
	head, memberSeq uint64
	members         uint32
	dissolved       bool
}

const (
	groupMetaLen       = 8 + 8 + 4 + 1
	groupFlagDissolved = 1
)

func (g groupMeta) encode() []byte {
	b := make([]byte, 0, groupMetaLen)
	b = binary.BigEndian.AppendUint64(b, g.head)
	b = binary.BigEndian.AppendUint64(b, g.memberSeq)
	b = binary.BigEndian.AppendUint32(b, g.members)
	var flags byte
	if g.dissolved {
		flags |= groupFlagDissolved
	}
	return append(b, flags)
}

func decodeGroupMeta(v []byte) (groupMeta, bool) {
	if len(v) != groupMetaLen {
		return groupMeta{}, false
	}
	return groupMeta{
		head:      binary.BigEndian.Uint64(v),
		memberSeq: binary.BigEndian.Uint64(v[8:]),
		members:   binary.BigEndian.Uint32(v[16:]),
		dissolved: v[20]&groupFlagDissolved != 0,
	}, true
}

// A group message value starts with the msgid, so that the janitor can
// tell a message's age without unmarshalling it.
func encodeGroupMsgValue(msgid uint64, body []byte) []byte {
	b := make([]byte, 0, 8+len(body))
	b = binary.BigEndian.AppendUint64(b, msgid)
	return append(b, body...)
}

func decodeGroupMsgValue(v []byte) (msgid uint64, body []byte, ok bool) {
	if len(v) < 8 {
		return 0, nil, false
	}
	return binary.BigEndian.Uint64(v), v[8:], true
}

func encodeMembership(join, left uint64) []byte {
	b := make([]byte, 0, 16)
	b = binary.BigEndian.AppendUint64(b, join)
	return binary.BigEndian.AppendUint64(b, left)
}

func decodeMembership(v []byte) (join, left uint64, ok bool) {
	if len(v) != 16 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:]), true
}

// encodeGroupIdemValue extends the idempotency value (msgid | stored ms)
// with the group and seq of the message; decodeIdemValue reads its first
// two fields, so the janitor expires both kinds alike.
func encodeGroupIdemValue(msgid, storedMs, group, seq uint64) []byte {
	b := make([]byte, 0, groupIdemValueLen)
	b = binary.BigEndian.AppendUint64(b, msgid)
	b = binary.BigEndian.AppendUint64(b, storedMs)
	b = binary.BigEndian.AppendUint64(b, group)
	return binary.BigEndian.AppendUint64(b, seq)
}

func decodeGroupIdemValue(v []byte) (msgid, storedMs, group, seq uint64, ok bool) {
	if len(v) != groupIdemValueLen {
		return 0, 0, 0, 0, false
	}
	return binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:]),
		binary.BigEndian.Uint64(v[16:]), binary.BigEndian.Uint64(v[24:]), true
}

func encodeIdemValue(msgid, storedMs uint64) []byte {
	b := make([]byte, 0, 16)
	b = binary.BigEndian.AppendUint64(b, msgid)
	return binary.BigEndian.AppendUint64(b, storedMs)
}

// decodeIdemValue reads a c2c idempotency value, or the first two fields
// of a group one.
func decodeIdemValue(v []byte) (msgid, storedMs uint64, ok bool) {
	if len(v) != 16 && len(v) != groupIdemValueLen {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:]), true
}

func encodePeer(p das.User) []byte { return appendUser(make([]byte, 0, userLen), p) }

func decodeUser(b []byte) das.User {
	return das.User{Account: binary.BigEndian.Uint32(b), UID: binary.BigEndian.Uint64(b[4:])}
}

// lastMsgid reads the msgid at the end of an index key.
func lastMsgid(key []byte) uint64 { return binary.BigEndian.Uint64(key[len(key)-8:]) }

// prefixEnd returns the smallest key greater than every key with prefix p.
// Every prefix here starts with a tag byte below 0xff, so one exists.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	panic("das/embedded: no prefix end")
}

// afterBound returns the lower bound for msgids strictly greater than
// after within prefix p, and false when none can exist.
func afterBound(p []byte, after uint64) ([]byte, bool) {
	if after == math.MaxUint64 {
		return nil, false
	}
	return binary.BigEndian.AppendUint64(append([]byte(nil), p...), after+1), true
}

// Message values carry, before the marshalled pb.C2CMessage, the appcodes
// whose inboxes received the message, so that the collector can find every
// row that may point to it without a scan: the recipient's, then the
// sender's other terminals' (multi-device):
//
//	version (1) | uvarint n | n × appcode (4) | pb.C2CMessage
//	version (3) | uvarint n | n × appcode (4) | uvarint k | k × appcode (4) | pb.C2CMessage
//
// Version 1 (no sender terminals) is still read; new messages without
// sender terminals are written as version 1 too.
const (
	msgValueVersion     = 1
	msgValueWithSenders = 3
)

func encodeMessageValue(appcodes, senderAppcodes []uint32, body []byte) []byte {
	b := make([]byte, 0, 2+2*binary.MaxVarintLen32+4*(len(appcodes)+len(senderAppcodes))+len(body))
	if len(senderAppcodes) == 0 {
		b = append(b, msgValueVersion)
	} else {
		b = append(b, msgValueWithSenders)
	}
	b = binary.AppendUvarint(b, uint64(len(appcodes)))
	for _, a := range appcodes {
		b = binary.BigEndian.AppendUint32(b, a)
	}
	if len(senderAppcodes) > 0 {
		b = binary.AppendUvarint(b, uint64(len(senderAppcodes)))
		for _, a := range senderAppcodes {
			b = binary.BigEndian.AppendUint32(b, a)
		}
	}
	return append(b, body...)
}

// msgValueInbox marks the value of a message stored by PutInbox: it lists
// its terminals (account, uid, appcode: 16 bytes each) instead of the
// appcodes of one recipient, and it is on no timeline.
const msgValueInbox = 2

func encodeInboxMessageValue(ts []das.Terminal, body []byte) []byte {
	b := make([]byte, 0, 1+binary.MaxVarintLen32+terminalLen*len(ts)+len(body))
	b = append(b, msgValueInbox)
	b = binary.AppendUvarint(b, uint64(len(ts)))
	for _, t := range ts {
		b = binary.BigEndian.AppendUint32(b, t.Account)
		b = binary.BigEndian.AppendUint64(b, t.UID)
		b = binary.BigEndian.AppendUint32(b, t.AppCode)
	}
	return append(b, body...)
}

// decodeInboxTerminals returns the terminals of a PutInbox message value.
func decodeInboxTerminals(v []byte) ([]das.Terminal, bool) {
	if len(v) < 2 || v[0] != msgValueInbox {
		return nil, false
	}
	n, w := binary.Uvarint(v[1:])
	if w <= 0 || n == 0 || n > uint64(len(v)) || 1+w+terminalLen*int(n) > len(v) {
		return nil, false
	}
	ts := make([]das.Terminal, n)
	p := v[1+w:]
	for i := range ts {
		ts[i] = das.Terminal{
			Account: binary.BigEndian.Uint32(p),
			UID:     binary.BigEndian.Uint64(p[4:]),
			AppCode: binary.BigEndian.Uint32(p[12:]),
		}
		p = p[terminalLen:]
	}
	return ts, true
}

// decodeMessageValue splits a message value into its inbox appcodes (the
// recipient's, then the sender's) and the marshalled message. The appcode
// slices alias v. For a PutInbox value both are nil (see
// decodeInboxTerminals).
func decodeMessageValue(v []byte) (appcodes, senderAppcodes []byte, body []byte, ok bool) {
	if len(v) >= 2 && v[0] == msgValueInbox {
		n, w := binary.Uvarint(v[1:])
		if w <= 0 || n == 0 || n > uint64(len(v)) || 1+w+terminalLen*int(n) > len(v) {
			return nil, nil, nil, false
		}
		return nil, nil, v[1+w+terminalLen*int(n):], true
	}
	if len(v) < 2 || (v[0] != msgValueVersion && v[0] != msgValueWithSenders) {
		return nil, nil, nil, false
	}
	list := func(p []byte) (codes, rest []byte, ok bool) {
		n, w := binary.Uvarint(p)
		if w <= 0 || n > uint64(len(p)) {
			return nil, nil, false
		}
		end := w + 4*int(n)
		if end > len(p) {
			return nil, nil, false
		}
		return p[w:end], p[end:], true
	}
	appcodes, rest, ok := list(v[1:])
	if !ok {
		return nil, nil, nil, false
	}
	if v[0] == msgValueWithSenders {
		if senderAppcodes, rest, ok = list(rest); !ok {
			return nil, nil, nil, false
		}
	}
	return appcodes, senderAppcodes, rest, true
}
