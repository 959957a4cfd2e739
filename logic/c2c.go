package logic

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// C2C configures client-to-client messaging.
type C2C struct {
	// MaxContent bounds a message's content. Default 16 KiB.
	MaxContent int `yaml:"max_content"`
	// PageSize is the offline page size when a client asks for 0. Default 50.
	PageSize int `yaml:"page_size"`
	// MaxPage bounds offline pages and history syncs. Default 500.
	MaxPage int `yaml:"max_page"`
	// MaxClientMsgID bounds the client message id. Default 64 bytes.
	MaxClientMsgID int `yaml:"max_client_msg_id"`
	// MaxConversations bounds the versions a conversation sync may hold.
	// Default 5000.
	MaxConversations int `yaml:"max_conversations"`
}

func (c *C2C) setDefaults() {
	if c.MaxContent <= 0 {
		c.MaxContent = 16 << 10
	}
	if c.PageSize <= 0 {
		c.PageSize = 50
	}
	if c.MaxPage <= 0 {
		c.MaxPage = 500
	}
	if c.PageSize > c.MaxPage {
		c.PageSize = c.MaxPage
	}
	if c.MaxClientMsgID <= 0 {
		c.MaxClientMsgID = 64
	}
	if c.MaxConversations <= 0 {
		c.MaxConversations = 5000
	}
}

func terminalOf(s router.Session) das.Terminal {
	return das.Terminal{Account: s.Account, UID: s.UID, AppCode: s.AppCode}
}

func userOf(u *pb.User) das.User { return das.User{Account: u.GetAccount(), UID: u.GetUid()} }

func badBody(cmd schema.Cmd, err error) error {
	return schema.Errorf(schema.StatusBadBody, "%s body: %v", cmd, err)
}

// storeErr maps a storage failure to a status: retryable unless it is the
// caller's fault.
func storeErr(op string, err error) error {
	var se *schema.Error
	if errors.As(err, &se) {
		return err
	}
	if errors.Is(err, das.ErrInvalid) {
		return schema.Errorf(schema.StatusBadArgument, "store: %s: %v", op, err)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return schema.Errorf(schema.StatusTimeout, "store: %s: %v", op, err)
	}
	return schema.Errorf(schema.StatusUnavailable, "store: %s: %v", op, err)
}

func (s *Service) needStore() error {
	if s.store == nil {
		return schema.Errorf(schema.StatusUnavailable, "this server has no message store")
	}
	return nil
}

// c2cSend stores a message, then notifies the recipient's online sessions.
// The response means "stored": PutC2C is durable before it returns.
func (s *Service) c2cSend(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	var req pb.C2CSendRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	to := req.GetTo()
	if req.GroupId != 0 {
		switch {
		case to.GetUid() != 0 || to.GetAccount() != 0:
			return nil, schema.Errorf(schema.StatusBadRecipient, "a group message has a group_id and no recipient")
		case len(req.Content) == 0:
			return nil, schema.Errorf(schema.StatusEmptyContent, "message content is empty")
		case len(req.Content) > s.c2c.MaxContent:
			return nil, schema.Errorf(schema.StatusContentTooLarge, "content is %d bytes, over the maximum of %d", len(req.Content), s.c2c.MaxContent)
		case len(req.ClientMsgId) > s.c2c.MaxClientMsgID:
			return nil, schema.Errorf(schema.StatusBadArgument, "client_msg_id is over %d bytes", s.c2c.MaxClientMsgID)
		}
		if req.Transient {
			return s.transientSend(ctx, sess, h, &req)
		}
		if home, remote := s.groupHome(req.GroupId); remote {
			// One point orders each group: its home DC.
			return s.rooms.Forward(ctx, home, sess, h, body)
		}
		return s.groupSend(ctx, sess, h, &req)
	}
	switch {
	case to == nil || to.Uid == 0 || to.Account == 0:
		return nil, schema.Errorf(schema.StatusBadRecipient, "recipient needs an account and a uid > 0")
	case len(s.accounts[to.Account]) == 0:
		return nil, schema.Errorf(schema.StatusBadRecipient, "account system %d is not configured", to.Account)
	case len(req.Content) == 0:
		return nil, schema.Errorf(schema.StatusEmptyContent, "message content is empty")
	case len(req.Content) > s.c2c.MaxContent:
		return nil, schema.Errorf(schema.StatusContentTooLarge, "content is %d bytes, over the maximum of %d", len(req.Content), s.c2c.MaxContent)
	case len(req.ClientMsgId) > s.c2c.MaxClientMsgID:
		return nil, schema.Errorf(schema.StatusBadArgument, "client_msg_id is over %d bytes", s.c2c.MaxClientMsgID)
	case strings.HasPrefix(req.ClientMsgId, "group/"):
		// The store keeps group sends' client ids under this prefix, in
		// the same table (das/cassandra): a one-to-one id must not look
		// like one.
		return nil, schema.Errorf(schema.StatusBadArgument, "a one-to-one client_msg_id may not begin with \"group/\"")
	}
	if req.Transient {
		return s.transientSend(ctx, sess, h, &req)
	}
	if err := s.limits.allowSend(das.User{Account: sess.Account, UID: sess.UID}); err != nil {
		return nil, err
	}
	if err := s.needStore(); err != nil {
		return nil, err
	}
	floor, err := s.sendFloor(ctx, sess, h, &req)
	if err != nil {
		return nil, err
	}
	// Above the sender's floor: its messages sort in send order whatever
	// the clocks of the nodes that stored them (logic/ids.go).
	id, err := s.newID(floor, h.LogID)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	// The sender's other terminals (multi-device) keep a copy in their
	// inboxes, as the recipient's do.
	var echo []uint32
	for _, a := range s.accounts[sess.Account] {
		if a != sess.AppCode {
			echo = append(echo, a)
		}
	}
	m := &pb.C2CMessage{
		Msgid:       id,
		From:        &pb.User{Account: sess.Account, Uid: sess.UID},
		FromAppcode: sess.AppCode,
		To:          &pb.User{Account: to.Account, Uid: to.Uid},
		Msgtype:     h.MsgType,
		Content:     req.Content,
		SentAtMs:    now.UnixMilli(),
		ClientMsgId: req.ClientMsgId,
		Logid:       h.LogID,
	}
	msgid, dup, err := s.store.PutC2C(das.WithLogID(ctx, h.LogID), m, s.accounts[to.Account], echo)
	if err != nil {
		s.mC2C.WithLabelValues("store_error").Inc()
		s.log.Warn("c2c store failed", "uid", sess.UID, "appcode", sess.AppCode, "to_account", to.Account, "to_uid", to.Uid, "err", err, "logid", h.LogID)
		return nil, storeErr("put", err)
	}
	if dup {
		s.mC2C.WithLabelValues("duplicate").Inc()
		// The first attempt may have died between storing and notifying
		// (with Cassandra a retry can even complete its write): notify
		// again. Receivers drop what they have seen.
		m.Msgid = msgid
	} else {
		s.mC2C.WithLabelValues("stored").Inc()
	}
	// Notify before answering: a sender that sends its next message only
	// after this response cannot overtake this notify on any connection.
	// Every terminal of the recipient gets it, and every other terminal of
	// the sender. The sending terminal (appcode) does not, on any of its
	// connections: it has the answer, and a reconnect that overtook this
	// request must not show the user's own message as a new one.
	nb, _ := proto.Marshal(&pb.C2CNotify{Messages: []*pb.C2CMessage{m}})
	n := s.pushUser(ctx, userOf(to), nil, schema.CmdC2CNotify, h.MsgType, nb, h.LogID)
	if to.Account != sess.Account || to.Uid != sess.UID {
		n += s.pushUser(ctx, das.User{Account: sess.Account, UID: sess.UID}, &sess, schema.CmdC2CNotify, h.MsgType, nb, h.LogID)
	}
	s.mC2CNotifies.Add(float64(n))
	s.log.Debug("c2c stored", "msgid", msgid, "dup", dup, "uid", sess.UID, "appcode", sess.AppCode, "to_account", to.Account, "to_uid", to.Uid, "notified", n, "logid", h.LogID)
	return proto.Marshal(&pb.C2CSendResponse{Msgid: msgid, StoredAtMs: now.UnixMilli(), Duplicate: dup})
}

// sendFloor is the msgid a one-to-one send must be minted above: the
// terminal's answered floor (after_msgid) and, for an ordered send, the
// msgid of the predecessor it names, which must be stored already
// (PROTOCOL.md, "Ordered sends"); 3005 when it is not.
func (s *Service) sendFloor(ctx context.Context, sess router.Session, h *schema.Header, req *pb.C2CSendRequest) (uint64, error) {
	pred := req.AfterClientMsgId
	if pred == "" {
		return req.AfterMsgid, nil
	}
	if len(pred) > s.c2c.MaxClientMsgID {
		return 0, schema.Errorf(schema.StatusBadArgument, "after_client_msg_id is over %d bytes", s.c2c.MaxClientMsgID)
	}
	sender := das.Terminal{Account: sess.Account, UID: sess.UID, AppCode: sess.AppCode}
	id, ok, err := s.store.SentMsgid(das.WithLogID(ctx, h.LogID), sender, pred)
	if err != nil {
		s.mC2C.WithLabelValues("store_error").Inc()
		return 0, storeErr("predecessor lookup", err)
	}
	if !ok {
		s.mC2C.WithLabelValues("out_of_order").Inc()
		s.log.Debug("c2c predecessor not stored", "uid", sess.UID, "appcode", sess.AppCode, "after_client_msg_id", pred, "logid", h.LogID)
		return 0, schema.Errorf(schema.StatusOutOfOrder, "the message sent before this one (client_msg_id %q) is not stored; send this one again once it is answered", pred)
	}
	return max(id, req.AfterMsgid), nil
}

// pushUser sends a notify to every online session of u but those on the
// terminal (appcode) of skip (nil for none) and returns how many took it.
func (s *Service) pushUser(ctx context.Context, u das.User, skip *router.Session, cmd schema.Cmd, msgtype uint32, body []byte, logid uint64) int {
	sessions, err := s.router.Lookup(ctx, router.User{Account: u.Account, UID: u.UID})
	if err != nil {
		s.log.Warn("push: router lookup", "account", u.Account, "uid", u.UID, "err", err, "logid", logid)
		return 0
	}
	if skip != nil {
		sessions = slices.DeleteFunc(sessions, func(o router.Session) bool { return o.AppCode == skip.AppCode })
	}
	return s.pushCount(ctx, sessions, cmd, msgtype, body, logid)
}

// pushCount pushes to every session in ss (pushSessions) and returns how
// many took the notify.
func (s *Service) pushCount(ctx context.Context, ss []router.Session, cmd schema.Cmd, msgtype uint32, body []byte, logid uint64) int {
	if len(ss) == 0 {
		return 0
	}
	queued := make([]bool, len(ss))
	s.pushSessions(ctx, ss, cmd, msgtype, body, queued, logid)
	n := 0
	for _, q := range queued {
		if q {
			n++
		}
	}
	return n
}

// otherTerminals flattens the sessions of a LookupMany, leaving out those
// of the sending terminal (skip's user and appcode; nil skips none): it
// has the answer to its request.
func otherTerminals(sessions [][]router.Session, skip *router.Session) []router.Session {
	var out []router.Session
	for _, ss := range sessions {
		for _, x := range ss {
			if skip != nil && x.AppCode == skip.AppCode && x.UID == skip.UID && x.Account == skip.Account {
				continue
			}
			out = append(out, x)
		}
	}
	return out
}

// pushSessions queues one notify on every session in ss with one Gate.Push
// per gateway, and sets queued[i] for ss[i].
//
// A notify that a gateway could not take is reported, never silent
// (DESIGN.md, delivery contract point 9): it is counted by command in
// imd_logic_undelivered_total, and when the gateway answered that the
// connection is gone (the router still listed a session whose disconnect
// never reached it) the session is removed from the router, so later
// fan-outs treat the terminal as offline. A gateway that is unknown to
// this node or unreachable keeps its sessions: the membership decides
// whether it died, and purges them then. The caller decides what to keep
// for the terminals whose queued is false (c2c is stored before it is
// pushed; s2c with store_offline keeps it in their inboxes).
func (s *Service) pushSessions(ctx context.Context, ss []router.Session, cmd schema.Cmd, msgtype uint32, body []byte, queued []bool, logid uint64) {
	if len(ss) == 0 {
		return
	}
	// Most fan-outs touch few gateways: group by a linear scan of the
	// gateways seen so far instead of a map.
	type group struct {
		gate  string
		idx   []int
		conns []uint64
	}
	var groups []group
	for i := range ss {
		j := 0
		for j < len(groups) && groups[j].gate != ss[i].Gate {
			j++
		}
		if j == len(groups) {
			groups = append(groups, group{gate: ss[i].Gate})
		}
		groups[j].idx = append(groups[j].idx, i)
		groups[j].conns = append(groups[j].conns, ss[i].Conn)
	}
	var stale []router.Session
	for _, gr := range groups {
		g := s.gate(gr.gate)
		if g == nil {
			s.mUndelivered.WithLabelValues(cmdLabel(cmd)).Add(float64(len(gr.conns)))
			s.log.Info("push undeliverable: gate unknown to this node", "gate", gr.gate, "cmd", cmd.String(), "sessions", len(gr.conns), "logid", logid)
			continue
		}
		q := make([]bool, len(gr.conns))
		if err := g.Push(ctx, gr.conns, cmd, msgtype, logid, body, q); err != nil {
			s.mUndelivered.WithLabelValues(cmdLabel(cmd)).Add(float64(len(gr.conns)))
			s.log.Warn("push undeliverable: gate unreachable", "gate", gr.gate, "cmd", cmd.String(), "sessions", len(gr.conns), "err", err, "logid", logid)
			continue
		}
		for k, i := range gr.idx {
			queued[i] = q[k]
			if !q[k] {
				stale = append(stale, ss[i])
			}
		}
	}
	if len(stale) > 0 {
		s.mUndelivered.WithLabelValues(cmdLabel(cmd)).Add(float64(len(stale)))
		s.dropStale(ctx, stale, cmd, logid)
	}
}

// dropStale removes sessions whose gateway reported their connection gone.
// Unregister removes exactly that login, so a newer login of the same
// terminal is never touched.
func (s *Service) dropStale(ctx context.Context, stale []router.Session, cmd schema.Cmd, logid uint64) {
	for _, ss := range stale {
		removed, err := s.unregister(ctx, ss, logid)
		switch {
		case err != nil:
			s.log.Warn("push undeliverable: drop the stale session", "gate", ss.Gate, "conn", ss.Conn, "uid", ss.UID, "appcode", ss.AppCode, "err", err, "logid", logid)
		case removed:
			s.mStale.Inc()
			s.log.Info("push undeliverable: connection gone, session dropped from the router", "cmd", cmd.String(), "gate", ss.Gate, "conn", ss.Conn, "uid", ss.UID, "appcode", ss.AppCode, "logid", logid)
		}
	}
}

// cmdLabel is the metric label of a pushed command.
func cmdLabel(cmd schema.Cmd) string {
	switch cmd {
	case schema.CmdC2CNotify:
		return "c2c"
	case schema.CmdC2CReceipt:
		return "receipt"
	case schema.CmdS2C:
		return "s2c"
	}
	return "other"
}

// ack removes acknowledged messages from the terminal's inbox and sends a
// delivered receipt to each sender.
func (s *Service) ack(ctx context.Context, sess router.Session, msgids []uint64, logid uint64) (int, error) {
	if len(msgids) == 0 {
		return 0, nil
	}
	if len(msgids) > s.c2c.MaxPage {
		return 0, schema.Errorf(schema.StatusBadArgument, "at most %d msgids per ack", s.c2c.MaxPage)
	}
	acked, missing, err := s.store.Ack(das.WithLogID(ctx, logid), terminalOf(sess), msgids)
	if err != nil {
		return 0, storeErr("ack", err)
	}
	if len(missing) > 0 {
		s.log.Debug("ack of msgids not in the inbox", "uid", sess.UID, "appcode", sess.AppCode, "missing", len(missing), "logid", logid)
		s.forwardAcks(sess, missing, logid)
	}
	var (
		pushes   []uint64
		receipts []receiptBatch // one per sender, in the order acked
	)
	for _, m := range acked {
		if m.From.GetAccount() == 0 && m.From.GetUid() == 0 {
			// an s2c push kept in the inbox: count the arrival
			pushes = append(pushes, m.Msgid)
			continue
		}
		s.mC2CAcks.Inc()
		// The message's own trace id follows it to the receipt; this
		// ack's id is logged beside it.
		s.log.Debug("c2c acked", "msgid", m.Msgid, "uid", sess.UID, "appcode", sess.AppCode, "ack_logid", logid, "logid", m.Logid)
		from := userOf(m.From)
		if from.Account == sess.Account && from.UID == sess.UID {
			continue // the sender's own other terminal: not a delivery to the recipient
		}
		i := slices.IndexFunc(receipts, func(r receiptBatch) bool { return r.to == from })
		if i < 0 {
			rl := m.Logid
			if rl == 0 {
				rl = logid
			}
			receipts = append(receipts, receiptBatch{to: from, logid: rl})
			i = len(receipts) - 1
		}
		receipts[i].msgids = append(receipts[i].msgids, m.Msgid)
	}
	// One receipt per sender: the messages one ack covers mostly come
	// from one conversation, and each frame is a router lookup and a write.
	now := time.Now().UnixMilli()
	by := &pb.User{Account: sess.Account, Uid: sess.UID}
	for _, r := range receipts {
		rc := &pb.C2CReceipt{Msgid: r.msgids[0], By: by, ByAppcode: sess.AppCode, AtMs: now}
		if len(r.msgids) > 1 {
			rc.Msgids = r.msgids
		}
		rb, _ := proto.Marshal(rc)
		s.pushUser(ctx, r.to, nil, schema.CmdC2CReceipt, 0, rb, r.logid)
	}
	if len(pushes) > 0 {
		s.pushAcked(ctx, pushes, logid)
	}
	return len(acked), nil
}

// receiptBatch is the messages of one sender that one ack covered.
type receiptBatch struct {
	to     das.User
	logid  uint64 // the first message's trace id
	msgids []uint64
}

func (s *Service) c2cAck(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needStore(); err != nil {
		return nil, err
	}
	var req pb.C2CAckRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	n, err := s.ack(ctx, sess, req.Msgids, h.LogID)
	if err != nil {
		return nil, err
	}
	return proto.Marshal(&pb.C2CAckResponse{Acked: uint32(n)})
}

func (s *Service) offlineCount(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	var req pb.OfflineCountRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	if s.store == nil { // nothing is kept, so nothing waits
		return proto.Marshal(&pb.OfflineCountResponse{})
	}
	n, oldest, err := s.store.InboxCount(ctx, terminalOf(sess))
	if err != nil {
		return nil, storeErr("count", err)
	}
	return proto.Marshal(&pb.OfflineCountResponse{Count: uint64(n), OldestMsgid: oldest})
}

func (s *Service) pageSize(n uint32, what string) (int, error) {
	switch {
	case n == 0:
		return s.c2c.PageSize, nil
	case int64(n) > int64(s.c2c.MaxPage):
		return 0, schema.Errorf(schema.StatusBadArgument, "%s %d is over the maximum of %d", what, n, s.c2c.MaxPage)
	}
	return int(n), nil
}

// offlinePull acknowledges the previous page, then returns the next one.
func (s *Service) offlinePull(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	var req pb.OfflinePullRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	if s.store == nil {
		// A server without a store keeps nothing for offline terminals:
		// the inbox is empty (an error here would hold an SDK's live
		// notifies back while it retried the pull).
		return proto.Marshal(&pb.OfflinePullResponse{})
	}
	size, err := s.pageSize(req.PageSize, "page size")
	if err != nil {
		return nil, err
	}
	if _, err := s.ack(ctx, sess, req.AckMsgids, h.LogID); err != nil {
		return nil, err
	}
	msgs, more, err := s.store.InboxPage(ctx, terminalOf(sess), req.AfterMsgid, size)
	if err != nil {
		return nil, storeErr("page", err)
	}
	if s.rooms != nil {
		if IsMirror(&sess) {
			// Another DC's pull: what this DC stored; the rest is there.
			here := s.rooms.DC()
			msgs = slices.DeleteFunc(msgs, func(m *pb.C2CMessage) bool { return s.rooms.MsgDC(m.Msgid) != here })
		} else {
			msgs, more = s.pullOtherDCs(ctx, sess, h.LogID, req.AfterMsgid, size, msgs, more)
		}
	}
	return proto.Marshal(&pb.OfflinePullResponse{Messages: msgs, More: more})
}

func (s *Service) historySync(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needStore(); err != nil {
		return nil, err
	}
	var req pb.HistorySyncRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	limit, err := s.pageSize(req.Limit, "limit")
	if err != nil {
		return nil, err
	}
	var peer *das.User
	if p := req.GetPeer(); p != nil {
		if p.Uid == 0 || p.Account == 0 {
			return nil, schema.Errorf(schema.StatusBadRecipient, "peer needs an account and a uid > 0")
		}
		u := userOf(p)
		peer = &u
	}
	msgs, more, err := s.store.History(ctx, das.User{Account: sess.Account, UID: sess.UID}, peer, req.SinceMsgid, limit)
	if err != nil {
		return nil, storeErr("history", err)
	}
	return proto.Marshal(&pb.HistorySyncResponse{Messages: msgs, More: more})
}

// Handle implements API.
func (s *Service) Handle(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	switch h.Cmd {
	case schema.CmdC2CSend:
		return s.c2cSend(ctx, sess, h, body)
	case schema.CmdC2CAck:
		return s.c2cAck(ctx, sess, h, body)
	case schema.CmdOfflineCount:
		return s.offlineCount(ctx, sess, h, body)
	case schema.CmdOfflinePull:
		return s.offlinePull(ctx, sess, h, body)
	case schema.CmdHistorySync:
		return s.historySync(ctx, sess, h, body)
	case schema.CmdS2CAck:
		return s.s2cAck(ctx, sess, h, body)
	case schema.CmdC2S:
		return s.c2s(ctx, sess, h, body)
	case schema.CmdGroupSync:
		return s.groupSync(ctx, sess, h, body)
	case schema.CmdGroupPull:
		return s.groupPull(ctx, sess, h, body)
	case schema.CmdGroupAck:
		return s.groupAck(ctx, sess, h, body)
	case schema.CmdConvSync:
		return s.convSync(ctx, sess, h, body)
	case schema.CmdConvRead:
		return s.convRead(ctx, sess, h, body)
	case schema.CmdPresenceSubscribe:
		return s.presenceSubscribe(ctx, sess, h, body)
	case schema.CmdGroupPresence:
		return s.groupPresence(ctx, sess, h, body)
	}
	return nil, schema.Errorf(schema.StatusUnknownCmd, "command %s is not served by this server", h.Cmd)
}
