package logic

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// A broadcast is a push to every online terminal of one appcode (the
// seeds' system messages; POST /v1/broadcast). It is encoded once, the
// router lists the appcode's sessions gateway by gateway
// (router.SessionLister: no lookup per user), and each gateway gets one
// Gate.Push per page of at most S2C.BroadcastBatch of its connections, a
// few gateway calls in flight at a time. Terminals that are offline do
// not get it, now or later: nothing is stored.
//
// In a many-DC deployment each DC pushes to the sessions its own gateways
// hold (never to the "@dc/gate" mirrors of other DCs' sessions), and the
// DC that took the request forwards it once to every other DC
// (peer-broadcast), so a terminal gets it once, from its own DC. Each DC
// keeps the statistics of its own part under the same push id.

// broadcastInFlight bounds the gateway calls of one broadcast in flight.
const broadcastInFlight = 8

// gatewayRole is the membership role of gateways (internal/platform
// heartbeats them under it): a router that keeps the membership (Redis)
// lists the gateways whose sessions a broadcast walks.
const gatewayRole = "gateway"

// BroadcastRequest is a push to every online terminal of one appcode.
type BroadcastRequest struct {
	// AppCode is the terminals' appcode, of the caller's account system;
	// 0 is the caller's own.
	AppCode uint32
	MsgType uint32
	Content []byte
	// DCs names the data centers whose terminals get it; nil: every one.
	DCs []string
	// LogID is the request's trace id; 0 gets a new one.
	LogID uint64
}

// BroadcastPart is what one data center did with a broadcast. Its
// counts are sessions (terminals' connections).
type BroadcastPart struct {
	DC string `json:"dc,omitempty"`
	// Recipients are the sessions of the appcode its router listed.
	Recipients int `json:"recipients"`
	// Online are those whose gateway took the notify.
	Online int `json:"online"`
	// Unreachable are those whose gateway could not take it (the
	// connection was gone, the gateway unreachable).
	Unreachable int `json:"unreachable"`
	// Gates counts the gateways that held some.
	Gates int `json:"gates"`
	// Error says why the DC's part failed or stopped short; its terminals
	// did not get the broadcast (or not all of them: the counts say how
	// many did).
	Error string `json:"error,omitempty"`
}

// BroadcastResult is the answer to a broadcast: each data center's part
// and their sums.
type BroadcastResult struct {
	PushID      uint64          `json:"push_id,string"`
	LogID       uint64          `json:"logid,string"`
	AppCode     uint32          `json:"appcode"`
	Terminal    string          `json:"terminal"` // the appcode's name
	Recipients  int             `json:"recipients"`
	Online      int             `json:"online"`
	Unreachable int             `json:"unreachable"`
	Gates       int             `json:"gates"`
	DCs         []BroadcastPart `json:"dcs"`
}

// BroadcastRooms is a Rooms that also carries broadcasts to the other
// data centers (internal/rpc's does).
type BroadcastRooms interface {
	Rooms
	// Broadcast asks DC dc to push notify (an encoded S2CNotify) to every
	// session of appcode its own gateways hold, and returns its part. It
	// waits for dc's answer and keeps nothing for a link that is down.
	Broadcast(ctx context.Context, dc string, appcode uint32, notify []byte, logid uint64) (BroadcastPart, error)
}

// gatewayMembers is a router that also keeps the node membership.
type gatewayMembers interface {
	Live(ctx context.Context, role string) ([]router.Node, error)
}

// Broadcast pushes req to every online terminal of its appcode, in every
// data center it names.
func (s *Service) Broadcast(ctx context.Context, caller *App, req *BroadcastRequest) (*BroadcastResult, error) {
	code := req.AppCode
	if code == 0 {
		code = caller.AppCode
	}
	a := s.apps[code]
	switch {
	case a == nil:
		return nil, schema.Errorf(schema.StatusUnknownAppCode, "appcode %d is not configured", code)
	case a.Account != caller.Account:
		return nil, schema.Errorf(schema.StatusBadRecipient, "appcode %d belongs to another account system", code)
	case len(req.Content) == 0:
		return nil, schema.Errorf(schema.StatusEmptyContent, "content is empty")
	case len(req.Content) > s.s2c.MaxContent:
		return nil, schema.Errorf(schema.StatusContentTooLarge, "content is %d bytes, over the maximum of %d", len(req.Content), s.s2c.MaxContent)
	}
	here, others, err := s.broadcastScope(req.DCs)
	if err != nil {
		return nil, err
	}
	if err := s.limits.allowPush(caller.AppCode); err != nil {
		return nil, err
	}
	logid := req.LogID
	if logid == 0 {
		logid = schema.NewLogID()
	}
	id, err := s.newID(0, logid)
	if err != nil {
		return nil, err
	}
	now := time.Now().UnixMilli()
	body, _ := proto.Marshal(&pb.S2CNotify{PushId: id, Msgtype: req.MsgType, Content: req.Content, SentAtMs: now, NeedAck: true})
	res := &BroadcastResult{PushID: id, LogID: logid, AppCode: code, Terminal: a.Name}
	if here {
		// Register the push before the first notify leaves: a fast
		// client may acknowledge it before this call returns.
		if err := s.ledger.Open(ctx, PushStats{PushID: id, AppCode: code, CreatedMS: now, Broadcast: true}, s.s2c.StatsTTL); err != nil {
			return nil, schema.Errorf(schema.StatusUnavailable, "push statistics: %v", err)
		}
	}
	remote := make([]BroadcastPart, len(others))
	var wg sync.WaitGroup
	if len(others) > 0 {
		br := s.rooms.(BroadcastRooms)
		for i, dc := range others {
			wg.Go(func() {
				p, err := br.Broadcast(ctx, dc, code, body, logid)
				if err != nil {
					p = BroadcastPart{Error: err.Error()}
					s.log.Warn("broadcast: another DC's part failed", "dc", dc, "push_id", id, "err", err, "logid", logid)
				}
				p.DC = dc
				remote[i] = p
			})
		}
	}
	var parts []BroadcastPart
	if here {
		p := s.broadcastHere(ctx, id, code, req.MsgType, body, logid)
		if s.rooms != nil {
			p.DC = s.rooms.DC()
		}
		parts = append(parts, p)
	}
	wg.Wait()
	parts = append(parts, remote...)
	failed := 0
	for _, p := range parts {
		res.Recipients += p.Recipients
		res.Online += p.Online
		res.Unreachable += p.Unreachable
		res.Gates += p.Gates
		if p.Error != "" && p.Recipients == 0 {
			failed++
		}
	}
	res.DCs = parts
	if failed == len(parts) && parts[0].Error != "" {
		return nil, schema.Errorf(schema.StatusUnavailable, "broadcast reached no data center: %s", parts[0].Error)
	}
	s.log.Info("s2c broadcast", "push_id", id, "appcode", code, "caller", caller.AppCode, "dcs", len(parts), "recipients", res.Recipients, "online", res.Online, "unreachable", res.Unreachable, "gates", res.Gates, "logid", logid)
	return res, nil
}

// broadcastScope says whether this DC and which others a broadcast to dcs
// (nil: every one) reaches.
func (s *Service) broadcastScope(dcs []string) (here bool, others []string, err error) {
	br, ok := s.rooms.(BroadcastRooms)
	if !ok {
		if len(dcs) > 0 {
			return false, nil, schema.Errorf(schema.StatusBadArgument, "dcs: this node reaches no other data center; leave dcs out")
		}
		return true, nil, nil
	}
	all, this := br.DCs(), s.rooms.DC()
	if len(dcs) == 0 {
		dcs = all
	}
	for _, dc := range dcs {
		switch {
		case !slices.Contains(all, dc):
			return false, nil, schema.Errorf(schema.StatusBadArgument, "dcs: unknown data center %q (the data centers are %v)", dc, all)
		case dc == this:
			here = true
		case !slices.Contains(others, dc):
			others = append(others, dc)
		}
	}
	return here, others, nil
}

// ServeBroadcast is this DC's part of a broadcast that DC dc took
// (peer-broadcast): notify, an encoded S2CNotify, to every session of
// appcode that this DC's gateways hold, with its statistics kept here
// under its push id.
func (s *Service) ServeBroadcast(ctx context.Context, dc string, appcode uint32, notify []byte, logid uint64) (BroadcastPart, error) {
	var n pb.S2CNotify
	if err := proto.Unmarshal(notify, &n); err != nil || n.PushId == 0 {
		return BroadcastPart{}, schema.Errorf(schema.StatusBadBody, "broadcast from %s: not an S2CNotify with a push id (%v)", dc, err)
	}
	if s.apps[appcode] == nil {
		return BroadcastPart{}, schema.Errorf(schema.StatusUnknownAppCode, "appcode %d is not configured in this data center", appcode)
	}
	if err := s.ledger.Open(ctx, PushStats{PushID: n.PushId, AppCode: appcode, CreatedMS: n.SentAtMs, Broadcast: true}, s.s2c.StatsTTL); err != nil {
		return BroadcastPart{}, schema.Errorf(schema.StatusUnavailable, "push statistics: %v", err)
	}
	p := s.broadcastHere(ctx, n.PushId, appcode, n.Msgtype, notify, logid)
	if s.rooms != nil {
		p.DC = s.rooms.DC()
	}
	s.log.Info("s2c broadcast from another DC", "from", dc, "push_id", n.PushId, "appcode", appcode, "recipients", p.Recipients, "online", p.Online, "unreachable", p.Unreachable, "gates", p.Gates, "err", p.Error, "logid", logid)
	return p, nil
}

// broadcastHere pushes body to every session of appcode that this DC's
// gateways hold and settles push id's statistics (opened by the caller).
func (s *Service) broadcastHere(ctx context.Context, id uint64, appcode, msgtype uint32, body []byte, logid uint64) BroadcastPart {
	p, err := s.broadcastFanOut(ctx, appcode, msgtype, body, logid)
	if err != nil {
		p.Error = err.Error()
		s.log.Warn("broadcast stopped short", "push_id", id, "appcode", appcode, "online", p.Online, "err", err, "logid", logid)
	}
	if err := s.ledger.Settle(ctx, id, p.Recipients, p.Online, 0, p.Unreachable); err != nil {
		s.log.Warn("push statistics not settled", "push_id", id, "err", err, "logid", logid)
	}
	s.mPush.WithLabelValues("online").Add(float64(p.Online))
	s.mPush.WithLabelValues("dropped").Add(float64(p.Unreachable))
	return p
}

// broadcastFanOut lists the sessions of appcode on this DC's gateways and
// pushes body to them, a page per gateway call. The counts cover what was
// pushed when it fails midway.
func (s *Service) broadcastFanOut(ctx context.Context, appcode, msgtype uint32, body []byte, logid uint64) (BroadcastPart, error) {
	var p BroadcastPart
	lister, ok := s.router.(router.SessionLister)
	if !ok {
		return p, schema.Errorf(schema.StatusUnavailable, "this node's router cannot list sessions for a broadcast")
	}
	gates, err := s.broadcastGates(ctx)
	if err != nil {
		return p, schema.Errorf(schema.StatusUnavailable, "membership: %v", err)
	}
	var (
		mu   sync.Mutex
		seen = map[string]bool{}
		wg   sync.WaitGroup
		sem  = make(chan struct{}, broadcastInFlight)
	)
	err = lister.ListSessions(ctx, gates, appcode, s.s2c.BroadcastBatch, func(gate string, ss []router.Session) error {
		if IsMirror(&ss[0]) {
			return nil // another DC's session: that DC pushes to it
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		wg.Go(func() {
			defer func() { <-sem }()
			queued := make([]bool, len(ss))
			s.pushSessions(ctx, ss, schema.CmdS2C, msgtype, body, queued, logid)
			n := 0
			for _, q := range queued {
				if q {
					n++
				}
			}
			mu.Lock()
			p.Recipients += len(ss)
			p.Online += n
			p.Unreachable += len(ss) - n
			seen[gate] = true
			mu.Unlock()
		})
		return nil
	})
	wg.Wait()
	p.Gates = len(seen)
	if err != nil {
		return p, schema.Errorf(schema.StatusUnavailable, "router: listing the sessions: %v", err)
	}
	return p, nil
}

// broadcastGates returns the gateways whose sessions a broadcast walks:
// nil (every one) for a router that lists them itself (in-process);
// with a router that keeps the membership (Redis), the live gateways of
// this DC and those this node reaches.
func (s *Service) broadcastGates(ctx context.Context) ([]string, error) {
	m, ok := s.router.(gatewayMembers)
	if !ok {
		return nil, nil
	}
	nodes, err := m.Live(ctx, gatewayRole)
	if err != nil {
		return nil, err
	}
	here := ""
	if s.rooms != nil {
		here = s.rooms.DC()
	}
	gates := s.Gates()
	for _, n := range nodes {
		if here == "" || n.DC == "" || n.DC == here {
			gates = append(gates, n.ID)
		}
	}
	slices.Sort(gates)
	return slices.Compact(append(make([]string, 0, len(gates)), gates...)), nil
}
