package logic

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Groups configures group chat.
type Groups struct {
	// MaxSize bounds a group's members. Default 10,000.
	MaxSize int `yaml:"max_size"`
	// CacheEntries bounds the members cache (member entries over every
	// cached group). Default das.DefaultGroupCacheEntries.
	CacheEntries int `yaml:"cache_entries"`
}

func (g *Groups) setDefaults() {
	if g.MaxSize <= 0 {
		g.MaxSize = 10000
	}
}

// groupErr maps a group store error to a status.
func groupErr(op string, err error) error {
	switch {
	case errors.Is(err, das.ErrGroupUnknown):
		return schema.Errorf(schema.StatusUnknownGroup, "%s: the group does not exist or was dissolved", op)
	case errors.Is(err, das.ErrNotMember):
		return schema.Errorf(schema.StatusNotMember, "%s: not a member of the group", op)
	case errors.Is(err, das.ErrGroupFull):
		return schema.Errorf(schema.StatusGroupFull, "%s: the group is at its maximum size", op)
	case errors.Is(err, das.ErrGroupExists):
		return schema.Errorf(schema.StatusGroupExists, "%s: a group with that id exists", op)
	}
	return storeErr(op, err)
}

func (s *Service) needGroups() error {
	if s.groups == nil {
		return schema.Errorf(schema.StatusUnavailable, "this server has no group store")
	}
	return nil
}

// groupSend stores a group message (the seq is the group's order) and
// notifies the online terminals of its members and the sender's other
// terminals, one internal message per gateway. Validation of the common
// fields is c2cSend's.
func (s *Service) groupSend(ctx context.Context, sess router.Session, h *schema.Header, req *pb.C2CSendRequest) ([]byte, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	if err := s.limits.allowSend(das.User{Account: sess.Account, UID: sess.UID}); err != nil {
		return nil, err
	}
	id, err := s.newID(req.AfterMsgid, h.LogID)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	m := &pb.C2CMessage{
		Msgid:       id,
		From:        &pb.User{Account: sess.Account, Uid: sess.UID},
		FromAppcode: sess.AppCode,
		To:          &pb.User{},
		Msgtype:     h.MsgType,
		Content:     req.Content,
		SentAtMs:    now.UnixMilli(),
		ClientMsgId: req.ClientMsgId,
		GroupId:     req.GroupId,
		Logid:       h.LogID,
	}
	ap, err := s.groups.AppendGroup(das.WithLogID(ctx, h.LogID), m)
	if err != nil {
		s.mGroup.WithLabelValues("refused").Inc()
		s.log.Info("group send refused", "group", req.GroupId, "uid", sess.UID, "appcode", sess.AppCode, "err", err, "logid", h.LogID)
		return nil, groupErr("group send", err)
	}
	if ap.Dup {
		s.mGroup.WithLabelValues("duplicate").Inc()
	} else {
		s.mGroup.WithLabelValues("stored").Inc()
	}
	m.Seq, m.Msgid = ap.Seq, ap.Msgid
	// Notify before answering, as for c2c: the sender's next message
	// cannot overtake this one on any connection.
	n := s.fanOutGroup(ctx, m, ap.MemberSeq, &sess, nil, h.LogID)
	if s.conv != nil {
		// What a member wrote is read by it: its own messages never count
		// as unread on its other terminals.
		if _, err := s.conv.MarkGroupRead(ctx, das.User{Account: sess.Account, UID: sess.UID}, m.GroupId, m.Seq); err != nil {
			s.log.Warn("group read mark of the sender", "group", m.GroupId, "seq", m.Seq, "err", err, "logid", h.LogID)
		}
	}
	s.log.Debug("group stored", "group", m.GroupId, "seq", m.Seq, "msgid", m.Msgid, "dup", ap.Dup, "uid", sess.UID, "notified", n, "logid", h.LogID)
	return proto.Marshal(&pb.C2CSendResponse{Msgid: m.Msgid, Seq: m.Seq, StoredAtMs: now.UnixMilli(), Duplicate: ap.Dup})
}

// fanOutGroup pushes m to every online session of the members who may see
// it (joined at or before m.Seq) and of extra users (removed members, who
// see their own removal), except the sending terminal of skip. The members
// come from the cache at version memberSeq or newer. It returns how many
// sessions took the notify.
func (s *Service) fanOutGroup(ctx context.Context, m *pb.C2CMessage, memberSeq uint64, skip *router.Session, extra []das.User, logid uint64) int {
	members, _, err := s.groupCache.Members(ctx, m.GroupId, memberSeq)
	if err != nil {
		// Stored already: members catch up from their cursors.
		s.log.Warn("group fan-out: members", "group", m.GroupId, "seq", m.Seq, "err", err, "logid", logid)
		return 0
	}
	s.groupCache.SawSeq(m.GroupId, m.Seq)
	users := make([]router.User, 0, len(members)+len(extra))
	for _, mb := range members {
		if mb.JoinSeq <= m.Seq {
			users = append(users, router.User{Account: mb.User.Account, UID: mb.User.UID})
		}
	}
	for _, u := range extra {
		users = append(users, router.User{Account: u.Account, UID: u.UID})
	}
	if len(users) == 0 {
		return 0
	}
	sessions, err := s.router.LookupMany(ctx, users)
	if err != nil {
		s.log.Warn("group fan-out: router", "group", m.GroupId, "seq", m.Seq, "err", err, "logid", logid)
		return 0
	}
	targets := otherTerminals(sessions, skip)
	if len(targets) == 0 {
		return 0
	}
	body, _ := proto.Marshal(&pb.GroupNotify{GroupId: m.GroupId, Messages: []*pb.C2CMessage{m}})
	n := s.pushCount(ctx, targets, schema.CmdGroupNotify, m.Msgtype, body, logid)
	s.mGroupNotifies.Add(float64(n))
	return n
}

// membership returns u's membership of group id, or StatusNotMember.
func (s *Service) membership(ctx context.Context, u das.User, id uint64) (das.Membership, error) {
	ms, err := s.groups.UserGroups(ctx, u)
	if err != nil {
		return das.Membership{}, groupErr("group membership", err)
	}
	for _, m := range ms {
		if m.GroupID == id {
			return m, nil
		}
	}
	return das.Membership{}, schema.Errorf(schema.StatusNotMember, "not a member of group %d", id)
}

// visibleHead is the last seq a member may see: its removal, or the head.
func visibleHead(m das.Membership, head uint64) uint64 {
	if m.LeftSeq != 0 && m.LeftSeq < head {
		return m.LeftSeq
	}
	return head
}

func (s *Service) groupSync(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	var req pb.GroupSyncRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	u := das.User{Account: sess.Account, UID: sess.UID}
	ms, err := s.groups.UserGroups(ctx, u)
	if err != nil {
		return nil, groupErr("group sync", err)
	}
	ids := make([]uint64, len(ms))
	for i, m := range ms {
		ids[i] = m.GroupID
	}
	cursors, err := s.groups.GroupCursors(ctx, terminalOf(sess), ids)
	if err != nil {
		return nil, groupErr("group sync", err)
	}
	resp := &pb.GroupSyncResponse{Groups: make([]*pb.GroupState, 0, len(ms))}
	for i, m := range ms {
		if m.LeftSeq != 0 && cursors[i] >= m.LeftSeq {
			// Left (or dissolved) and acked to the end by this terminal:
			// the group is over for it (PROTOCOL.md, "Groups", rule 5).
			// The user's membership record stays for its other terminals
			// and the HTTP API's list.
			continue
		}
		g, err := s.groups.Group(ctx, m.GroupID)
		if err != nil {
			return nil, groupErr("group sync", err)
		}
		resp.Groups = append(resp.Groups, &pb.GroupState{
			GroupId: m.GroupID, HeadSeq: visibleHead(m, g.Head), AckedSeq: max(cursors[i], m.JoinSeq-1),
			JoinSeq: m.JoinSeq, LeftSeq: m.LeftSeq,
		})
	}
	return proto.Marshal(resp)
}

func (s *Service) groupPull(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	var req pb.GroupPullRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	size, err := s.pageSize(req.PageSize, "page size")
	if err != nil {
		return nil, err
	}
	m, err := s.membership(ctx, das.User{Account: sess.Account, UID: sess.UID}, req.GroupId)
	if err != nil {
		return nil, err
	}
	g, err := s.groups.Group(ctx, req.GroupId)
	if err != nil {
		return nil, groupErr("group pull", err)
	}
	top := visibleHead(m, g.Head)
	home, remote := s.groupHome(req.GroupId)
	if req.AckSeq != 0 {
		// In a DC that does not order the group the head here may lag the
		// home DC's (replication): an ack beyond it is not refused there.
		if req.AckSeq > top && !remote {
			return nil, schema.Errorf(schema.StatusBadArgument, "ack_seq %d is beyond the group's last seq %d", req.AckSeq, top)
		}
		if err := s.groups.AckGroup(ctx, terminalOf(sess), req.GroupId, req.AckSeq); err != nil {
			return nil, groupErr("group ack", err)
		}
	}
	after := max(req.AfterSeq, m.JoinSeq-1)
	msgs, more, err := s.groups.GroupPage(ctx, req.GroupId, after, top, size)
	if err != nil {
		return nil, groupErr("group pull", err)
	}
	if len(msgs) == 0 && remote && !IsMirror(&sess) {
		// The client pulls because it knows of more (a notify beyond a
		// gap, a head from a sync), and this DC's store has none of it
		// yet: the home DC, which ordered them, has them.
		fwd, _ := proto.Marshal(&pb.GroupPullRequest{GroupId: req.GroupId, AfterSeq: req.AfterSeq, PageSize: req.PageSize})
		if rb, err := s.rooms.Forward(ctx, home, sess, &schema.Header{Cmd: schema.CmdGroupPull, LogID: h.LogID}, fwd); err == nil {
			s.log.Debug("group pull answered by the home DC", "group", req.GroupId, "after", req.AfterSeq, "dc", home, "logid", h.LogID)
			return rb, nil
		} else {
			s.log.Info("group pull: the home DC did not answer", "group", req.GroupId, "dc", home, "err", err, "logid", h.LogID)
		}
	}
	return proto.Marshal(&pb.GroupPullResponse{Messages: msgs, More: more, HeadSeq: top})
}

func (s *Service) groupAck(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	var req pb.GroupAckRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	if len(req.Cursors) > s.c2c.MaxPage {
		return nil, schema.Errorf(schema.StatusBadArgument, "at most %d cursors per ack", s.c2c.MaxPage)
	}
	if len(req.Cursors) == 0 {
		return proto.Marshal(&pb.GroupAckResponse{})
	}
	u := das.User{Account: sess.Account, UID: sess.UID}
	var ms []das.Membership // the user's memberships, read once when the cache cannot tell
	for _, c := range req.Cursors {
		// A current member is answered from the members cache: an ack
		// comes with almost every delivery, and reading the user's whole
		// membership list for each one cost a fifth of the server's time
		// in a 5,000-online group bench. A stale cache can only let a
		// removed member move its own cursor past its removal, which
		// hides nothing from anyone; pulls check the store.
		var m das.Membership
		if join, ok, err := s.groupCache.Member(ctx, c.GroupId, u); err == nil && ok {
			m = das.Membership{GroupID: c.GroupId, JoinSeq: join}
		}
		if m.GroupID == 0 {
			if ms == nil {
				var err error
				if ms, err = s.groups.UserGroups(ctx, u); err != nil {
					return nil, groupErr("group ack", err)
				}
			}
			i := slices.IndexFunc(ms, func(x das.Membership) bool { return x.GroupID == c.GroupId })
			if i < 0 {
				return nil, schema.Errorf(schema.StatusNotMember, "not a member of group %d", c.GroupId)
			}
			m = ms[i]
		}
		// The seq must be one the member may have seen: a current member's
		// ack of a seq this node fanned out (or read) needs no read of the
		// group's head.
		if m.LeftSeq != 0 || !s.groupCache.HasSeq(c.GroupId, c.Seq) {
			g, err := s.groups.Group(ctx, c.GroupId)
			if err != nil {
				return nil, groupErr("group ack", err)
			}
			s.groupCache.SawSeq(c.GroupId, g.Head)
			if top := visibleHead(m, g.Head); c.Seq > top && !s.remoteHome(c.GroupId) {
				return nil, schema.Errorf(schema.StatusBadArgument, "group %d: ack of seq %d beyond its last seq %d", c.GroupId, c.Seq, top)
			}
		}
		if err := s.groups.AckGroup(ctx, terminalOf(sess), c.GroupId, c.Seq); err != nil {
			return nil, groupErr("group ack", err)
		}
	}
	s.mGroupAcks.Add(float64(len(req.Cursors)))
	return proto.Marshal(&pb.GroupAckResponse{})
}

// ---- management (the HTTP API) ----

// GroupMember is a user in the HTTP API.
type GroupMember struct {
	Account uint32 `json:"account"`
	UID     uint64 `json:"uid"`
	JoinSeq uint64 `json:"join_seq,omitempty"`
}

// GroupChange is the answer to a change of a group.
type GroupChange struct {
	GroupID uint64        `json:"group_id,string"`
	Seq     uint64        `json:"seq"` // the event's seq; 0 when nothing changed
	Members []GroupMember `json:"members"`
}

// groupUsers validates and converts members of a request; account 0 means
// the caller's account system.
func (s *Service) groupUsers(caller *App, in []GroupMember) ([]das.User, error) {
	if len(in) == 0 {
		return nil, schema.Errorf(schema.StatusBadRecipient, "no members")
	}
	if len(in) > s.groupCfg.MaxSize {
		return nil, schema.Errorf(schema.StatusGroupFull, "%d members, over the maximum group size of %d", len(in), s.groupCfg.MaxSize)
	}
	out := make([]das.User, 0, len(in))
	for i, m := range in {
		acc := m.Account
		if acc == 0 {
			acc = caller.Account
		}
		switch {
		case m.UID == 0:
			return nil, schema.Errorf(schema.StatusBadRecipient, "member %d: uid must be > 0", i)
		case len(s.accounts[acc]) == 0:
			return nil, schema.Errorf(schema.StatusBadRecipient, "member %d: account system %d is not configured", i, acc)
		}
		out = append(out, das.User{Account: acc, UID: m.UID})
	}
	return out, nil
}

func toMembers(us []das.User) []GroupMember {
	out := make([]GroupMember, len(us))
	for i, u := range us {
		out[i] = GroupMember{Account: u.Account, UID: u.UID}
	}
	return out
}

func pbUsers(us []das.User) []*pb.User {
	out := make([]*pb.User, len(us))
	for i, u := range us {
		out[i] = &pb.User{Account: u.Account, Uid: u.UID}
	}
	return out
}

// event returns a system message of group id.
func (s *Service) event(id uint64, kind pb.GroupEventKind, users []das.User, caller *App, logid uint64) (*pb.C2CMessage, error) {
	msgid, err := s.newID(0, logid)
	if err != nil {
		return nil, err
	}
	return &pb.C2CMessage{
		Msgid: msgid, From: &pb.User{}, To: &pb.User{}, GroupId: id, SentAtMs: time.Now().UnixMilli(), Logid: logid,
		FromAppcode: caller.AppCode,
		Event:       &pb.GroupEvent{Kind: kind, Users: pbUsers(users), By: fmt.Sprintf("app %d", caller.AppCode)},
	}, nil
}

// changed invalidates the members cache here and on every logic node of
// the DC, and pushes the event to the members (and extra users).
func (s *Service) changed(ctx context.Context, ev *pb.C2CMessage, extra []das.User, logid uint64) {
	s.groupCache.Invalidate(ev.GroupId)
	if s.groupChanged != nil {
		s.groupChanged(ctx, ev.GroupId)
	}
	s.fanOutGroup(ctx, ev, ev.Seq, nil, extra, logid)
}

// CreateGroup creates a group; id 0 gets a new one.
func (s *Service) CreateGroup(ctx context.Context, caller *App, id uint64, members []GroupMember, logid uint64) (*GroupChange, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	us, err := s.groupUsers(caller, members)
	if err != nil {
		return nil, err
	}
	for id == 0 {
		if id, err = s.newID(0, logid); err != nil {
			return nil, err
		}
		if _, remote := s.groupHome(id); remote {
			id = 0 // a group this DC orders
		}
	}
	if err := s.needHome(id); err != nil {
		return nil, err
	}
	ev, err := s.event(id, pb.GroupEventKind_GROUP_EVENT_CREATED, us, caller, logid)
	if err != nil {
		return nil, err
	}
	info, err := s.groups.CreateGroup(das.WithLogID(ctx, logid), id, us, s.groupCfg.MaxSize, ev)
	if err != nil {
		return nil, groupErr("create group", err)
	}
	ev.Seq = info.Head
	s.changed(ctx, ev, nil, logid)
	s.log.Info("group created", "group", id, "members", info.Members, "appcode", caller.AppCode, "logid", logid)
	return &GroupChange{GroupID: id, Seq: ev.Seq, Members: toMembers(us)}, nil
}

// AddGroupMembers adds members to group id.
func (s *Service) AddGroupMembers(ctx context.Context, caller *App, id uint64, members []GroupMember, logid uint64) (*GroupChange, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	if err := s.needHome(id); err != nil {
		return nil, err
	}
	us, err := s.groupUsers(caller, members)
	if err != nil {
		return nil, err
	}
	ev, err := s.event(id, pb.GroupEventKind_GROUP_EVENT_JOINED, us, caller, logid)
	if err != nil {
		return nil, err
	}
	seq, added, err := s.groups.AddMembers(das.WithLogID(ctx, logid), id, us, s.groupCfg.MaxSize, ev)
	if err != nil {
		return nil, groupErr("add members", err)
	}
	if seq != 0 {
		ev.Seq, ev.Event.Users = seq, pbUsers(added)
		s.changed(ctx, ev, nil, logid)
		s.log.Info("group members added", "group", id, "added", len(added), "seq", seq, "appcode", caller.AppCode, "logid", logid)
	}
	return &GroupChange{GroupID: id, Seq: seq, Members: toMembers(added)}, nil
}

// RemoveGroupMembers removes members from group id; they get the removal.
func (s *Service) RemoveGroupMembers(ctx context.Context, caller *App, id uint64, members []GroupMember, logid uint64) (*GroupChange, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	if err := s.needHome(id); err != nil {
		return nil, err
	}
	us, err := s.groupUsers(caller, members)
	if err != nil {
		return nil, err
	}
	ev, err := s.event(id, pb.GroupEventKind_GROUP_EVENT_LEFT, us, caller, logid)
	if err != nil {
		return nil, err
	}
	seq, removed, err := s.groups.RemoveMembers(das.WithLogID(ctx, logid), id, us, ev)
	if err != nil {
		return nil, groupErr("remove members", err)
	}
	if seq != 0 {
		ev.Seq, ev.Event.Users = seq, pbUsers(removed)
		s.changed(ctx, ev, removed, logid)
		s.log.Info("group members removed", "group", id, "removed", len(removed), "seq", seq, "appcode", caller.AppCode, "logid", logid)
	}
	return &GroupChange{GroupID: id, Seq: seq, Members: toMembers(removed)}, nil
}

// DissolveGroup ends group id; every member gets the last message.
func (s *Service) DissolveGroup(ctx context.Context, caller *App, id uint64, logid uint64) (*GroupChange, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	if err := s.needHome(id); err != nil {
		return nil, err
	}
	members, _, err := s.groups.Members(ctx, id)
	if err != nil {
		return nil, groupErr("dissolve group", err)
	}
	ev, err := s.event(id, pb.GroupEventKind_GROUP_EVENT_DISSOLVED, nil, caller, logid)
	if err != nil {
		return nil, err
	}
	seq, err := s.groups.Dissolve(das.WithLogID(ctx, logid), id, ev)
	if err != nil {
		return nil, groupErr("dissolve group", err)
	}
	ev.Seq = seq
	extra := make([]das.User, len(members))
	for i, m := range members {
		extra[i] = m.User
	}
	s.changed(ctx, ev, extra, logid)
	s.log.Info("group dissolved", "group", id, "seq", seq, "appcode", caller.AppCode, "logid", logid)
	return &GroupChange{GroupID: id, Seq: seq}, nil
}

// GroupMembers lists group id's members.
func (s *Service) GroupMembers(ctx context.Context, id uint64) (das.GroupInfo, []GroupMember, error) {
	if err := s.needGroups(); err != nil {
		return das.GroupInfo{}, nil, err
	}
	info, err := s.groups.Group(ctx, id)
	if err != nil {
		return das.GroupInfo{}, nil, groupErr("group", err)
	}
	if info.Dissolved {
		return das.GroupInfo{}, nil, groupErr("group", das.ErrGroupUnknown)
	}
	members, _, err := s.groups.Members(ctx, id)
	if err != nil {
		return das.GroupInfo{}, nil, groupErr("group members", err)
	}
	out := make([]GroupMember, len(members))
	for i, m := range members {
		out[i] = GroupMember{Account: m.User.Account, UID: m.User.UID, JoinSeq: m.JoinSeq}
	}
	return info, out, nil
}

// UserGroups lists the groups of a user.
func (s *Service) UserGroups(ctx context.Context, u das.User) ([]das.Membership, error) {
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	ms, err := s.groups.UserGroups(ctx, u)
	if err != nil {
		return nil, groupErr("user groups", err)
	}
	return ms, nil
}

// InvalidateGroup drops group id from this node's members cache: another
// node changed its membership.
func (s *Service) InvalidateGroup(id uint64) {
	if s.groupCache != nil {
		s.groupCache.Invalidate(id)
	}
}
