// Package logic is the stateless tier: login and authentication per appcode,
// and every request a gateway forwards. Any logic node can serve any request;
// the state it needs lives in the router (who is online) and in das (what is
// stored).
package logic

import (
	"context"
	"errors"
	"fmt"
	"github.com/imd-dev/imd/bus"
	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/internal/acl"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/prometheus/client_golang/prometheus"
)

// API is what a gateway calls. In one process it is *Service; across
// processes an RPC client implements it. All methods are safe for concurrent
// use. Errors meant for the client are *schema.Error.
type API interface {
	// Login authenticates in and registers the session; sessions it
	// replaces are kicked through their gateways before it returns.
	Login(ctx context.Context, in LoginInput) (LoginResult, error)
	// Logout removes the session.
	Logout(ctx context.Context, s router.Session) error
	// Disconnected tells logic that the connection of s closed without a
	// logout. It must not fail: it is best effort cleanup.
	Disconnected(ctx context.Context, s router.Session)
	// Handle serves any other request of a logged-in session and returns
	// the marshalled response body.
	Handle(ctx context.Context, s router.Session, h *schema.Header, body []byte) ([]byte, error)
}

// Gate is what logic needs from a gateway: acting on its connections. In one
// process it is *gateway.Server. All methods are safe for concurrent use.
type Gate interface {
	// Kick sends k to connection conn and then closes it. logid is the
	// trace id of the login that caused it.
	Kick(ctx context.Context, conn uint64, k *pb.Kickout, logid uint64) error
	// Push queues one notify with an encoded body for each connection in
	// conns and sets queued[i] (len(queued) == len(conns)) when conns[i]
	// took it; a connection that is gone or too slow is false. The
	// notify's frame carries logid, the trace id of what caused it. A
	// fan-out to many connections of one gateway is one call (one
	// internal frame across processes). An error means the gateway itself
	// is unreachable.
	Push(ctx context.Context, conns []uint64, cmd schema.Cmd, msgtype uint32, logid uint64, body []byte, queued []bool) error
}

// LoginInput is a login as the gateway saw it.
type LoginInput struct {
	AppCode  uint32
	UID      uint64
	Token    string
	DeviceID string
	Platform string
	Gate     string
	Conn     uint64
	LogID    uint64
}

// LoginResult is what a successful login returns to the gateway.
type LoginResult struct {
	Session router.Session
	Evicted int // sessions kicked because of this login
}

// Options configures a Service.
type Options struct {
	Apps     []App
	Auth     Authenticator // apps of kind hmac; nil: HMACAuth (jwt and http apps get their own)
	Router   router.Router
	Logger   *slog.Logger
	Registry prometheus.Registerer // nil: metrics are not registered
	// Store keeps c2c messages; nil serves no c2c (StatusUnavailable).
	Store das.Store
	// NodeID is this logic node's snowflake node id (0-1023), unique in
	// the cluster, so msgids never collide. -1: none yet, and no id is
	// minted (requests that need one get StatusUnavailable) until
	// HoldNodeID gives one: a node that leases its id (logic/ids.go).
	NodeID int64
	C2C    C2C
	S2C    S2C
	// Bus carries c2s messages to app-servers; nil serves no c2s.
	Bus bus.Producer
	C2S C2S
	// PushLedger keeps push statistics; nil keeps them in this node's
	// memory (one logic node). A cluster shares one (the router's Redis)
	// so that any node counts acks and answers for any push.
	PushLedger router.PushLedger
	// GroupStore keeps groups; nil uses Store when it implements
	// das.GroupStore (both engines do), else serves no groups.
	GroupStore das.GroupStore
	Groups     Groups
	Transient  Transient
	// Limits are the per-node rate limits (limits.go); off by default.
	Limits Limits
	// ACL, when set, refuses its blocked uids at login (StatusForbidden);
	// SetACL changes it and kicks the users it newly blocks. nil: an
	// empty ACL of this service's own.
	ACL *acl.ACL
	// ConvStore keeps conversation summaries and read marks; nil uses
	// Store when it implements das.ConvStore (both engines do).
	ConvStore das.ConvStore
	// GroupChanged, when set, is called after this node changed a group's
	// membership, to invalidate the members caches of the other logic
	// nodes (the platform publishes through Redis).
	GroupChanged func(ctx context.Context, id uint64)

	// Presence bounds presence subscriptions. Presence needs a router
	// that implements router.Presence (both do).
	Presence Presence

	// Clock is the wall clock that msgids carry; nil is time.Now. Tests
	// skew it.
	Clock func() time.Time
	// MaxClockSkew bounds how far ahead of this node's clock a sender's
	// order floor (C2CSendRequest.after_msgid) is followed; a floor
	// beyond it is clamped, logged and counted. Default 1 minute.
	MaxClockSkew time.Duration
}

// Service implements API in-process.
type Service struct {
	apps   map[uint32]*App
	auth   Authenticator
	auths  map[uint32]Authenticator // each appcode's login check, by its Auth.Kind
	router router.Router
	log    *slog.Logger

	epoch atomic.Uint64 // the last login's epoch (nextEpoch)
	rooms Rooms         // the other DCs; nil: one DC

	gatesMu sync.RWMutex
	gates   map[string]Gate

	store  das.Store
	ids    *idGen
	c2c    C2C
	s2c    S2C
	ledger router.PushLedger

	groups       das.GroupStore
	groupCache   *das.GroupCache
	groupCfg     Groups
	groupChanged func(ctx context.Context, id uint64)

	transientLimits *limiters
	limits          *limits
	acl             *acl.ACL
	conv            das.ConvStore
	bus             bus.Producer
	routes          map[routeKey]string
	c2sMax          int
	accounts        map[uint32][]uint32 // account system -> its appcodes (the inbox terminals)

	mLogins      *prometheus.CounterVec
	mKicks       prometheus.Counter
	mC2C         *prometheus.CounterVec
	mC2CNotifies prometheus.Counter
	mC2CAcks     prometheus.Counter
	mPush        *prometheus.CounterVec
	mPushAcks    prometheus.Counter
	mC2S         *prometheus.CounterVec
	mUndelivered *prometheus.CounterVec
	mStale       prometheus.Counter

	pres presence

	mGroup         *prometheus.CounterVec
	mGroupNotifies prometheus.Counter
	mGroupAcks     prometheus.Counter
	mTransient     *prometheus.CounterVec
	mConvSyncs     prometheus.Counter
	mConvChanged   prometheus.Counter
}

var _ API = (*Service)(nil)

// New validates opts and returns a Service.
func New(opts Options) (*Service, error) {
	if opts.Router == nil {
		return nil, errors.New("logic: Router is required")
	}
	s := &Service{
		apps:     make(map[uint32]*App, len(opts.Apps)),
		auths:    make(map[uint32]Authenticator, len(opts.Apps)),
		auth:     opts.Auth,
		router:   opts.Router,
		log:      opts.Logger,
		gates:    make(map[string]Gate),
		store:    opts.Store,
		c2c:      opts.C2C,
		s2c:      opts.S2C,
		accounts: make(map[uint32][]uint32),
		ledger:   opts.PushLedger,
		acl:      opts.ACL,
	}
	if s.acl == nil {
		s.acl, _ = acl.New(acl.Lists{})
	}
	if s.ledger == nil {
		s.ledger = router.NewMemoryLedger(opts.S2C.StatsMax) // bounded: s2c.stats_max
	}
	s.c2c.setDefaults()
	s.groupCfg = opts.Groups
	s.groupCfg.setDefaults()
	s.groupChanged = opts.GroupChanged
	tr := opts.Transient
	tr.setDefaults()
	s.transientLimits = newLimiters(tr)
	lim, limErr := newLimits(opts.Limits, opts.Registry)
	if limErr != nil {
		return nil, limErr
	}
	s.limits = lim
	s.conv = opts.ConvStore
	if s.conv == nil {
		s.conv, _ = opts.Store.(das.ConvStore)
	}
	s.groups = opts.GroupStore
	if s.groups == nil {
		s.groups, _ = opts.Store.(das.GroupStore)
	}
	if s.groups != nil {
		gc, err := das.NewGroupCache(s.groups, s.groupCfg.CacheEntries, opts.Registry)
		if err != nil {
			return nil, fmt.Errorf("logic: group cache: %w", err)
		}
		s.groupCache = gc
	}
	s.s2c.setDefaults()
	s.bus = opts.Bus
	c2s := opts.C2S
	routes, err := c2s.compile()
	if err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	s.routes, s.c2sMax = routes, c2s.MaxContent
	if s.ids, err = newIDGen(opts); err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	if s.auth == nil {
		s.auth = HMACAuth{}
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	var errs []error
	keys := map[string]uint32{}
	for i := range opts.Apps {
		a := opts.Apps[i]
		if err := a.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		if _, dup := s.apps[a.AppCode]; dup {
			errs = append(errs, fmt.Errorf("appcode %d configured twice", a.AppCode))
			continue
		}
		auth, err := newAuthenticator(&a, s.auth, s.log)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.apps[a.AppCode] = &a
		s.auths[a.AppCode] = auth
		for _, k := range a.APIKeys {
			if other, dup := keys[k]; dup {
				errs = append(errs, fmt.Errorf("appcodes %d and %d share an api key: a key must name one app", other, a.AppCode))
			}
			keys[k] = a.AppCode
		}
		s.accounts[a.Account] = append(s.accounts[a.Account], a.AppCode)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	s.epoch.Store(uint64(time.Now().UnixNano()))
	s.mLogins = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "logins_total",
		Help: "Login attempts by resulting status.",
	}, []string{"status"})
	s.mKicks = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "kickouts_total",
		Help: "Sessions kicked because the same terminal logged in again.",
	})
	s.mC2C = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "c2c_sends_total",
		Help: "c2c send requests by result: stored, duplicate (a retry of a stored message), out_of_order (an ordered send whose predecessor is not stored: 3005), store_error.",
	}, []string{"result"})
	s.mC2CNotifies = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "c2c_notifies_total",
		Help: "c2c notifies queued on a terminal's connection (the recipient's terminals and the sender's other ones).",
	})
	s.mC2CAcks = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "c2c_acks_total",
		Help: "c2c messages acknowledged by a terminal (live or from its inbox): each is a delivery that arrived.",
	})
	s.mUndelivered = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "undelivered_total",
		Help: "Notifies to sessions the router listed that their gateway could not take (connection gone, gate unknown or unreachable), by command: c2c, receipt, s2c, kick.",
	}, []string{"cmd"})
	s.mStale = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "stale_sessions_dropped_total",
		Help: "Sessions removed from the router because their gateway reported the connection gone during a push.",
	})
	s.mConvSyncs = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "conv_syncs_total",
		Help: "Conversation list syncs served.",
	})
	s.mConvChanged = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "conv_changed_total",
		Help: "Conversations returned by syncs (new or changed since the versions the client held).",
	})
	s.mTransient = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "transient_total",
		Help: "Transient messages by result: sent (not stored), rate_limited (3001).",
	}, []string{"result"})
	s.mGroup = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "group_sends_total",
		Help: "Group send requests by result: stored, duplicate (a retry of a stored message), refused (not a member, unknown group, store error).",
	}, []string{"result"})
	s.mGroupNotifies = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "group_notifies_total",
		Help: "Group notifies queued on a member terminal's connection.",
	})
	s.mGroupAcks = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "group_cursor_writes_total",
		Help: "Group cursors moved by acks (one per group per ack batch).",
	})
	s.mPush = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "s2c_recipients_total",
		Help: "s2c push recipients by outcome: online (pushed), stored (offline, kept), dropped (offline).",
	}, []string{"outcome"})
	s.mPushAcks = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "s2c_acks_total",
		Help: "s2c pushes acknowledged by a recipient terminal (live or from its inbox).",
	})
	s.mC2S = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "c2s_messages_total",
		Help: "c2s messages by result: stored (acknowledged by the bus) or error.",
	}, []string{"result"})
	if opts.Registry != nil {
		online := func(users bool) func() float64 {
			return func() float64 {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				st, err := s.router.Stats(ctx)
				if err != nil {
					return math.NaN()
				}
				if users {
					return float64(st.Users)
				}
				return float64(st.Sessions)
			}
		}
		gUsers := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "imd", Subsystem: "logic", Name: "online_users",
			Help: "Users with at least one session in the router (the whole DC's when the router is shared).",
		}, online(true))
		gSessions := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "imd", Subsystem: "logic", Name: "online_sessions",
			Help: "Sessions (logged-in terminals) in the router (the whole DC's when the router is shared).",
		}, online(false))
		for _, c := range []prometheus.Collector{s.mLogins, s.mKicks, s.mC2C, s.mC2CNotifies, s.mC2CAcks, s.mPush, s.mPushAcks, s.mC2S, s.mUndelivered, s.mStale, gUsers, gSessions, s.mGroup, s.mGroupNotifies, s.mGroupAcks, s.mTransient, s.mConvSyncs, s.mConvChanged} {
			if err := opts.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("logic: metrics: %w", err)
			}
		}
	}
	if err := s.initPresence(opts); err != nil {
		return nil, err
	}
	return s, nil
}

// App returns the configuration of appcode, or nil.
func (s *Service) App(appcode uint32) *App { return s.apps[appcode] }

// AttachGate makes gateway g reachable under id.
func (s *Service) AttachGate(id string, g Gate) {
	s.gatesMu.Lock()
	s.gates[id] = g
	s.gatesMu.Unlock()
}

// DetachGate forgets gateway id and purges its sessions from the router.
func (s *Service) DetachGate(ctx context.Context, id string) {
	s.gatesMu.Lock()
	delete(s.gates, id)
	s.gatesMu.Unlock()
	if n, err := s.purgeGate(ctx, id); err != nil {
		s.log.Warn("purge gate sessions", "gate", id, "err", err)
	} else if n > 0 {
		s.log.Info("purged gate sessions", "gate", id, "sessions", n)
	}
}

// ReleaseGate forgets gateway id if it is still reached through g, and
// keeps its sessions: a link to a gateway that broke does not mean the
// gateway stopped (membership decides that, and then DetachGate purges).
func (s *Service) ReleaseGate(id string, g Gate) {
	s.gatesMu.Lock()
	if s.gates[id] == g {
		delete(s.gates, id)
	}
	s.gatesMu.Unlock()
}

// Announce registers again sessions that a gateway holds, after the
// router lost them (this node's in-process router restarted, a Redis
// master came back empty, the gateway's link broke and its sessions were
// purged) or for another DC's mirror. A session the router holds already
// is kept; one that a newer login replaced meanwhile is evicted and
// kicked. A session the router had lost gets its inbox at once: messages
// stored meanwhile reached no live notify, and its client pulls only
// after a login.
func (s *Service) Announce(ctx context.Context, sessions []router.Session) error {
	users := make([]router.User, len(sessions))
	for i := range sessions {
		users[i] = sessions[i].User()
	}
	known, err := s.router.LookupMany(ctx, users)
	if err != nil {
		return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	for i, ss := range sessions {
		app := s.apps[ss.AppCode]
		if app == nil || app.Account != ss.Account {
			continue // the app was removed from the config: the session ends with its connection
		}
		same := func(o router.Session) bool { return o.Same(&ss) }
		lost := !slices.ContainsFunc(known[i], same)
		evicted, err := s.register(ctx, ss, app.MaxSessions, 0)
		if err != nil {
			return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
		}
		for _, old := range evicted {
			s.kick(ctx, old, &pb.Kickout{Reason: pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE, Detail: "a newer login of this terminal exists"}, 0)
		}
		if lost && !slices.ContainsFunc(evicted, same) {
			s.pushInbox(ctx, ss, "announced session the router had lost")
			s.groupCatchUp(ctx, ss, false)
		}
	}
	return nil
}

// Gates returns the ids of the gateways this node reaches.
func (s *Service) Gates() []string {
	s.gatesMu.RLock()
	defer s.gatesMu.RUnlock()
	ids := make([]string, 0, len(s.gates))
	for id := range s.gates {
		ids = append(ids, id)
	}
	return ids
}

func (s *Service) gate(id string) Gate {
	if s.rooms != nil {
		if dc, gate, ok := SplitMirrorGate(id); ok {
			return s.rooms.Gate(dc, gate)
		}
	}
	s.gatesMu.RLock()
	defer s.gatesMu.RUnlock()
	return s.gates[id]
}

// Login implements API.
func (s *Service) Login(ctx context.Context, in LoginInput) (LoginResult, error) {
	res, err := s.login(ctx, in)
	st := schema.StatusOK
	if err != nil {
		st = schema.StatusInternal
		var se *schema.Error
		if errors.As(err, &se) {
			st = se.Status
		}
	}
	s.mLogins.WithLabelValues(st.String()).Inc()
	return res, err
}

func (s *Service) login(ctx context.Context, in LoginInput) (LoginResult, error) {
	app := s.apps[in.AppCode]
	if app == nil {
		return LoginResult{}, schema.Errorf(schema.StatusUnknownAppCode, "appcode %d is not configured", in.AppCode)
	}
	if in.UID == 0 {
		return LoginResult{}, schema.Errorf(schema.StatusTokenMismatch, "uid 0 cannot log in")
	}
	if err := s.auths[app.AppCode].Authenticate(ctx, app, in.UID, in.Token); err != nil {
		return LoginResult{}, err
	}
	if s.acl.BlockedUID(app.Account, in.UID) {
		return LoginResult{}, errBlockedUID(app.Account, in.UID)
	}
	sess := router.Session{
		Account:  app.Account,
		AppCode:  app.AppCode,
		UID:      in.UID,
		Gate:     in.Gate,
		Conn:     in.Conn,
		Epoch:    s.nextEpoch(),
		DeviceID: in.DeviceID,
		LoginMS:  time.Now().UnixMilli(),
	}
	evicted, err := s.register(ctx, sess, app.MaxSessions, in.LogID)
	if err != nil {
		return LoginResult{}, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	if s.acl.BlockedUID(app.Account, in.UID) {
		// Blocked while this login registered: SetACL's kick may have
		// looked the user up before this session was in the router.
		if _, err := s.unregister(ctx, sess, in.LogID); err != nil {
			s.log.Warn("unregister a blocked login", "uid", in.UID, "appcode", in.AppCode, "err", err)
		}
		for _, old := range evicted {
			s.kick(ctx, old, adminKick(), in.LogID)
		}
		return LoginResult{}, errBlockedUID(app.Account, in.UID)
	}
	for _, old := range evicted {
		k := &pb.Kickout{
			Reason:      pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE,
			Detail:      "the same account logged in again on this terminal",
			NewDeviceId: in.DeviceID,
		}
		if in.DeviceID != "" && old.DeviceID == in.DeviceID {
			// The same device again: the old connection is stale (a
			// reconnect overtook it, or the app restarted), not a rival.
			k.Reason = pb.KickReason_KICK_REASON_REPLACED
			k.Detail = "a newer connection of this device logged in"
		}
		s.kick(ctx, old, k, in.LogID)
	}
	return LoginResult{Session: sess, Evicted: len(evicted)}, nil
}

func (s *Service) kick(ctx context.Context, old router.Session, k *pb.Kickout, logid uint64) {
	s.mKicks.Inc()
	g := s.gate(old.Gate)
	if g == nil {
		s.mUndelivered.WithLabelValues("kick").Inc()
		s.log.Warn("kick: gate unknown", "gate", old.Gate, "uid", old.UID, "appcode", old.AppCode, "logid", logid)
		return
	}
	if err := g.Kick(ctx, old.Conn, k, logid); err != nil {
		// The router dropped the session already (Register evicted it);
		// the connection is gone or its gateway unreachable.
		s.mUndelivered.WithLabelValues("kick").Inc()
		s.log.Info("kick undeliverable", "gate", old.Gate, "conn", old.Conn, "uid", old.UID, "appcode", old.AppCode, "err", err, "logid", logid)
	}
}

// nextEpoch returns a login epoch: a hybrid clock, the wall clock in
// nanoseconds unless the last epoch was at or past it, so that epochs of
// different logic nodes (and DCs) order logins by time and one node's
// never repeat.
func (s *Service) nextEpoch() uint64 {
	for {
		last := s.epoch.Load()
		next := max(last+1, uint64(time.Now().UnixNano()))
		if s.epoch.CompareAndSwap(last, next) {
			return next
		}
	}
}

// Logout implements API.
func (s *Service) Logout(ctx context.Context, sess router.Session) error {
	if _, err := s.unregister(ctx, sess, 0); err != nil {
		return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	return nil
}

// Disconnected implements API.
func (s *Service) Disconnected(ctx context.Context, sess router.Session) {
	if _, err := s.unregister(ctx, sess, 0); err != nil {
		s.log.Warn("unregister on disconnect", "uid", sess.UID, "appcode", sess.AppCode, "err", err)
	}
}
