package rpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// ClientOptions configures a Client.
type ClientOptions struct {
	Version string // goes in the hello, for logs
	// Secret signs the hello for logic nodes that require it.
	Secret string
	// TLS, when set, puts every link under TLS (see MutualTLS): the
	// gateway presents its Certificates and verifies the logic node's
	// against RootCAs, for the host it dials unless ServerName is set.
	TLS *tls.Config
	// DialTimeout bounds one dial plus hello. Default 5s.
	DialTimeout time.Duration
	Logger      *slog.Logger
	Metrics     *Metrics
	// Registry, when set, also gets the gauge of disconnects waiting for
	// a logic node.
	Registry prometheus.Registerer
}

// Client is the gateway side: it implements logic.API by calling logic
// nodes over one link each, spreading calls over them, and serves the
// gateway (logic.Gate) to them on the same links. Logic nodes come and go
// through SetAddrs; a broken link is redialled with jittered backoff.
type Client struct {
	opts ClientOptions
	log  *slog.Logger
	gate atomic.Pointer[gateBox]

	mu     sync.Mutex
	nodes  map[string]*node // by address
	closed bool
	wg     sync.WaitGroup

	live atomic.Pointer[[]*Link] // links that finished their hello
	next atomic.Uint64

	ctx    context.Context // logic's calls into the gateway run under it
	cancel context.CancelFunc

	goneMu sync.Mutex
	gone   []router.Session // disconnects no logic node has heard of yet
}

// maxGone bounds the disconnects kept while no logic node is reachable;
// past it the oldest are dropped (their sessions stay in the router until
// the user logs in again or this gateway's membership ends).
const maxGone = 1 << 20

type gateBox struct {
	id, addr string
	g        Gateway
}

// Gateway is what a Client serves to logic nodes: the gateway's
// connections, and its sessions to announce to a logic node that keeps
// the router in its memory.
type Gateway interface {
	logic.Gate
	Sessions() []router.Session
}

// announceBatch is how many sessions one rpc-announce carries.
const announceBatch = 1000

type node struct {
	addr string
	stop context.CancelFunc
}

var _ logic.API = (*Client)(nil)

// NewClient returns a client with no logic nodes yet; give it the gateway
// with Configure, then logic nodes with SetAddrs.
func NewClient(opts ClientOptions) *Client {
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{opts: opts, log: opts.Logger, nodes: make(map[string]*node)}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.live.Store(&[]*Link{})
	if err := opts.Metrics.watchGone(opts.Registry, c); err != nil {
		c.log.Warn("rpc metrics", "err", err)
	}
	return c
}

// Configure names the gateway (its id, which router sessions carry, and
// the address its clients connect to) and sets what logic nodes push to
// and kick through. Call it before SetAddrs.
func (c *Client) Configure(id, addr string, g Gateway) {
	c.gate.Store(&gateBox{id: id, addr: addr, g: g})
}

// SetAddrs makes addrs the logic nodes to keep links to: new ones are
// dialled, links to ones no longer listed are closed.
func (c *Client) SetAddrs(addrs []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	for addr, n := range c.nodes {
		if !slices.Contains(addrs, addr) {
			c.log.Info("logic node left", "addr", addr)
			n.stop()
			delete(c.nodes, addr)
		}
	}
	for _, addr := range addrs {
		if _, ok := c.nodes[addr]; ok || addr == "" {
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		n := &node{addr: addr, stop: cancel}
		c.nodes[addr] = n
		c.wg.Add(1)
		go c.keep(ctx, n)
	}
}

// Links returns how many logic nodes are reachable now.
func (c *Client) Links() int { return len(*c.live.Load()) }

// WaitReady waits until at least one logic node is reachable.
func (c *Client) WaitReady(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for c.Links() == 0 {
		select {
		case <-ctx.Done():
			return errors.New("rpc: no logic node reachable")
		case <-t.C:
		}
	}
	return nil
}

// Close closes every link; calls in flight fail with StatusUnavailable.
func (c *Client) Close() {
	c.mu.Lock()
	c.closed = true
	for addr, n := range c.nodes {
		n.stop()
		delete(c.nodes, addr)
	}
	c.mu.Unlock()
	c.wg.Wait()
	c.cancel()
}

// keep holds a link to n open until ctx ends.
func (c *Client) keep(ctx context.Context, n *node) {
	defer c.wg.Done()
	var backoff time.Duration
	for ctx.Err() == nil {
		l, err := c.dial(ctx, n.addr)
		if err != nil {
			backoff = min(max(2*backoff, 50*time.Millisecond), 5*time.Second)
			wait := backoff/2 + rand.N(backoff/2+1)
			c.log.Warn("logic node unreachable; retrying", "addr", n.addr, "err", err, "retry_in", wait)
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
			continue
		}
		backoff = 0
		c.log.Info("logic link open", "addr", n.addr, "node", l.Peer())
		c.setLive(l, true)
		c.sendGone(l)
		select {
		case <-ctx.Done():
			_ = l.Close()
		case <-l.Done():
			c.log.Warn("logic link closed; redialling", "addr", n.addr, "err", l.Err())
		}
		c.setLive(l, false)
	}
}

func (c *Client) setLive(l *Link, up bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if up {
		c.opts.Metrics.link("gateway", 1)
	} else {
		c.opts.Metrics.link("gateway", -1)
	}
	cur := *c.live.Load()
	next := make([]*Link, 0, len(cur)+1)
	for _, x := range cur {
		if x != l {
			next = append(next, x)
		}
	}
	if up {
		next = append(next, l)
	}
	c.live.Store(&next)
}

func (c *Client) dial(ctx context.Context, addr string) (*Link, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.DialTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if c.opts.TLS != nil {
		if nc, err = clientTLS(ctx, nc, c.opts.TLS, addr); err != nil {
			return nil, err
		}
	}
	gb := c.gate.Load()
	if gb == nil {
		_ = nc.Close()
		return nil, errors.New("rpc: Configure was not called")
	}
	l := newLink(c.ctx, nc, c.handle, c.log, c.opts.Metrics)
	var resp pb.RPCHelloResponse
	hello := &pb.RPCHello{Gate: gb.id, GateAddr: gb.addr, Version: c.opts.Version}
	signHello(hello, c.opts.Secret, time.Now())
	if _, err := l.Call(ctx, schema.Header{Cmd: schema.RPCHello}, hello, &resp); err != nil {
		_ = l.Close()
		return nil, err
	}
	l.SetPeer(resp.GetNode())
	if resp.GetAnnounce() {
		ss := gb.g.Sessions()
		actx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := announce(actx, l, ss)
		cancel()
		if err != nil {
			_ = l.Close()
			return nil, err
		}
		if len(ss) > 0 {
			c.log.Info("sessions announced to logic", "node", resp.GetNode(), "sessions", len(ss))
		}
	}
	return l, nil
}

// announce sends ss to the logic node at the other end of l, in batches.
func announce(ctx context.Context, l *Link, ss []router.Session) error {
	for i := 0; i < len(ss); i += announceBatch {
		batch := ss[i:min(i+announceBatch, len(ss))]
		m := &pb.RPCAnnounce{Sessions: make([]*pb.RPCSession, len(batch))}
		for j := range batch {
			m.Sessions[j] = sessionToPB(batch[j])
		}
		if _, err := l.Call(ctx, schema.Header{Cmd: schema.RPCAnnounce}, m, nil); err != nil {
			return fmt.Errorf("announce %d sessions: %w", len(ss), err)
		}
	}
	return nil
}

// Announce registers ss again through one logic node, for a router that
// lost them (the gateway's membership lapsed and its sessions were
// purged).
func (c *Client) Announce(ctx context.Context, ss []router.Session) error {
	l, err := c.pick()
	if err != nil {
		return err
	}
	return announce(ctx, l, ss)
}

// pick spreads calls over the live links.
func (c *Client) pick() (*Link, error) {
	live := *c.live.Load()
	if len(live) == 0 {
		return nil, schema.Errorf(schema.StatusUnavailable, "no logic node reachable")
	}
	return live[c.next.Add(1)%uint64(len(live))], nil
}

// handle serves logic's calls into the gateway.
func (c *Client) handle(ctx context.Context, l *Link, f *schema.Frame) ([]byte, error) {
	gb := c.gate.Load()
	if gb == nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "rpc: gateway not started")
	}
	switch f.Cmd {
	case schema.RPCPush:
		var in pb.RPCPush
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		if !schema.Cmd(in.GetCmd()).Known() {
			return nil, schema.Errorf(schema.StatusBadArgument, "rpc: push of unknown command %#x", in.GetCmd())
		}
		queued := make([]bool, len(in.GetConns()))
		if err := gb.g.Push(ctx, in.GetConns(), schema.Cmd(in.GetCmd()), in.GetMsgtype(), f.LogID, in.GetBody(), queued); err != nil {
			return nil, err
		}
		return proto.Marshal(&pb.RPCPushResponse{Queued: queued})
	case schema.RPCKick:
		var in pb.RPCKick
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		if err := gb.g.Kick(ctx, in.GetConn(), in.GetKickout(), f.LogID); err != nil {
			return nil, schema.Errorf(schema.StatusUnknownConn, "%v", err)
		}
		return nil, nil
	case schema.RPCPing:
		return nil, nil
	}
	return nil, schema.Errorf(schema.StatusUnknownCmd, "rpc: the gateway does not serve %s", f.Cmd)
}

// Login implements logic.API.
func (c *Client) Login(ctx context.Context, in logic.LoginInput) (logic.LoginResult, error) {
	l, err := c.pick()
	if err != nil {
		return logic.LoginResult{}, err
	}
	var resp pb.RPCLoginResponse
	_, err = l.Call(ctx, schema.Header{Cmd: schema.RPCLogin, AppCode: in.AppCode, UID: in.UID, LogID: in.LogID},
		&pb.RPCLogin{Appcode: in.AppCode, Uid: in.UID, Token: in.Token, DeviceId: in.DeviceID, Platform: in.Platform, Conn: in.Conn}, &resp)
	if err != nil {
		return logic.LoginResult{}, err
	}
	return logic.LoginResult{Session: sessionFromPB(resp.GetSession()), Evicted: int(resp.GetEvicted())}, nil
}

// Logout implements logic.API.
func (c *Client) Logout(ctx context.Context, s router.Session) error {
	l, err := c.pick()
	if err != nil {
		return err
	}
	_, err = l.Call(ctx, schema.Header{Cmd: schema.RPCLogout, AppCode: s.AppCode, UID: s.UID}, &pb.RPCSessionOnly{Session: sessionToPB(s)}, nil)
	return err
}

// Disconnected implements logic.API. A disconnect that no logic node can
// take now is kept and sent when a link is up again, so that the session
// does not linger in the router.
func (c *Client) Disconnected(_ context.Context, s router.Session) {
	l, err := c.pick()
	if err == nil {
		err = l.Notify(schema.Header{Cmd: schema.RPCDisconnected, AppCode: s.AppCode, UID: s.UID}, &pb.RPCSessionOnly{Session: sessionToPB(s)})
	}
	if err != nil {
		c.keepGone(s)
	}
}

func (c *Client) keepGone(ss ...router.Session) {
	c.goneMu.Lock()
	defer c.goneMu.Unlock()
	c.gone = append(c.gone, ss...)
	if over := len(c.gone) - maxGone; over > 0 {
		c.log.Warn("too many disconnects waiting for a logic node; dropping the oldest", "dropped", over)
		c.gone = append(c.gone[:0], c.gone[over:]...)
	}
}

// sendGone tells the logic node behind l of the disconnects kept while no
// node was reachable.
func (c *Client) sendGone(l *Link) {
	c.goneMu.Lock()
	gone := c.gone
	c.gone = nil
	c.goneMu.Unlock()
	for i, s := range gone {
		if err := l.Notify(schema.Header{Cmd: schema.RPCDisconnected, AppCode: s.AppCode, UID: s.UID}, &pb.RPCSessionOnly{Session: sessionToPB(s)}); err != nil {
			c.keepGone(gone[i:]...)
			return
		}
	}
	if len(gone) > 0 {
		c.log.Info("disconnects sent that waited for a logic node", "sessions", len(gone))
	}
}

// Gone returns how many disconnects wait for a logic node.
func (c *Client) Gone() int {
	c.goneMu.Lock()
	defer c.goneMu.Unlock()
	return len(c.gone)
}

// Handle implements logic.API: the client's header and body travel as
// they are, the response body comes back as it is.
func (c *Client) Handle(ctx context.Context, s router.Session, h *schema.Header, body []byte) ([]byte, error) {
	l, err := c.pick()
	if err != nil {
		return nil, err
	}
	var hb [schema.HeaderLen]byte
	hh := *h
	hh.BodyLen = uint32(len(body))
	hh.Put(hb[:])
	return l.Call(ctx, schema.Header{Cmd: schema.RPCHandle, AppCode: h.AppCode, UID: h.UID, LogID: h.LogID, MsgType: h.MsgType},
		&pb.RPCHandle{Session: sessionToPB(s), Header: hb[:], Body: body}, nil)
}
