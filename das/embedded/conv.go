package embedded

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

var _ das.ConvStore = (*Store)(nil)

// Conversations implements das.ConvStore. The summaries are read from the
// conversation index (keys.go): the peers under u's prefix, one seek to
// the last row of each peer's range for the newest message, one seek past
// it to the next peer. The index, the messages and the read marks are read
// from one snapshot, so a summary is what one instant held. The order is
// the key order of the peers (account system, then uid).
func (s *Store) Conversations(ctx context.Context, u das.User, withUnread func(das.ConvSummary) bool) ([]das.ConvSummary, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	snap := s.db.NewSnapshot()
	defer snap.Close()

	p := timelinePrefix(u) // the tag is replaced: every c key of u
	p[0] = tagConv
	it, err := snap.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return nil, unavailable("conversations", err)
	}
	var out []das.ConvSummary
	for valid := it.First(); valid; {
		if len(out)%64 == 63 && ctx.Err() != nil {
			_ = it.Close()
			return nil, ctx.Err()
		}
		k := it.Key()
		if len(k) != convKeyLen {
			s.log.Error("malformed conversation row", "key", k)
			valid = it.Next()
			continue
		}
		peer := decodeUser(k[1+userLen:])
		end := prefixEnd(convPrefix(u, peer))
		if !it.SeekLT(end) {
			break // cannot happen: the row just read is below end
		}
		out = append(out, das.ConvSummary{Peer: peer, Last: &pb.C2CMessage{Msgid: lastMsgid(it.Key())}, Unread: -1})
		valid = it.SeekGE(end)
	}
	if err := closeIter(it); err != nil {
		return nil, unavailable("conversations", err)
	}

	for i := range out {
		c := &out[i]
		if i%64 == 63 && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		id := c.Last.Msgid
		m, err := s.readMessage(snap, id)
		if err != nil {
			return nil, fmt.Errorf("conversations: %w", err)
		}
		if m != nil {
			c.Last = m
		} else {
			// The row and its message are one batch, and the
			// collector keeps a message while its timeline row (deleted
			// with the c row) exists: an invariant is broken. Keep the
			// conversation, with a message that has only its msgid,
			// rather than drop it from the list.
			s.log.Error("conversation row without message", "op", "conversations", "msgid", id, "logid", das.LogID(ctx))
		}
		if c.Read, err = readUint64(snap, convReadKey(u, c.Peer)); err != nil {
			return nil, unavailable("conversations", err)
		}
		if withUnread != nil && !withUnread(*c) {
			continue
		}
		if c.Unread, err = s.unread(snap, u, c.Peer, c.Read); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// unread counts the rows of u's conversation with peer above mark that
// did not come from u, up to das.MaxUnread. Rows without a direction
// (written before it was stored) count. A note to oneself is never unread.
func (s *Store) unread(r pebble.Reader, u, peer das.User, mark uint64) (int, error) {
	if u == peer {
		return 0, nil
	}
	p := convPrefix(u, peer)
	lower, ok := afterBound(p, mark)
	if !ok {
		return 0, nil
	}
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(p)})
	if err != nil {
		return 0, unavailable("conversations: unread", err)
	}
	n := 0
	for valid := it.First(); valid && n < das.MaxUnread; valid = it.Next() {
		if v := it.Value(); len(v) == 0 || v[0] != convOutgoing {
			n++
		}
	}
	if err := closeIter(it); err != nil {
		return 0, unavailable("conversations: unread", err)
	}
	return n, nil
}

// MarkRead implements das.ConvStore. upTo above das.MaxMsgid is
// ErrInvalid. The mark is kept whether or not the conversation has
// messages, and retention does not remove it (8 bytes per conversation
// the user ever marked).
func (s *Store) MarkRead(ctx context.Context, u, peer das.User, upTo uint64) (uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, err
	}
	defer s.gate.Exit()
	if upTo > das.MaxMsgid {
		return 0, fmt.Errorf("%w: read mark %d above the largest msgid", ErrInvalid, upTo)
	}
	return s.markForward(convReadKey(u, peer), upTo, "mark read")
}

// GroupReads implements das.ConvStore: one point lookup per group, from
// one snapshot.
func (s *Store) GroupReads(ctx context.Context, u das.User, ids []uint64) ([]uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return nil, err
	}
	defer s.gate.Exit()
	snap := s.db.NewSnapshot()
	defer snap.Close()
	out := make([]uint64, len(ids))
	for i, id := range ids {
		v, err := readUint64(snap, groupReadKey(u, id))
		if err != nil {
			return nil, unavailable("group reads", err)
		}
		out[i] = v
	}
	return out, nil
}

// MarkGroupRead implements das.ConvStore. seq above math.MaxInt64 is
// ErrInvalid (the Cassandra engine stores seqs as signed integers).
func (s *Store) MarkGroupRead(ctx context.Context, u das.User, id uint64, seq uint64) (uint64, error) {
	if err := s.gate.Enter(ctx); err != nil {
		return 0, err
	}
	defer s.gate.Exit()
	if seq > das.MaxMsgid {
		return 0, fmt.Errorf("%w: group read seq %d above 2^63-1", ErrInvalid, seq)
	}
	return s.markForward(groupReadKey(u, id), seq, "mark group read")
}

// markForward raises the mark at k to v unless it is there or beyond, and
// returns the mark now. The read and the synced commit run under one of
// the ackLocks, striped by k: the stripes serialise short read-compare-
// write steps, and a caller holds one at a time (Ack takes its terminal's
// and no other), so sharing them cannot deadlock.
func (s *Store) markForward(k []byte, v uint64, op string) (uint64, error) {
	mu := &s.ackLocks[s.stripe(k)]
	mu.Lock()
	defer mu.Unlock()
	cur, err := readUint64(s.db, k)
	if err != nil {
		return 0, unavailable(op, err)
	}
	if v <= cur {
		return cur, nil
	}
	if err := s.db.Set(k, binary.BigEndian.AppendUint64(nil, v), pebble.Sync); err != nil {
		return 0, unavailable(op, err)
	}
	return v, nil
}

// readUint64 returns the 8-byte big-endian value at k, 0 if there is none
// (or if it is malformed).
func readUint64(r pebble.Reader, k []byte) (uint64, error) {
	v, closer, err := r.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer closer.Close()
	if len(v) != 8 {
		return 0, nil
	}
	return binary.BigEndian.Uint64(v), nil
}
