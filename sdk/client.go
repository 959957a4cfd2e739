// Package sdk is the Go client of the platform. A Client holds one TCP long
// connection to a gateway, logs in, keeps the connection alive and, when it
// drops, reconnects with backoff (to the last gateway that worked first) and
// logs in again, so the app sees one steady session. Every call takes a
// context and is safe for concurrent use.
//
// # Finding gateways
//
// A client is given the gateways' addresses (Options.Addrs), or the
// logic tier's discovery endpoint (Options.DiscoveryURL, GET
// /v1/gateways): it then asks for the live gateways, its nearest data
// center's least loaded first, before it dials, and again when a gateway
// sends it away (it drains) or none of them answers.
//
// # Showing each message once
//
// The client shows every chat message (OnC2C) and stored push (OnS2C) once
// and acknowledges it after the callback returns; only the acknowledgement
// removes it from the terminal's offline inbox. Acknowledgements are
// batched for Options.AckDelay; Close and Logout send the pending ones
// before they close the connection (waiting at most a couple of seconds),
// so the next client of the terminal does not get them again.
//
// A process that is killed cannot do that, and its memory of what it has
// shown dies with it. An app that must not show a message twice across
// restarts gives Options.State a StateStore, such as FileState: the client
// loads the ids shown before at Dial, and records each id as shown after
// the callback returned and before acknowledging it. A message shown just
// before a kill is then pulled again by the next process, recognised,
// acknowledged and not shown. The same store keeps the floor of the
// per-sender order (see SendC2C).
//
// # Groups
//
// Group messages (OnGroup) are numbered per group, 1, 2, 3, ..., and the
// client delivers each group in that order without gaps: it pulls what a
// connection cut made it miss before going on, catches every group up
// after each login, and acknowledges per group the last seq shown. A
// GroupStateStore (FileState is one) keeps that seq across restarts.
//
// # Presence
//
// Follow sets the users this terminal follows and answers their state now;
// their changes (online at the first terminal's login, offline when the
// last one leaves or its gateway dies) come to OnPresence, each once and
// in version order: a notify whose version is not above the last one
// applied for that user is dropped. The server forgets the list with the
// session, so the client sends it again after every reconnect and login
// and hands OnPresence the states that changed meanwhile. The members of
// a group are pulled, never pushed: GroupPresence pages its online ones.
package sdk

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Errors returned by Client methods besides *schema.Error (a status from the
// server) and context errors.
var (
	// ErrClosed: the client was closed, logged out or kicked out.
	ErrClosed = errors.New("sdk: client closed")
	// ErrNotConnected: no connection is up and the context ended before one was.
	ErrNotConnected = errors.New("sdk: not connected")
	// ErrConnLost: the connection broke while the call was in flight; the
	// request may or may not have reached the server.
	ErrConnLost = errors.New("sdk: connection lost")
	// ErrNotLoggedIn: Login has not succeeded yet.
	ErrNotLoggedIn = errors.New("sdk: not logged in")
)

// State is the client's connection state, reported to Options.OnState.
type State int

// Client states.
const (
	StateConnecting State = iota // dialing or logging in (again)
	StateOnline                  // logged in
	StateOffline                 // connection lost; reconnecting after a backoff
	StateClosed                  // closed, logged out, kicked out or refused: final
)

func (s State) String() string {
	return [...]string{"connecting", "online", "offline", "closed"}[s]
}

// Message is a notify pushed by the server (other than kickout and goaway,
// which the client handles itself).
type Message struct {
	Cmd     schema.Cmd
	MsgType uint32
	LogID   uint64
	Body    []byte // protobuf body of the command; the callback may keep it
}

// Values of Options.Compression.
const (
	CompressionS2  = schema.CompressionS2 // the default
	CompressionOff = "off"
)

// Options configures a Client. Zero values get defaults.
type Options struct {
	// Addrs are the gateways to use. The client starts with the first and
	// on reconnect tries the last one that worked before the others. An
	// address whose connection dies before a login succeeds on it (or
	// whose login fails) is passed over for the next one at the next try,
	// so a balancer that accepts connections for a dead gateway does not
	// hold the client. With DiscoveryURL they come after the gateways
	// discovered, and are the list while discovery fails.
	Addrs []string
	// DiscoveryURL, when set, is the gateway discovery endpoint of the
	// logic tier, e.g. "https://im.example.com:8080/v1/gateways" (GET
	// /v1/gateways, schema/openapi.yaml): the client asks it for the
	// gateways to dial, its nearest data center's least loaded first, at
	// Dial, after a gateway sent it away (GoAway: it is draining) and when
	// none of the addresses it has answered, and dials them in the
	// answer's order: their plain-TCP addresses, or with TLS set their
	// TLS ones. When discovery fails the client keeps the addresses it
	// has (Addrs at first) until they fail too; Addrs may be empty only
	// if discovery works at Dial.
	DiscoveryURL string
	// DiscoveryTimeout bounds one request to DiscoveryURL. Default 3s.
	DiscoveryTimeout time.Duration
	// DiscoveryClient makes the requests to DiscoveryURL (to trust a
	// private CA, say). Default: a client that keeps no idle connection,
	// so a Client leaves no goroutine behind.
	DiscoveryClient *http.Client
	// DeviceID is the stable id of the install, sent at login: a login
	// with the same DeviceID silently replaces a stale connection of this
	// device, while a different one kicks it out (OnKickout). Default: a
	// random id per Client.
	DeviceID string
	// Platform ("android", "ios", "pc", ...) is sent at login.
	Platform string
	// DialTimeout bounds one TCP connect. Default 5s.
	DialTimeout time.Duration
	// Dialer, when set, opens the TCP connections instead of a net.Dialer
	// (to pick a source address, or to go through a proxy).
	Dialer func(ctx context.Context, network, addr string) (net.Conn, error)
	// TLS, when set, makes every connection a TLS one (the gateway's TLS
	// port, --tls-addr), with a handshake within DialTimeout. Set RootCAs
	// to trust a private CA (nil: the system's roots) and ServerName to
	// the name in the gateway's certificate when the address does not
	// carry it (empty: the address's host).
	TLS *tls.Config
	// RequestTimeout applies to calls whose context has no deadline, and
	// to keepalives. Default 10s.
	RequestTimeout time.Duration
	// KeepaliveInterval overrides the interval the server advertises.
	KeepaliveInterval time.Duration
	// BackoffMin and BackoffMax bound the reconnect backoff (exponential
	// with full jitter). Defaults 200ms and 30s. While logins are answered
	// with a retryable status (the server is there but cannot serve yet),
	// the backoff grows to 2s at most, so the client is back soon after
	// the server is.
	BackoffMin, BackoffMax time.Duration
	// NoReconnect turns automatic reconnection off.
	NoReconnect bool
	// MaxBody bounds the frames the client accepts. Default 1 MiB.
	MaxBody uint32
	// Compression is the body compression the client offers at login:
	// "" (the default) offers CompressionS2, CompressionOff offers none.
	// When the server takes it, bodies of 512 bytes or more are sent
	// compressed and compressed frames from the server are decompressed
	// (one that would exceed MaxBody is refused before it is inflated).
	Compression string
	// State, when set, keeps across process restarts the ids this terminal
	// has shown (so a message shown before the app was killed is not
	// shown again by the next process) and the highest msgid it was
	// answered for a message it sent (so its next messages stay in order
	// after it). Dial loads it and fails if it cannot. Without State the
	// client remembers them only while it lives. See FileState.
	State StateStore

	// OnMessage receives notifies, one at a time, in arrival order.
	OnMessage func(Message)
	// OnKickout is called when the server kicks this session out (the same
	// account logged in on the same terminal elsewhere). The client is
	// closed afterwards and does not reconnect.
	OnKickout func(*pb.Kickout)
	// OnState is called on every state change; err says why when there is
	// a reason (lost connection, refused login).
	OnState func(State, error)

	// OnC2C receives chat messages, one at a time: after every login first
	// the messages that waited in this terminal's offline inbox (oldest
	// first), then live ones. Each msgid is delivered once (duplicates
	// from retries and reconnects are dropped, remembering the last
	// DedupSize msgids, across restarts with State) and acknowledged
	// after OnC2C returns, which removes it from the inbox; Close and
	// Logout send the acknowledgements still batched. When OnC2C is nil,
	// c2c notifies go to OnMessage and chat messages kept in the inbox
	// stay there.
	OnC2C func(*pb.C2CMessage)
	// OnS2C receives pushes from app-servers (the HTTP push API), live or,
	// when the app-server asked to keep them for offline recipients, from
	// the inbox after a login. Each push id is delivered once and
	// acknowledged after OnS2C returns (the app-server sees the arrival
	// count). When OnS2C is nil, s2c notifies go to OnMessage and stored
	// pushes stay in the inbox.
	OnS2C func(*pb.S2CNotify)
	// OnReceipt is called when a terminal of a recipient acknowledged a
	// message this user sent (a delivered receipt), once per message: a
	// receipt the server sent for several (C2CReceipt.Msgids) is handed
	// over as one per msgid, Msgids empty. Receipts are not stored: a
	// sender offline at that moment does not get one.
	OnReceipt func(*pb.C2CReceipt)
	// OnTransient receives transient messages ("typing...", a shake; see
	// SendTransient): shown if they arrive, never stored, acknowledged or
	// pulled later. Like OnReceipt it runs on the connection's reader:
	// return quickly. When nil they go to OnMessage.
	OnTransient func(*pb.TransientNotify)
	// OnConvMark receives read marks: this user read a conversation on
	// another terminal (lower its unread count), or the peer of a
	// one-to-one conversation read this user's messages (a read receipt:
	// By is the peer). It runs on the connection's reader: return quickly.
	// When nil they go to OnMessage.
	OnConvMark func(*pb.ConvRead)
	// OnPresence receives the presence changes of the users this terminal
	// follows (see Follow): online when a user's first terminal logged
	// in, offline when its last one left. A change whose version is not
	// above the last one applied for that user is dropped, so each comes
	// once and never older than what was shown. It runs on the
	// connection's reader: return quickly and make no request from it.
	// When nil presence notifies go to OnMessage.
	OnPresence func(*pb.PresenceNotify)
	// OnGroup receives group messages, chat and system events (m.Event
	// set: created, joined, left, dissolved), one at a time on the
	// goroutine that runs OnC2C. Each group's messages come in seq order
	// without gaps, each once: a notify lost in a connection cut is
	// pulled again before the ones after it are delivered, and after
	// every login the groups are caught up from this terminal's cursor
	// before live notifies are let through. The messages this client
	// sends with SendGroup come too, once their send is answered. The
	// client acknowledges per group the last seq delivered, batched for
	// AckDelay, and, when Options.State is a GroupStateStore, records it
	// there after the callback returns, so a restarted app neither shows
	// a group message again nor skips one. When OnGroup is nil, group
	// notifies go to OnMessage and nothing is pulled for groups.
	OnGroup func(*pb.C2CMessage)
	// PageSize is the offline and group pull page size; 0 lets the server
	// choose.
	PageSize uint32
	// DedupSize is how many recent msgids the receiver remembers (and
	// loads from State). Default 16384.
	DedupSize int
	// AckDelay is how long acks wait to be batched. Default 20ms.
	AckDelay time.Duration
	// GroupAckDelay is how long group cursors wait to be batched: one
	// cursor covers every message of its group up to it, and each one the
	// server moves is a store write, so they go out less often than
	// message acks. Default 250ms; Close and Logout send them at once.
	GroupAckDelay time.Duration
	// PushAckDelay is how long acks of live pushes (s2c) wait to be
	// batched. They only count the push's statistics, so they go out less
	// often than message acks, and each one the gateway does not read is
	// server CPU saved on every delivery. Default 250ms; 200 waiting, Close
	// and Logout send them at once.
	PushAckDelay time.Duration
	// SendAttempts bounds the tries of SendC2C and SendGroup. Default 6.
	SendAttempts int
	// SendWindow is how many ordered one-to-one sends (SendC2CAsync) may
	// be in flight at once, pipelined; more wait for a slot. Default 32
	// (the gateway allows 64 requests in flight per connection).
	SendWindow int
	// SendBackoffMin and SendBackoffMax bound the backoff of SendC2C and
	// SendGroup between tries (exponential with jitter), and of the
	// group pulls that are retried. Defaults 100ms and 3s.
	SendBackoffMin, SendBackoffMax time.Duration

	Logger *slog.Logger
}

func (o *Options) setDefaults() error {
	if len(o.Addrs) == 0 && o.DiscoveryURL == "" {
		return errors.New("sdk: at least one gateway address (or a DiscoveryURL) is required")
	}
	if o.DiscoveryTimeout <= 0 {
		o.DiscoveryTimeout = 3 * time.Second
	}
	if o.DeviceID == "" {
		o.DeviceID = "sdk-" + NewClientMsgID()[:16]
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 10 * time.Second
	}
	if o.BackoffMin <= 0 {
		o.BackoffMin = 200 * time.Millisecond
	}
	if o.BackoffMax < o.BackoffMin {
		o.BackoffMax = max(30*time.Second, o.BackoffMin)
	}
	if o.MaxBody == 0 {
		o.MaxBody = 1 << 20
	}
	if o.DedupSize <= 0 {
		o.DedupSize = 16384
	}
	if o.AckDelay <= 0 {
		o.AckDelay = 20 * time.Millisecond
	}
	if o.GroupAckDelay <= 0 {
		o.GroupAckDelay = 250 * time.Millisecond
	}
	if o.PushAckDelay <= 0 {
		o.PushAckDelay = 250 * time.Millisecond
	}
	if o.SendAttempts <= 0 {
		o.SendAttempts = 6
	}
	if o.SendWindow <= 0 {
		o.SendWindow = 32
	}
	if o.SendBackoffMin <= 0 {
		o.SendBackoffMin = 100 * time.Millisecond
	}
	if o.SendBackoffMax < o.SendBackoffMin {
		o.SendBackoffMax = max(3*time.Second, o.SendBackoffMin)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Credentials identify the session to log in.
type Credentials struct {
	AppCode uint32
	UID     uint64
	// Token is presented at login. TokenFunc, when set, is called instead
	// before every login, so a reconnect can use a fresh token.
	Token     string
	TokenFunc func(ctx context.Context) (string, error)
}

// maxReplaced is how many KICK_REASON_REPLACED kicks a minute a client
// takes as stale connections of its own before it concludes that another
// live client shares its DeviceID and gives up.
const maxReplaced = 30

// Client is a connection to the platform. Create it with Dial.
type Client struct {
	opts Options
	log  *slog.Logger
	seq  atomic.Uint32

	mu         sync.Mutex
	link       *link
	up         chan struct{} // closed when link is usable; replaced when it is lost
	state      State
	cred       *Credentials // set after the first successful Login
	login      *pb.LoginResponse
	addrs      []string // the gateways dialled: Options.Addrs, or discovered (discovery.go)
	preferred  int      // index in addrs of the last gateway that worked
	disc       discoveryState
	replacedAt time.Time // start of the minute counted by replaced
	replaced   int       // KICK_REASON_REPLACED kicks in that minute
	closed     bool
	closeErr   error

	// sentMsgid is the highest msgid of any C2CSendResponse: the floor
	// (after_msgid) of every send.
	sentMsgid  atomic.Uint64
	sentSaveMu sync.Mutex // orders the records of sentMsgid in Options.State
	sentSaved  uint64     // the last floor recorded there

	msgs      chan Message
	inbox     *inbox // nil without OnC2C
	stop      chan struct{}
	chain     sendChain // one-to-one sends in flight, in order (ordered.go)
	wg        sync.WaitGroup
	reconnect chan struct{}

	pres presenceState // presence.go
}

// Dial connects to the first reachable gateway in opts.Addrs, or of the
// gateways opts.DiscoveryURL lists. It does not log in: call Login next.
func Dial(ctx context.Context, opts Options) (*Client, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	var saved SavedState
	if opts.State != nil {
		var err error
		if saved, err = opts.State.Load(); err != nil {
			return nil, fmt.Errorf("sdk: load state: %w", err)
		}
	}
	c := &Client{
		opts:      opts,
		log:       opts.Logger,
		up:        make(chan struct{}),
		msgs:      make(chan Message, 64),
		stop:      make(chan struct{}),
		reconnect: make(chan struct{}, 1),
		chain:     sendChain{slots: make(chan struct{}, opts.SendWindow)},
		state:     StateConnecting,
		addrs:     slices.Clone(opts.Addrs),
	}
	if opts.DiscoveryURL != "" {
		c.disc.httpc = newDiscoveryClient(&c.opts)
		c.disc.stale = true // the first dial asks for the list
	}
	l, err := c.dialAny(ctx)
	if err != nil {
		return nil, err
	}
	c.sentMsgid.Store(saved.SentMsgid)
	c.mu.Lock()
	c.link = l
	c.mu.Unlock()
	c.wg.Add(2)
	go c.deliver()
	go c.supervise()
	if opts.OnC2C != nil || opts.OnS2C != nil || opts.OnGroup != nil {
		c.inbox = newInbox(c)
		c.inbox.remember(saved.Shown)
		c.inbox.rememberGroups(saved.GroupSeqs)
		c.wg.Add(1)
		go c.inbox.loop()
	}
	return c, nil
}

// dialAny tries the preferred gateway first, then the others in order.
// With discovery it asks for the list first when it is stale, and again
// when no gateway of it answered, then tries the gateways new to it.
func (c *Client) dialAny(ctx context.Context) (*link, error) {
	var errs []error
	asked := false
	if c.discoveryStale() {
		asked = true
		if err := c.discover(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	tried := map[string]bool{}
	for round := 0; round < 2; round++ {
		c.mu.Lock()
		addrs, first := c.addrs, c.preferred
		c.mu.Unlock()
		n := len(addrs)
		for i := 0; i < n; i++ {
			addr := addrs[(first+i)%n]
			if tried[addr] {
				continue
			}
			tried[addr] = true
			l, err := dialLink(ctx, c, addr)
			if err == nil {
				c.mu.Lock()
				if i := slices.Index(c.addrs, addr); i >= 0 {
					c.preferred = i
				}
				c.mu.Unlock()
				return l, nil
			}
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
		}
		if asked || c.opts.DiscoveryURL == "" || ctx.Err() != nil {
			break
		}
		// None answered: the gateways may have moved since the list was
		// given.
		asked = true
		if err := c.discover(ctx); err != nil {
			errs = append(errs, err)
			break
		}
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no gateway address"))
	}
	return nil, fmt.Errorf("%w: %w", ErrNotConnected, errors.Join(errs...))
}

// skip makes the next dial start after l's address when l was the
// preferred one: l died before a login succeeded on it (or the login
// failed), as a gateway behind a balancer that accepts and resets does,
// and retrying the same address could hold the client forever.
func (c *Client) skip(l *link) {
	c.mu.Lock()
	if n := len(c.addrs); n > 1 && c.addrs[c.preferred%n] == l.addr {
		c.preferred = (c.preferred + 1) % n
	}
	c.mu.Unlock()
}

// Login logs in on the current connection and remembers the credentials for
// reconnects. A refused login returns a *schema.Error (wrong or expired
// token, unknown appcode); the server then closes the connection. When the
// connection dies before the login is answered, Login tries again on the
// next gateway address (once per address). When it dies just after a
// successful login, Login returns the server's answer and the client
// reconnects and logs in again by itself, as after any later loss.
func (c *Client) Login(ctx context.Context, cred Credentials) (*pb.LoginResponse, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	l := c.link
	tries := max(2, len(c.addrs))
	c.mu.Unlock()
	for try := 1; ; try++ {
		if l == nil || l.dead() != nil {
			var err error
			if l, err = c.dialAny(ctx); err != nil {
				return nil, err
			}
			if !c.setLink(l) {
				return nil, ErrClosed
			}
		}
		resp, err := c.loginOn(ctx, l, &cred)
		if err != nil {
			if errors.Is(err, ErrConnLost) && try < tries && ctx.Err() == nil {
				c.skip(l)
				l.close(err)
				continue
			}
			return nil, err
		}
		// The credentials are set before the link can be marked online, so
		// a loss from now on is one the client recovers from.
		c.mu.Lock()
		c.cred = &cred
		c.mu.Unlock()
		if !c.online(l, resp) {
			// The link died between the answer and now: linkDown saw a
			// link that was not online yet and left the recovery to us.
			c.mu.Lock()
			closed := c.closed
			c.mu.Unlock()
			if closed {
				return nil, ErrClosed
			}
			lost := l.dead()
			if c.opts.NoReconnect {
				return nil, lost
			}
			c.setState(StateOffline, lost)
			c.wantReconnect()
		}
		return resp, nil
	}
}

// wantReconnect wakes the supervisor.
func (c *Client) wantReconnect() {
	select {
	case c.reconnect <- struct{}{}:
	default:
	}
}

func (c *Client) loginOn(ctx context.Context, l *link, cred *Credentials) (*pb.LoginResponse, error) {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	token := cred.Token
	if cred.TokenFunc != nil {
		t, err := cred.TokenFunc(ctx)
		if err != nil {
			return nil, fmt.Errorf("sdk: token: %w", err)
		}
		token = t
	}
	h := schema.Header{Cmd: schema.CmdLogin, AppCode: cred.AppCode, UID: cred.UID}
	var resp pb.LoginResponse
	if c.inbox != nil {
		c.inbox.beginLogin()
	}
	req := &pb.LoginRequest{Token: token, DeviceId: c.opts.DeviceID, Platform: c.opts.Platform, SdkVersion: Version}
	if c.opts.Compression != CompressionOff {
		req.AcceptCompression = []string{schema.CompressionS2}
	}
	err := l.roundTrip(ctx, h, req, &resp)
	if err != nil {
		return nil, err
	}
	if resp.Compression == schema.CompressionS2 && c.opts.Compression != CompressionOff {
		l.compress.Store(true)
	}
	return &resp, nil
}

// online makes l the current, usable link and starts its keepalive. It
// reports false, and changes nothing, when the client is closed or l has
// died: the caller then has to get a new link, because linkDown leaves a
// link that never was online to whoever is logging in on it.
func (c *Client) online(l *link, resp *pb.LoginResponse) bool {
	c.mu.Lock()
	if c.closed || l.dead() != nil {
		c.mu.Unlock()
		return false
	}
	c.link = l
	l.online = true
	c.login = resp
	select {
	case <-c.up:
	default:
		close(c.up)
	}
	c.mu.Unlock()
	if c.inbox != nil {
		c.inbox.startSync(l)
	}
	c.setState(StateOnline, nil)
	c.refollow(l)
	iv := c.opts.KeepaliveInterval
	if iv <= 0 {
		iv = time.Duration(resp.KeepaliveMs) * time.Millisecond
	}
	if iv <= 0 {
		iv = 30 * time.Second
	}
	c.wg.Add(1)
	go c.keepalive(l, iv)
	return true
}

func (c *Client) keepalive(l *link, iv time.Duration) {
	defer c.wg.Done()
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-l.done:
			return
		case <-c.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), min(c.opts.RequestTimeout, iv))
		err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdKeepalive}, &pb.KeepaliveRequest{ClientTimeMs: time.Now().UnixMilli()}, nil)
		cancel()
		if err != nil && l.dead() == nil {
			l.close(fmt.Errorf("%w: keepalive: %v", ErrConnLost, err))
			return
		}
	}
}

// LoginInfo returns the server's answer to the last successful login, or nil.
func (c *Client) LoginInfo() *pb.LoginResponse {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.login
}

// State returns the current state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

func (c *Client) setState(s State, err error) {
	c.mu.Lock()
	if c.state == s || (c.state == StateClosed) {
		c.mu.Unlock()
		return
	}
	c.state = s
	c.mu.Unlock()
	c.log.Debug("sdk state", "state", s.String(), "err", err)
	if c.opts.OnState != nil {
		c.opts.OnState(s, err)
	}
}

// setLink makes l, a link not logged in yet, the current one. Requests
// wait for online(l): c.up is reset if the link it was closed for is still
// alive (a reconnect after a kick or a GoAway can dial the next link before
// the old one has died), or a request could go out on l before its login
// and be refused with 1006. It reports false, closing l, when the client
// is closed.
func (c *Client) setLink(l *link) bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		l.close(ErrClosed)
		return false
	}
	c.link = l
	select {
	case <-c.up:
		c.up = make(chan struct{})
	default:
	}
	c.mu.Unlock()
	return true
}

// linkDown is called by a link that died. Only the loss of a link that was
// online starts a reconnect: a link that dies before its login succeeded
// is handled by the Login or reconnect that is logging in on it (and the
// next dial starts at the next address).
func (c *Client) linkDown(l *link, err error) {
	c.mu.Lock()
	if c.link != l {
		c.mu.Unlock()
		return
	}
	select {
	case <-c.up:
		c.up = make(chan struct{})
	default:
	}
	if !l.online {
		c.mu.Unlock()
		c.skip(l)
		return
	}
	loggedIn := c.cred != nil
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return
	}
	if !loggedIn || c.opts.NoReconnect {
		if loggedIn {
			c.shutdown(err)
		}
		return
	}
	c.setState(StateOffline, err)
	c.wantReconnect()
}

// busyBackoff caps the reconnect backoff while logins are answered with a
// retryable status (the logic tier restarting, say): the server is there
// and will serve again soon, so the client keeps asking every couple of
// seconds instead of backing off towards BackoffMax.
const busyBackoff = 2 * time.Second

// jitter returns a random duration in [0, d): the full jitter of the
// reconnect backoff. Tests replace it.
var jitter = func(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(d)))
}

// supervise reconnects and logs in again after the link is lost. The first
// try is immediate; then it waits BackoffMin/2 plus a random time up to
// the backoff, which doubles after each failure up to BackoffMax, or only
// up to busyBackoff when the failure was a status the server answered.
func (c *Client) supervise() {
	defer c.wg.Done()
	busyMax := min(c.opts.BackoffMax, max(c.opts.BackoffMin, busyBackoff))
	for {
		select {
		case <-c.stop:
			return
		case <-c.reconnect:
		}
		backoff := c.opts.BackoffMin
		for attempt := 0; ; attempt++ {
			if attempt > 0 {
				select {
				case <-c.stop:
					return
				case <-time.After(c.opts.BackoffMin/2 + jitter(backoff)):
				}
			}
			c.mu.Lock()
			cred := c.cred
			closed := c.closed
			c.mu.Unlock()
			if closed {
				return
			}
			if cred == nil {
				break // logging out
			}
			c.setState(StateConnecting, nil)
			err := c.relogin(cred)
			if err == nil {
				break
			}
			var se *schema.Error
			answered := errors.As(err, &se)
			if answered && !se.Retryable() {
				c.log.Warn("sdk: login refused on reconnect; giving up", "err", err)
				c.shutdown(err)
				return
			}
			c.setState(StateOffline, err)
			c.log.Debug("sdk: reconnect failed", "attempt", attempt, "err", err)
			if answered {
				backoff = min(2*backoff, busyMax)
			} else {
				backoff = min(2*backoff, c.opts.BackoffMax)
			}
		}
	}
}

// relogin dials and logs in once for supervise.
func (c *Client) relogin(cred *Credentials) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.DialTimeout+c.opts.RequestTimeout)
	defer cancel()
	l, err := c.dialAny(ctx)
	if err != nil {
		return err
	}
	if !c.setLink(l) {
		return ErrClosed
	}
	resp, err := c.loginOn(ctx, l, cred)
	if err != nil {
		c.skip(l)
		l.close(err)
		return err
	}
	if !c.online(l, resp) {
		if err := l.dead(); err != nil {
			return err // lost right after the answer: try again
		}
		return ErrClosed
	}
	return nil
}

// notified receives a notify from link l.
func (c *Client) notified(l *link, h schema.Header, body []byte) {
	switch h.Cmd {
	case schema.CmdKickout:
		var k pb.Kickout
		_ = proto.Unmarshal(body, &k)
		if k.Reason == pb.KickReason_KICK_REASON_REPLACED {
			// A stale connection of this device overtook our login (a slow
			// login of a link we had already given up). Reconnecting
			// evicts it, unless this keeps happening: then another live
			// client uses our device id, and we yield to it.
			c.mu.Lock()
			if time.Since(c.replacedAt) > time.Minute {
				c.replacedAt, c.replaced = time.Now(), 0
			}
			c.replaced++
			again := c.replaced > maxReplaced
			c.mu.Unlock()
			if !again {
				c.log.Info("sdk: connection replaced by a stale one of this device; reconnecting")
				l.close(fmt.Errorf("%w: replaced by another connection of this device", ErrConnLost))
				return
			}
		}
		c.shutdown(fmt.Errorf("sdk: kicked out: %s", k.Reason))
		if c.opts.OnKickout != nil {
			c.opts.OnKickout(&k)
		}
	case schema.CmdGoAway:
		var g pb.GoAway
		_ = proto.Unmarshal(body, &g)
		c.mu.Lock()
		if c.link == l {
			if n := len(c.addrs); n > 1 && c.addrs[c.preferred%n] == l.addr {
				c.preferred = (c.preferred + 1) % n // this gateway is draining
			}
			c.goneAway(l.addr)
		}
		c.mu.Unlock()
		go func() {
			time.Sleep(time.Duration(g.ReconnectAfterMs) * time.Millisecond / 4)
			l.close(fmt.Errorf("%w: server going away: %s", ErrConnLost, g.Reason))
		}()
	case schema.CmdC2CNotify:
		if c.inbox != nil && c.opts.OnC2C != nil {
			c.inbox.notified(body)
			return
		}
		c.queueMessage(h, body)
	case schema.CmdGroupNotify:
		if c.inbox != nil && c.opts.OnGroup != nil {
			c.inbox.groupNotified(body)
			return
		}
		c.queueMessage(h, body)
	case schema.CmdS2C:
		if c.inbox != nil && c.opts.OnS2C != nil {
			c.inbox.pushed(body)
			return
		}
		c.queueMessage(h, body)
	case schema.CmdC2CReceipt:
		if c.opts.OnReceipt != nil {
			var r pb.C2CReceipt
			if err := proto.Unmarshal(body, &r); err == nil {
				if len(r.Msgids) == 0 {
					c.opts.OnReceipt(&r)
					return
				}
				for _, id := range r.Msgids {
					c.opts.OnReceipt(&pb.C2CReceipt{Msgid: id, By: r.By, ByAppcode: r.ByAppcode, AtMs: r.AtMs})
				}
			}
			return
		}
		c.queueMessage(h, body)
	case schema.CmdConvMark:
		if c.opts.OnConvMark != nil {
			var r pb.ConvRead
			if err := proto.Unmarshal(body, &r); err == nil {
				c.opts.OnConvMark(&r)
			}
			return
		}
		c.queueMessage(h, body)
	case schema.CmdPresenceNotify:
		c.presenceNotified(h, body)
	case schema.CmdTransient:
		if c.opts.OnTransient != nil {
			var n pb.TransientNotify
			if err := proto.Unmarshal(body, &n); err == nil {
				c.opts.OnTransient(&n)
			}
			return
		}
		c.queueMessage(h, body)
	default:
		c.queueMessage(h, body)
	}
}

func (c *Client) queueMessage(h schema.Header, body []byte) {
	select {
	case c.msgs <- Message{Cmd: h.Cmd, MsgType: h.MsgType, LogID: h.LogID, Body: body}:
	case <-c.stop:
	}
}

// deliver runs the OnMessage callback on its own goroutine so a slow
// callback never stalls the connection's reader for long.
func (c *Client) deliver() {
	defer c.wg.Done()
	for {
		select {
		case m := <-c.msgs:
			if c.opts.OnMessage != nil {
				c.opts.OnMessage(m)
			}
		case <-c.stop:
			return
		}
	}
}

func (c *Client) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.opts.RequestTimeout)
}

// current waits until a logged-in link is up or ctx ends.
func (c *Client) current(ctx context.Context) (*link, error) {
	for {
		c.mu.Lock()
		if c.closed {
			err := c.closeErr
			c.mu.Unlock()
			return nil, err
		}
		if c.cred == nil {
			c.mu.Unlock()
			return nil, ErrNotLoggedIn
		}
		up, l := c.up, c.link
		c.mu.Unlock()
		select {
		case <-up:
			if l.dead() == nil {
				return l, nil
			}
			// lost after it came up: wait for the next one
			runtimeYield()
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %w", ErrNotConnected, ctx.Err())
		}
	}
}

// Request sends a request of command cmd with body req on the current
// connection, waiting for a reconnect if one is under way, and decodes the
// response into resp (which may be nil). It does not retry: a request that
// fails with ErrConnLost may or may not have been served.
func (c *Client) Request(ctx context.Context, cmd schema.Cmd, msgtype uint32, req, resp proto.Message) error {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	l, err := c.current(ctx)
	if err != nil {
		return err
	}
	return l.roundTrip(ctx, schema.Header{Cmd: cmd, MsgType: msgtype}, req, resp)
}

// Notify sends a client notify (such as an ack) on the current connection.
func (c *Client) Notify(ctx context.Context, cmd schema.Cmd, m proto.Message) error {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	l, err := c.current(ctx)
	if err != nil {
		return err
	}
	return l.send(schema.Header{Cmd: cmd}, m)
}

// Keepalive sends one keepalive and returns the round-trip time.
func (c *Client) Keepalive(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	err := c.Request(ctx, schema.CmdKeepalive, 0, &pb.KeepaliveRequest{ClientTimeMs: start.UnixMilli()}, nil)
	return time.Since(start), err
}

// Logout ends the session and closes the client. Acknowledgements still
// waiting to be batched are sent first.
func (c *Client) Logout(ctx context.Context) error {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	l, err := c.current(ctx)
	if err != nil {
		return err
	}
	if c.inbox != nil {
		c.inbox.finish(ctx)
	}
	c.mu.Lock()
	c.cred = nil // the close that follows the logout must not reconnect
	c.mu.Unlock()
	err = l.roundTrip(ctx, schema.Header{Cmd: schema.CmdLogout}, &pb.LogoutRequest{}, nil)
	c.shutdown(ErrClosed)
	return err
}

// closeFlushTimeout bounds how long Close waits to send the pending
// acknowledgements (RequestTimeout bounds it too).
const closeFlushTimeout = 2 * time.Second

// Close closes the connection without logging out (the server unregisters
// the session when it sees the close) and stops reconnecting. It first
// stops delivering messages and sends the acknowledgements of those shown
// and not acknowledged yet, waiting at most two seconds (or RequestTimeout
// if shorter) for a connection to send them on; those it could not send
// leave their messages in the inbox, to be dropped as duplicates by the
// next client that remembers them (Options.State). Within the same time
// it waits for a callback that is running to return and acknowledges that
// message too, unless Close is called from the callback itself: then that
// message is only recorded in Options.State.
func (c *Client) Close() error {
	if c.inbox != nil {
		ctx, cancel := context.WithTimeout(context.Background(), min(closeFlushTimeout, c.opts.RequestTimeout))
		c.inbox.finish(ctx)
		cancel()
	}
	c.shutdown(ErrClosed)
	return nil
}

func (c *Client) shutdown(reason error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if reason == nil || !errors.Is(reason, ErrClosed) {
		reason = fmt.Errorf("%w: %w", ErrClosed, reason)
	}
	c.closeErr = reason
	l := c.link
	c.mu.Unlock()
	close(c.stop)
	if l != nil {
		l.close(reason)
	}
	c.setState(StateClosed, reason)
}

// Wait blocks until the client is closed (by Close, Logout, a kickout or a
// refused re-login) and its goroutines have stopped, and returns why.
func (c *Client) Wait() error {
	<-c.stop
	c.wg.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}
