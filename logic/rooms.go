package logic

import (
	"cmp"
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Rooms reaches the other data centers ("rooms") of a many-DC deployment
// (docs/two-dc.md); internal/rooms implements it over links between the
// DCs' logic tiers. Each DC has its own router; the sessions of another DC
// are mirrored in it under gate ids "@<dc>/<gate>" (MirrorGate), so a
// lookup finds a user wherever the user is online and a push to a mirrored
// session travels over the link to its DC. All methods are safe for
// concurrent use and none waits on another DC: what cannot be sent at
// once is queued for the link.
type Rooms interface {
	// DC names this node's data center.
	DC() string
	// SessionChanged tells the other DCs that a session of this DC
	// logged in (on) or ended (!on).
	SessionChanged(s router.Session, on bool)
	// GatePurged tells the other DCs that a gateway of this DC stopped
	// and its sessions were purged.
	GatePurged(gate string)
	// Gate reaches gateway gate of DC dc.
	Gate(dc, gate string) Gate
	// HomeDC names the DC that orders group id (its appends run there).
	HomeDC(group uint64) string
	// MsgDC names the DC whose logic node minted msgid, "" when no DC's
	// node id range holds it.
	MsgDC(msgid uint64) string
	// Forward serves a client request of sess (a session of this DC) in
	// DC dc and returns its response body.
	Forward(ctx context.Context, dc string, sess router.Session, h *schema.Header, body []byte) ([]byte, error)
	// Acked tells DC dc that sess acknowledged msgids this DC's store
	// did not hold yet (stored there, not replicated here yet), so that
	// dc removes them from its inbox and sends the receipts.
	Acked(dc string, sess router.Session, msgids []uint64, logid uint64)
	// DCs names every DC of the deployment, this one included.
	DCs() []string
}

// MirrorGate is the gate id under which this DC's router keeps the
// sessions that gateway gate of DC dc holds.
func MirrorGate(dc, gate string) string { return "@" + dc + "/" + gate }

// SplitMirrorGate parses a MirrorGate id.
func SplitMirrorGate(id string) (dc, gate string, ok bool) {
	if !strings.HasPrefix(id, "@") {
		return "", "", false
	}
	dc, gate, ok = strings.Cut(id[1:], "/")
	return dc, gate, ok && dc != "" && gate != ""
}

// IsMirror reports whether s is another DC's session, mirrored here.
func IsMirror(s *router.Session) bool { return strings.HasPrefix(s.Gate, "@") }

// catchUpWindow is how far back an offline pull asks the other DCs for
// messages they stored that this DC's store may not have received yet
// (replication between DCs is asynchronous).
const catchUpWindow = 30 * time.Second

// lateMirror is how old a mirrored login may be when it arrives and still
// count as on time: one that arrives later (its DC's link was down) may
// have missed what the other DCs stored for it, and gets it pushed.
const lateMirror = 2 * time.Second

// SetRooms connects the service to the other DCs. Call it before serving.
func (s *Service) SetRooms(r Rooms) { s.rooms = r }

// changed tells the other DCs about a change of a session of this DC.
func (s *Service) roomsChanged(sess *router.Session, on bool) {
	if s.rooms != nil && !IsMirror(sess) {
		s.rooms.SessionChanged(*sess, on)
	}
}

// LocalGate returns gateway id of this DC when this node reaches it.
func (s *Service) LocalGate(id string) Gate {
	s.gatesMu.RLock()
	defer s.gatesMu.RUnlock()
	return s.gates[id]
}

// MirrorOp is one change of another DC's router, applied to this one.
type MirrorOp struct {
	Session router.Session // its own DC's gate id
	On      bool           // logged in; false: ended
	Purge   string         // a gateway that stopped: every session on it ended
}

// ApplyMirror applies changes of DC dc's sessions to this DC's router. A
// mirrored login competes with this DC's logins of the same terminal by
// epoch (a hybrid clock, comparable across nodes): both DCs keep the same
// one, and each kicks only its own losers. A login also gets, at once,
// the messages stored here in the last moments that dc's store may not
// have yet.
func (s *Service) ApplyMirror(ctx context.Context, dc string, ops []MirrorOp) error {
	for i := range ops {
		op := &ops[i]
		if op.Purge != "" {
			if _, err := s.purgeGate(ctx, MirrorGate(dc, op.Purge)); err != nil {
				return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
			}
			continue
		}
		m := op.Session
		m.Gate = MirrorGate(dc, m.Gate)
		if !op.On {
			if _, err := s.unregister(ctx, m, 0); err != nil {
				return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
			}
			continue
		}
		app := s.apps[m.AppCode]
		if app == nil || app.Account != m.Account {
			continue
		}
		late := time.Since(time.UnixMilli(m.LoginMS)) > lateMirror
		if err := s.applyMirrorLogin(ctx, app, m, late); err != nil {
			return err
		}
	}
	return nil
}

// applyMirrorLogin registers m, another DC's login, where it wins over
// this DC's logins of the same terminal. A login this router did not
// know gets the newest message of its groups ordered here, and, with
// catchUp, the messages this DC stored for it in the last catchUpWindow
// (a login whose own offline pull could not ask this DC: see
// offlinePull).
func (s *Service) applyMirrorLogin(ctx context.Context, app *App, m router.Session, catchUp bool) error {
	max := max(app.MaxSessions, 1)
	cur, err := s.router.Lookup(ctx, m.User())
	if err != nil {
		return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	newer, known := 0, false
	for i := range cur {
		switch {
		case cur[i].Same(&m):
			known = true
		case cur[i].AppCode == m.AppCode && cur[i].Epoch > m.Epoch:
			newer++
		}
	}
	if !known && newer >= max {
		// Logins of this terminal newer than it fill the terminal's
		// places: it lost, here as in its own DC (which kicks it when it
		// learns of the newer ones).
		return nil
	}
	evicted, err := s.register(ctx, m, max, 0)
	if err != nil {
		return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	for _, old := range evicted {
		if IsMirror(&old) {
			continue // another DC's: it kicks its own
		}
		s.roomsChanged(&old, false)
		s.kick(ctx, old, &pb.Kickout{
			Reason: pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE, Detail: "the same account logged in on this terminal in another data center",
			NewDeviceId: m.DeviceID,
		}, 0)
	}
	if !known {
		if catchUp {
			// Its own pull could not ask this DC (the link was down).
			s.pushInbox(ctx, m, "cross-DC catch-up")
		}
		s.groupCatchUp(ctx, m, true)
	}
	return nil
}

// pushInbox asks session m to pull its inbox, as after a login: messages
// were stored while the router did not know m, which no live notify
// reached. The ask is a c2c-notify without messages (PROTOCOL.md); the
// client's pull holds live notifies back meanwhile, so each sender's
// order holds, which pushing the messages themselves could not promise
// (a newer message's live notify could overtake them).
func (s *Service) pushInbox(ctx context.Context, m router.Session, why string) {
	if s.store == nil {
		return
	}
	body, _ := proto.Marshal(&pb.C2CNotify{})
	q := []bool{false}
	s.pushSessions(ctx, []router.Session{m}, schema.CmdC2CNotify, 0, body, q, 0)
	s.log.Info(why+": pull asked", "uid", m.UID, "appcode", m.AppCode, "gate", m.Gate, "queued", q[0])
}

// groupCatchUp sends session m the newest message of each of its user's
// groups (those this DC orders, when homeOnly): a session the router did
// not know missed the live notifies of its groups, and its client pulls
// a group only after a login or on a gap, which the newest message shows
// it.
func (s *Service) groupCatchUp(ctx context.Context, m router.Session, homeOnly bool) {
	if s.groups == nil {
		return
	}
	ms, err := s.groups.UserGroups(ctx, das.User{Account: m.Account, UID: m.UID})
	if err != nil {
		s.log.Warn("group catch-up: the user's groups", "uid", m.UID, "err", err)
		return
	}
	for _, g := range ms {
		if _, remote := s.groupHome(g.GroupID); (homeOnly && remote) || g.LeftSeq != 0 {
			continue
		}
		info, err := s.groups.Group(ctx, g.GroupID)
		if err != nil || info.Head == 0 {
			continue
		}
		msgs, _, err := s.groups.GroupPage(ctx, g.GroupID, info.Head-1, info.Head, 1)
		if err != nil || len(msgs) == 0 {
			continue
		}
		body, _ := proto.Marshal(&pb.GroupNotify{GroupId: g.GroupID, Messages: msgs})
		q := []bool{false}
		s.pushSessions(ctx, []router.Session{m}, schema.CmdGroupNotify, msgs[0].Msgtype, body, q, msgs[0].Logid)
	}
}

// ServeForwarded serves a client request that session sess of DC dc sent
// to its own DC, which forwarded it here (a group send ordered here).
func (s *Service) ServeForwarded(ctx context.Context, dc string, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	sess.Gate = MirrorGate(dc, sess.Gate)
	switch h.Cmd {
	case schema.CmdC2CSend, schema.CmdGroupPull:
	case schema.CmdOfflinePull:
		// The session's offline pull asks this DC for what it stored
		// lately. Mirror the login first (its own change may still be on
		// its way): what is stored after that is pushed to it live, what
		// was stored before is in the page.
		if app := s.apps[sess.AppCode]; app != nil && app.Account == sess.Account {
			if err := s.applyMirrorLogin(ctx, app, sess, false); err != nil {
				return nil, err
			}
		}
	default:
		return nil, schema.Errorf(schema.StatusUnknownCmd, "%s is not served across data centers", h.Cmd)
	}
	return s.Handle(ctx, sess, h, body)
}

// pullOtherDCs merges into page (this DC's offline page after after,
// size at most) what the other DCs stored for sess since catchUpWindow:
// replication between DCs is asynchronous, and a message stored in
// another DC a moment before this login may not be here yet. Each DC is
// asked over its link, at once, for at most the time of a page; a DC
// that does not answer is left out (its mirror of the login pushes what
// it missed later). The page stays sorted by msgid and at most size.
func (s *Service) pullOtherDCs(ctx context.Context, sess router.Session, logid, after uint64, size int, page []*pb.C2CMessage, more bool) ([]*pb.C2CMessage, bool) {
	floor := das.MsgidAt(time.Now().Add(-catchUpWindow))
	if more && len(page) > 0 && page[len(page)-1].Msgid < floor {
		return page, more // the recent messages come in a later page
	}
	body, _ := proto.Marshal(&pb.OfflinePullRequest{AfterMsgid: max(after, floor), PageSize: uint32(size)})
	here := s.rooms.DC()
	type answer struct {
		msgs []*pb.C2CMessage
		more bool
	}
	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		answers []answer
	)
	for _, dc := range s.rooms.DCs() {
		if dc == here {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			rb, err := s.rooms.Forward(cctx, dc, sess, &schema.Header{Cmd: schema.CmdOfflinePull, LogID: logid}, body)
			var resp pb.OfflinePullResponse
			if err == nil {
				err = proto.Unmarshal(rb, &resp)
			}
			if err != nil {
				s.log.Info("offline pull: another DC not asked", "dc", dc, "uid", sess.UID, "err", err, "logid", logid)
				return
			}
			mu.Lock()
			answers = append(answers, answer{resp.Messages, resp.More})
			mu.Unlock()
		}()
	}
	wg.Wait()
	seen := make(map[uint64]bool, len(page))
	for _, m := range page {
		seen[m.Msgid] = true
	}
	for _, a := range answers {
		more = more || a.more
		for _, m := range a.msgs {
			if !seen[m.Msgid] {
				seen[m.Msgid] = true
				page = append(page, m)
			}
		}
	}
	slices.SortFunc(page, func(a, b *pb.C2CMessage) int { return cmp.Compare(a.Msgid, b.Msgid) })
	if len(page) > size {
		page, more = page[:size], true
	}
	return page, more
}

// ServeRemoteAck acknowledges msgids for a session of DC dc that its own
// store did not hold yet (see Rooms.Acked).
func (s *Service) ServeRemoteAck(ctx context.Context, dc string, sess router.Session, msgids []uint64, logid uint64) error {
	if s.store == nil {
		return schema.Errorf(schema.StatusUnavailable, "this server has no message store")
	}
	sess.Gate = MirrorGate(dc, sess.Gate)
	_, err := s.ack(ctx, sess, msgids, logid)
	return err
}

// forwardAcks sends the acks of msgids that another DC stored, and this
// DC's store does not hold yet, to that DC.
func (s *Service) forwardAcks(sess router.Session, missing []uint64, logid uint64) {
	if s.rooms == nil || IsMirror(&sess) {
		return
	}
	here := s.rooms.DC()
	byDC := map[string][]uint64{}
	for _, id := range missing {
		if dc := s.rooms.MsgDC(id); dc != "" && dc != here {
			byDC[dc] = append(byDC[dc], id)
		}
	}
	for dc, ids := range byDC {
		s.rooms.Acked(dc, sess, ids, logid)
	}
}

// groupHome returns the DC that orders group id when it is not this one.
func (s *Service) groupHome(id uint64) (string, bool) {
	if s.rooms == nil {
		return "", false
	}
	home := s.rooms.HomeDC(id)
	return home, home != "" && home != s.rooms.DC()
}

// remoteHome reports whether another DC orders group id.
func (s *Service) remoteHome(id uint64) bool {
	_, remote := s.groupHome(id)
	return remote
}

// needHome refuses a change of group id in a DC that does not order it:
// the app-server calls the home DC's HTTP API instead (status 4012).
func (s *Service) needHome(id uint64) error {
	if home, remote := s.groupHome(id); remote {
		return schema.Errorf(schema.StatusOtherDC, "group %d is ordered by data center %s: manage it through that DC's HTTP API", id, home)
	}
	return nil
}
