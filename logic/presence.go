package logic

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// Presence configures presence subscriptions.
type Presence struct {
	// MaxFollowed bounds the users one session may follow (4011 beyond).
	// Default 200.
	MaxFollowed int `yaml:"max_followed"`
}

func (p *Presence) setDefaults() {
	if p.MaxFollowed <= 0 {
		p.MaxFollowed = 200
	}
}

// presence is the Service's presence part. p is nil when the router keeps
// no presence (a Router that does not implement router.Presence): then
// sessions change as before and the presence commands are unavailable.
type presence struct {
	p   router.Presence
	cfg Presence

	mChanges  *prometheus.CounterVec
	mNotifies prometheus.Counter
	mDropped  prometheus.Counter
}

// initPresence sets up the presence part from opts.
func (s *Service) initPresence(opts Options) error {
	s.pres.p, _ = opts.Router.(router.Presence)
	s.pres.cfg = opts.Presence
	s.pres.cfg.setDefaults()
	s.pres.mChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "presence_changes_total",
		Help: "Presence changes this node made, by state: online (a user's first session), offline (its last one left).",
	}, []string{"state"})
	s.pres.mNotifies = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "presence_notifies_total",
		Help: "Presence notifies queued on a following session's connection.",
	})
	s.pres.mDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "presence_subscriptions_dropped_total",
		Help: "Sessions whose subscriptions were dropped lazily: a change found them following although they had ended.",
	})
	if opts.Registry != nil {
		for _, c := range []prometheus.Collector{s.pres.mChanges, s.pres.mNotifies, s.pres.mDropped} {
			if err := opts.Registry.Register(c); err != nil {
				return fmt.Errorf("logic: metrics: %w", err)
			}
		}
	}
	return nil
}

// register adds sess to the router and tells its user's followers when it
// is the user's first session. The sessions it evicts end, and with them
// their subscriptions; the caller kicks them.
func (s *Service) register(ctx context.Context, sess router.Session, maxPerTerminal int, logid uint64) ([]router.Session, error) {
	if s.pres.p == nil {
		evicted, err := s.router.Register(ctx, sess, maxPerTerminal)
		if err == nil {
			s.roomsChanged(&sess, true)
		}
		return evicted, err
	}
	evicted, ch, err := s.pres.p.RegisterChange(ctx, sess, maxPerTerminal)
	for _, old := range evicted {
		s.unfollow(ctx, old)
	}
	if err != nil {
		return evicted, err
	}
	s.roomsChanged(&sess, true)
	s.publish(ctx, ch, logid)
	return evicted, nil
}

// unregister removes exactly the login sess from the router, drops its
// subscriptions, and tells its user's followers when it was the user's
// last session.
func (s *Service) unregister(ctx context.Context, sess router.Session, logid uint64) (bool, error) {
	if s.pres.p == nil {
		removed, err := s.router.Unregister(ctx, sess)
		if removed {
			s.roomsChanged(&sess, false)
		}
		return removed, err
	}
	removed, ch, err := s.pres.p.UnregisterChange(ctx, sess)
	if err != nil {
		return false, err
	}
	if removed {
		s.roomsChanged(&sess, false)
		s.unfollow(ctx, sess)
	}
	s.publish(ctx, ch, logid)
	return removed, nil
}

// purgeGate removes the sessions of a gateway that stopped, with their
// subscriptions, and tells the followers of every user left offline.
func (s *Service) purgeGate(ctx context.Context, gate string) (int, error) {
	if s.rooms != nil && !strings.HasPrefix(gate, "@") {
		s.rooms.GatePurged(gate)
	}
	if s.pres.p == nil {
		return s.router.PurgeGate(ctx, gate)
	}
	purged, offline, err := s.pres.p.PurgeGateChanges(ctx, gate)
	for _, old := range purged {
		s.unfollow(ctx, old)
	}
	for _, ch := range offline {
		s.publish(ctx, ch, 0)
	}
	return len(purged), err
}

func (s *Service) unfollow(ctx context.Context, sess router.Session) {
	if err := s.pres.p.Unfollow(ctx, sess); err != nil {
		// Left behind, they are dropped at the next change of a user
		// they follow (publish checks that followers still exist).
		s.log.Warn("presence: drop the subscriptions of an ended session", "uid", sess.UID, "appcode", sess.AppCode, "err", err)
	}
}

// publish pushes ch to the sessions that follow its user, with one push
// per gateway. Followers whose session ended without its subscriptions
// being dropped (a node that died half way, a subscribe racing the end of
// its connection) are found here, against the router, and dropped.
func (s *Service) publish(ctx context.Context, ch router.Change, logid uint64) {
	if !ch.Changed() {
		return
	}
	state := "offline"
	if ch.Online {
		state = "online"
	}
	s.pres.mChanges.WithLabelValues(state).Inc()
	subs, err := s.pres.p.Followers(ctx, ch.User)
	if err != nil {
		s.log.Warn("presence: followers", "account", ch.User.Account, "uid", ch.User.UID, "err", err, "logid", logid)
		return
	}
	if len(subs) == 0 {
		return
	}
	live, err := s.liveSessions(ctx, subs)
	if err != nil {
		s.log.Warn("presence: check followers", "account", ch.User.Account, "uid", ch.User.UID, "err", err, "logid", logid)
		return
	}
	if len(live) == 0 {
		return
	}
	body, _ := proto.Marshal(&pb.PresenceNotify{
		User:     &pb.User{Account: ch.User.Account, Uid: ch.User.UID},
		Online:   ch.Online,
		Version:  ch.Version,
		AtMs:     ch.AtMS,
		Appcodes: ch.Apps,
	})
	s.pres.mNotifies.Add(float64(s.pushCount(ctx, live, schema.CmdPresenceNotify, 0, body, logid)))
}

// liveSessions returns the sessions of subs that the router still holds,
// and drops the subscriptions of the others.
func (s *Service) liveSessions(ctx context.Context, subs []router.Session) ([]router.Session, error) {
	var users []router.User
	for i := range subs {
		if u := subs[i].User(); !slices.Contains(users, u) {
			users = append(users, u)
		}
	}
	now, err := s.router.LookupMany(ctx, users)
	if err != nil {
		return nil, err
	}
	live := subs[:0:0]
	for i := range subs {
		held := now[slices.Index(users, subs[i].User())]
		if slices.ContainsFunc(held, func(o router.Session) bool { return o.Same(&subs[i]) }) {
			live = append(live, subs[i])
			continue
		}
		s.pres.mDropped.Inc()
		s.unfollow(ctx, subs[i])
	}
	return live, nil
}

func (s *Service) needPresence() error {
	if s.pres.p == nil {
		return schema.Errorf(schema.StatusUnavailable, "this server's router keeps no presence")
	}
	return nil
}

// notifyOf is a user's presence state as the protocol carries it. The
// version is the router's clock of the last change, in microseconds, so
// at_ms is read from it.
func notifyOf(u router.User, st router.State) *pb.PresenceNotify {
	n := &pb.PresenceNotify{
		User:    &pb.User{Account: u.Account, Uid: u.UID},
		Online:  len(st.Sessions) > 0,
		Version: st.Version,
		AtMs:    int64(st.Version / 1000),
	}
	for i := range st.Sessions {
		if a := st.Sessions[i].AppCode; !slices.Contains(n.Appcodes, a) {
			n.Appcodes = append(n.Appcodes, a)
		}
	}
	return n
}

// presenceSubscribe replaces the session's followed list and answers the
// state of each user now. The subscription is written before the state is
// read, so a change in between is both pushed and answered (with the same
// version, which the client drops once).
func (s *Service) presenceSubscribe(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needPresence(); err != nil {
		return nil, err
	}
	var req pb.PresenceSubscribeRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	users := make([]router.User, 0, len(req.Users))
	for _, u := range req.Users {
		if u.GetAccount() == 0 || u.GetUid() == 0 {
			return nil, schema.Errorf(schema.StatusBadRecipient, "a followed user needs an account and a uid > 0")
		}
		if ru := (router.User{Account: u.Account, UID: u.Uid}); !slices.Contains(users, ru) {
			users = append(users, ru)
		}
	}
	if len(users) > s.pres.cfg.MaxFollowed {
		return nil, schema.Errorf(schema.StatusTooManyFollowed, "%d users, over the bound of %d", len(users), s.pres.cfg.MaxFollowed)
	}
	if err := s.pres.p.Follow(ctx, sess, users); err != nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	// A connection that closed meanwhile had its subscriptions dropped
	// before this Follow wrote them: take them back out.
	if held, err := s.router.Lookup(ctx, sess.User()); err == nil && !slices.ContainsFunc(held, func(o router.Session) bool { return o.Same(&sess) }) {
		s.unfollow(ctx, sess)
	}
	states, err := s.pres.p.States(ctx, users)
	if err != nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	resp := &pb.PresenceSubscribeResponse{States: make([]*pb.PresenceNotify, len(users))}
	for i, u := range users {
		resp.States[i] = notifyOf(u, states[i])
	}
	return proto.Marshal(resp)
}

// presenceBatch is how many members group-presence looks up per round trip.
const presenceBatch = 256

// groupPresence pages the online members of a group, in (account, uid)
// order after the request's cursor. Only a member may ask.
func (s *Service) groupPresence(ctx context.Context, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	if err := s.needPresence(); err != nil {
		return nil, err
	}
	if err := s.needGroups(); err != nil {
		return nil, err
	}
	var req pb.GroupPresenceRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	size, err := s.pageSize(req.PageSize, "page size")
	if err != nil {
		return nil, err
	}
	members, _, err := s.groupCache.Members(ctx, req.GroupId, 0)
	if err != nil {
		return nil, groupErr("group presence", err)
	}
	me := das.User{Account: sess.Account, UID: sess.UID}
	if !slices.ContainsFunc(members, func(m das.Member) bool { return m.User == me }) {
		return nil, schema.Errorf(schema.StatusNotMember, "not a member of group %d", req.GroupId)
	}
	after := router.User{Account: req.GetAfter().GetAccount(), UID: req.GetAfter().GetUid()}
	users := make([]router.User, 0, len(members))
	for _, m := range members {
		if u := (router.User{Account: m.User.Account, UID: m.User.UID}); compareUsers(u, after) > 0 {
			users = append(users, u)
		}
	}
	slices.SortFunc(users, compareUsers)
	resp := &pb.GroupPresenceResponse{}
	// Walk the members in batches until the page is full and one more
	// online member shows that there is a next page.
	for start := 0; start < len(users) && !resp.More; start += presenceBatch {
		batch := users[start:min(start+presenceBatch, len(users))]
		states, err := s.pres.p.States(ctx, batch)
		if err != nil {
			return nil, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
		}
		for i, u := range batch {
			if len(states[i].Sessions) == 0 {
				continue
			}
			if len(resp.Online) == size {
				resp.More = true
				break
			}
			resp.Online = append(resp.Online, notifyOf(u, states[i]))
		}
	}
	return proto.Marshal(resp)
}

func compareUsers(a, b router.User) int {
	return cmp.Or(cmp.Compare(a.Account, b.Account), cmp.Compare(a.UID, b.UID))
}
