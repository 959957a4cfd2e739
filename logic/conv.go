package logic

import (
	"context"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// The conversation list (PROTOCOL.md, "Conversation list, read marks,
// presence and transient messages"): one request returns what changed
// since the versions the client holds. A one-to-one conversation's
// version is its newest msgid (the summary PutC2C keeps), a group's its
// head seq as far as the member may see; the read mark is the user's,
// shared by its terminals.

// convKey identifies a conversation in a map: a peer or a group.
type convKey struct {
	account uint32
	uid     uint64
	group   uint64
}

func keyOf(k *pb.ConvKey) convKey {
	if k.GetGroupId() != 0 {
		return convKey{group: k.GroupId}
	}
	return convKey{account: k.GetPeer().GetAccount(), uid: k.GetPeer().GetUid()}
}

func (s *Service) needConv() error {
	if s.conv == nil {
		return schema.Errorf(schema.StatusUnavailable, "this server has no conversation store")
	}
	return nil
}

func (s *Service) convSync(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needConv(); err != nil {
		return nil, err
	}
	var req pb.ConvSyncRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	if len(req.Known) > s.c2c.MaxConversations {
		return nil, schema.Errorf(schema.StatusBadArgument, "%d conversations held, over the maximum of %d", len(req.Known), s.c2c.MaxConversations)
	}
	known := make(map[convKey]*pb.ConvVersion, len(req.Known))
	for _, v := range req.Known {
		known[keyOf(v.GetKey())] = v
	}
	changed := func(k convKey, version, read uint64) bool {
		v := known[k]
		return v == nil || v.Version != version || v.Read != read
	}
	u := das.User{Account: sess.Account, UID: sess.UID}
	resp := &pb.ConvSyncResponse{}
	seen := make(map[convKey]bool, len(known))

	sums, err := s.conv.Conversations(ctx, u, func(cs das.ConvSummary) bool {
		return changed(convKey{account: cs.Peer.Account, uid: cs.Peer.UID}, cs.Last.GetMsgid(), cs.Read)
	})
	if err != nil {
		return nil, storeErr("conversations", err)
	}
	for _, cs := range sums {
		k := convKey{account: cs.Peer.Account, uid: cs.Peer.UID}
		seen[k] = true
		if !changed(k, cs.Last.GetMsgid(), cs.Read) {
			continue
		}
		resp.Changed = append(resp.Changed, &pb.Conversation{
			Key:     &pb.ConvKey{Peer: &pb.User{Account: cs.Peer.Account, Uid: cs.Peer.UID}},
			Version: cs.Last.GetMsgid(), Read: cs.Read, Unread: uint32(max(cs.Unread, 0)), Last: cs.Last,
		})
	}

	if s.groups != nil {
		ms, err := s.groups.UserGroups(ctx, u)
		if err != nil {
			return nil, groupErr("conversations", err)
		}
		ids := make([]uint64, len(ms))
		for i, m := range ms {
			ids[i] = m.GroupID
		}
		reads, err := s.conv.GroupReads(ctx, u, ids)
		if err != nil {
			return nil, storeErr("conversations", err)
		}
		for i, m := range ms {
			info, err := s.groups.Group(ctx, m.GroupID)
			if err != nil {
				return nil, groupErr("conversations", err)
			}
			top := visibleHead(m, info.Head)
			// The member's own join event is not news to it.
			read := max(reads[i], m.JoinSeq)
			k := convKey{group: m.GroupID}
			seen[k] = true
			if !changed(k, top, read) {
				continue
			}
			c := &pb.Conversation{Key: &pb.ConvKey{GroupId: m.GroupID}, Version: top, Read: read, Left: m.LeftSeq != 0}
			if top > read {
				c.Unread = uint32(min(top-read, das.MaxUnread))
			}
			if top >= m.JoinSeq {
				last, _, err := s.groups.GroupPage(ctx, m.GroupID, top-1, top, 1)
				if err != nil {
					return nil, groupErr("conversations", err)
				}
				if len(last) == 1 {
					c.Last = last[0]
				}
			}
			resp.Changed = append(resp.Changed, c)
		}
	}
	for _, v := range req.Known {
		if k := keyOf(v.GetKey()); !seen[k] {
			resp.Gone = append(resp.Gone, v.GetKey())
			seen[k] = true // listed twice by the client: gone once
		}
	}
	resp.Total = uint32(len(sums))
	if s.groups != nil {
		resp.Total = uint32(len(seen) - len(resp.Gone))
	}
	s.mConvSyncs.Inc()
	s.mConvChanged.Add(float64(len(resp.Changed)))
	return proto.Marshal(resp)
}

func (s *Service) convRead(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needConv(); err != nil {
		return nil, err
	}
	var req pb.ConvReadRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	u := das.User{Account: sess.Account, UID: sess.UID}
	key := req.GetKey()
	var mark uint64
	var err error
	switch {
	case key.GetGroupId() != 0:
		if err := s.needGroups(); err != nil {
			return nil, err
		}
		m, err := s.membership(ctx, u, key.GroupId)
		if err != nil {
			return nil, err
		}
		info, err := s.groups.Group(ctx, key.GroupId)
		if err != nil {
			return nil, groupErr("read mark", err)
		}
		if mark, err = s.conv.MarkGroupRead(ctx, u, key.GroupId, min(req.UpTo, visibleHead(m, info.Head))); err != nil {
			return nil, storeErr("read mark", err)
		}
	case key.GetPeer().GetUid() != 0 && key.GetPeer().GetAccount() != 0:
		peer := userOf(key.Peer)
		if mark, err = s.conv.MarkRead(ctx, u, peer, req.UpTo); err != nil {
			return nil, storeErr("read mark", err)
		}
		// The peer learns that its messages were read (a read receipt).
		if peer != u {
			rb, _ := proto.Marshal(&pb.ConvRead{Key: &pb.ConvKey{Peer: &pb.User{Account: u.Account, Uid: u.UID}}, By: &pb.User{Account: u.Account, Uid: u.UID}, UpTo: mark, AtMs: time.Now().UnixMilli()})
			s.pushUser(ctx, peer, nil, schema.CmdConvMark, 0, rb, h.LogID)
		}
	default:
		return nil, schema.Errorf(schema.StatusBadRecipient, "a read mark names a peer (account and uid > 0) or a group")
	}
	// The user's other terminals lower their unread count at once.
	mb, _ := proto.Marshal(&pb.ConvRead{Key: key, By: &pb.User{Account: u.Account, Uid: u.UID}, UpTo: mark, AtMs: time.Now().UnixMilli()})
	s.pushUser(ctx, u, &sess, schema.CmdConvMark, 0, mb, h.LogID)
	return proto.Marshal(&pb.ConvReadResponse{Read: mark})
}
