package logic

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// S2C configures server-to-client pushes through the HTTP API.
type S2C struct {
	// MaxRecipients bounds the recipients of one push. Default 1000.
	MaxRecipients int `yaml:"max_recipients"`
	// MaxContent bounds a push's content. Default 16 KiB.
	MaxContent int `yaml:"max_content"`
	// MaxBody bounds an HTTP request body. Default 1 MiB.
	MaxBody int `yaml:"max_body"`
	// StatsTTL is how long a push's delivery statistics can be asked
	// for. Default 1h.
	StatsTTL time.Duration `yaml:"stats_ttl"`
	// StatsMax bounds the pushes whose statistics a logic node keeps in
	// its memory (without Redis): past it the oldest are dropped before
	// their StatsTTL. Default router.DefaultLedgerMax (1,048,576, about
	// 92 MB when full). In Redis the TTL alone bounds them.
	StatsMax int `yaml:"stats_max"`
	// BroadcastBatch bounds the connections of one gateway call of a
	// broadcast (POST /v1/broadcast). Default 1024.
	BroadcastBatch int `yaml:"broadcast_batch"`
}

func (c *S2C) setDefaults() {
	if c.MaxRecipients <= 0 {
		c.MaxRecipients = 1000
	}
	if c.MaxContent <= 0 {
		c.MaxContent = 16 << 10
	}
	if c.MaxBody <= 0 {
		c.MaxBody = 1 << 20
	}
	if c.StatsTTL <= 0 {
		c.StatsTTL = time.Hour
	}
	if c.StatsMax <= 0 {
		c.StatsMax = router.DefaultLedgerMax
	}
	if c.BroadcastBatch <= 0 {
		c.BroadcastBatch = router.DefaultListPage
	}
}

// Recipient is one (appcode, uid) session address of a push.
type Recipient struct {
	AppCode uint32 `json:"appcode"`
	UID     uint64 `json:"uid"`
}

// PushRequest is one s2c push: the same content to many recipients.
type PushRequest struct {
	To      []Recipient `json:"to"`
	MsgType uint32      `json:"msgtype"`
	Content []byte      `json:"content"` // JSON: base64 (content_text is the plain-text alternative)
	// StoreOffline keeps the message in the inbox of recipients who are
	// offline, for their next login; otherwise they miss it. A recipient
	// whose sessions the router listed but whose gateway could not take
	// the notify (the connection was gone) counts as offline.
	StoreOffline bool `json:"store_offline"`
	// LogID is the request's trace id (the HTTP API's X-Request-Id); 0
	// gets a new one.
	LogID uint64 `json:"-"`
}

// RecipientResult says what happened for one recipient. Exactly one of
// Online, Stored and Dropped is true.
type RecipientResult struct {
	AppCode uint32 `json:"appcode"`
	UID     uint64 `json:"uid"`
	Online  bool   `json:"online"` // the notify was queued on at least one session
	Pushed  int    `json:"pushed"` // sessions the notify was queued for
	// Unreachable counts sessions the router listed whose gateway could
	// not take the notify (connection gone, gateway unreachable); those
	// the gateway reported gone were removed from the router.
	Unreachable int    `json:"unreachable"`
	Stored      bool   `json:"stored"`   // kept in the offline inbox
	Dropped     bool   `json:"dropped"`  // offline and not stored
	Terminal    string `json:"terminal"` // the appcode's name
}

// PushResult is the answer to a push: Online + Stored + Dropped is the
// number of recipients.
type PushResult struct {
	PushID      uint64            `json:"push_id,string"`
	LogID       uint64            `json:"logid,string"`
	Results     []RecipientResult `json:"results"`
	Online      int               `json:"online"`
	Stored      int               `json:"stored"`
	Dropped     int               `json:"dropped"`
	Unreachable int               `json:"unreachable"` // sessions, see RecipientResult
}

// PushStats is what is known of a push's delivery so far (kept in the
// router's PushLedger, so any logic node answers for any push).
type PushStats = router.PushRecord

// AppByKey returns the app that owns API key key, or nil.
func (s *Service) AppByKey(key string) *App {
	if key == "" {
		return nil
	}
	for _, a := range s.apps {
		for _, k := range a.APIKeys {
			if subtle.ConstantTimeCompare([]byte(k), []byte(key)) == 1 {
				return a
			}
		}
	}
	return nil
}

// Push delivers req for app caller: a notify to every online session of
// each recipient and, with StoreOffline, one inbox entry per offline
// recipient (stored once for all of them).
func (s *Service) Push(ctx context.Context, caller *App, req *PushRequest) (*PushResult, error) {
	switch {
	case len(req.To) == 0:
		return nil, schema.Errorf(schema.StatusBadRecipient, "no recipients")
	case len(req.To) > s.s2c.MaxRecipients:
		return nil, schema.Errorf(schema.StatusBadArgument, "%d recipients, over the maximum of %d", len(req.To), s.s2c.MaxRecipients)
	case len(req.Content) == 0:
		return nil, schema.Errorf(schema.StatusEmptyContent, "content is empty")
	case len(req.Content) > s.s2c.MaxContent:
		return nil, schema.Errorf(schema.StatusContentTooLarge, "content is %d bytes, over the maximum of %d", len(req.Content), s.s2c.MaxContent)
	}
	if err := s.limits.allowPush(caller.AppCode); err != nil {
		return nil, err
	}
	users := make([]router.User, len(req.To))
	apps := make([]*App, len(req.To))
	for i, r := range req.To {
		a := s.apps[r.AppCode]
		switch {
		case a == nil:
			return nil, schema.Errorf(schema.StatusUnknownAppCode, "recipient %d: appcode %d is not configured", i, r.AppCode)
		case a.Account != caller.Account:
			return nil, schema.Errorf(schema.StatusBadRecipient, "recipient %d: appcode %d belongs to another account system", i, r.AppCode)
		case r.UID == 0:
			return nil, schema.Errorf(schema.StatusBadRecipient, "recipient %d: uid must be > 0", i)
		}
		apps[i] = a
		users[i] = router.User{Account: a.Account, UID: r.UID}
	}
	if req.StoreOffline && s.store == nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "this server has no message store to keep offline pushes")
	}
	sessions, err := s.router.LookupMany(ctx, users)
	if err != nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	now := time.Now()
	logid := req.LogID
	if logid == 0 {
		logid = schema.NewLogID()
	}
	id, err := s.newID(0, logid)
	if err != nil {
		return nil, err
	}
	// Register the push before the first notify leaves: a fast client may
	// acknowledge it before this call returns.
	if err := s.ledger.Open(ctx, PushStats{PushID: id, AppCode: caller.AppCode, CreatedMS: now.UnixMilli(), Recipients: len(req.To)}, s.s2c.StatsTTL); err != nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "push statistics: %v", err)
	}
	body, _ := proto.Marshal(&pb.S2CNotify{PushId: id, Msgtype: req.MsgType, Content: req.Content, SentAtMs: now.UnixMilli(), NeedAck: true})
	res := &PushResult{PushID: id, LogID: logid, Results: make([]RecipientResult, len(req.To))}
	// One Gate.Push per gateway for the whole fan-out.
	var targets []router.Session
	var owner []int // owner[k]: the recipient index of targets[k]
	for i, r := range req.To {
		for _, ss := range sessions[i] {
			if ss.AppCode == r.AppCode {
				targets = append(targets, ss)
				owner = append(owner, i)
			}
		}
	}
	queued := make([]bool, len(targets))
	s.pushSessions(ctx, targets, schema.CmdS2C, req.MsgType, body, queued, logid)
	for k, i := range owner {
		if queued[k] {
			res.Results[i].Online = true
			res.Results[i].Pushed++
		} else {
			res.Results[i].Unreachable++
			res.Unreachable++
		}
	}
	var offline []das.Terminal
	var offlineIdx []int
	for i, r := range req.To {
		rr := res.Results[i]
		rr.AppCode, rr.UID, rr.Terminal = r.AppCode, r.UID, apps[i].Name
		if rr.Online {
			res.Online++
		} else if req.StoreOffline {
			offline = append(offline, das.Terminal{Account: apps[i].Account, UID: r.UID, AppCode: r.AppCode})
			offlineIdx = append(offlineIdx, i)
		} else {
			rr.Dropped = true
			res.Dropped++
		}
		res.Results[i] = rr
	}
	if len(offline) > 0 {
		m := &pb.C2CMessage{Msgid: id, From: &pb.User{}, FromAppcode: caller.AppCode, To: &pb.User{}, Msgtype: req.MsgType, Content: req.Content, SentAtMs: now.UnixMilli(), Logid: logid}
		if err := s.store.PutInbox(das.WithLogID(ctx, logid), m, offline); err != nil {
			s.log.Warn("s2c store failed", "push_id", id, "terminals", len(offline), "err", err, "logid", logid)
			// The online recipients have it already; say what failed.
			return nil, storeErr("put inbox", err)
		}
		for _, i := range offlineIdx {
			res.Results[i].Stored = true
		}
		res.Stored = len(offline)
	}
	if err := s.ledger.Settle(ctx, id, len(req.To), res.Online, res.Stored, res.Dropped); err != nil {
		// The push itself went out: say so, and log what the statistics missed.
		s.log.Warn("push statistics not settled", "push_id", id, "err", err, "logid", logid)
	}
	s.log.Debug("s2c push", "push_id", id, "appcode", caller.AppCode, "recipients", len(req.To), "online", res.Online, "stored", res.Stored, "dropped", res.Dropped, "unreachable", res.Unreachable, "logid", logid)
	s.mPush.WithLabelValues("online").Add(float64(res.Online))
	s.mPush.WithLabelValues("stored").Add(float64(res.Stored))
	s.mPush.WithLabelValues("dropped").Add(float64(res.Dropped))
	return res, nil
}

// NoStatsError is PushStats's answer for a push whose statistics it
// cannot give; its message says why (the HTTP API answers 404).
type NoStatsError struct{ Msg string }

func (e *NoStatsError) Error() string { return e.Msg }

// PushStats returns the delivery statistics of push id, if caller's
// account system made it and they are still kept; else a *NoStatsError
// saying why not, as far as that tells nothing of other account systems'
// pushes.
func (s *Service) PushStats(ctx context.Context, caller *App, id uint64) (PushStats, error) {
	st, ok, err := s.ledger.Get(ctx, id)
	switch {
	case errors.Is(err, router.ErrStatsEvicted):
		return PushStats{}, &NoStatsError{fmt.Sprintf("statistics expired: push %d was dropped to keep this node's push statistics within s2c.stats_max (the newest %d pushes are kept)", id, s.s2c.StatsMax)}
	case err != nil:
		return PushStats{}, schema.Errorf(schema.StatusUnavailable, "push statistics: %v", err)
	case ok && s.apps[st.AppCode] != nil && s.apps[st.AppCode].Account == caller.Account:
		return st, nil
	case !ok && time.Since(das.MsgTime(id)) > s.s2c.StatsTTL:
		return PushStats{}, &NoStatsError{fmt.Sprintf("statistics expired: push %d is older than s2c.stats_ttl (%s), or unknown", id, s.s2c.StatsTTL)}
	}
	return PushStats{}, &NoStatsError{fmt.Sprintf("push %d is unknown or not yours", id)}
}

// PushStatsKept returns how many pushes' statistics this node keeps in
// its memory (s2c.stats_max bounds them), or -1 when they are kept
// elsewhere (Redis).
func (s *Service) PushStatsKept() int {
	if l, ok := s.ledger.(*router.MemoryLedger); ok {
		return l.Len()
	}
	return -1
}

// pushAcked counts the arrival of pushes acknowledged by a terminal.
func (s *Service) pushAcked(ctx context.Context, ids []uint64, logid uint64) {
	n, err := s.ledger.Acked(ctx, ids)
	if err != nil {
		s.log.Warn("push acks not counted", "pushes", len(ids), "err", err, "logid", logid)
	}
	s.mPushAcks.Add(float64(n))
}

// Presence returns the sessions of uid in caller's account system.
func (s *Service) Presence(ctx context.Context, caller *App, uid uint64) ([]router.Session, error) {
	if uid == 0 {
		return nil, schema.Errorf(schema.StatusBadRecipient, "uid must be > 0")
	}
	ss, err := s.router.Lookup(ctx, router.User{Account: caller.Account, UID: uid})
	if err != nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	return ss, nil
}

// s2cAck records acks of live pushes (a client notify).
func (s *Service) s2cAck(ctx context.Context, _ router.Session, h *schema.Header, body []byte) ([]byte, error) {
	var req pb.S2CAck
	if err := proto.Unmarshal(body, &req); err != nil {
		return nil, badBody(h.Cmd, err)
	}
	if len(req.PushIds) > s.c2c.MaxPage {
		return nil, schema.Errorf(schema.StatusBadArgument, "at most %d push ids per ack", s.c2c.MaxPage)
	}
	s.pushAcked(ctx, req.PushIds, h.LogID)
	return nil, nil
}
