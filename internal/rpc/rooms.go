package rpc

import (
	"context"
	"crypto/hmac"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

// Room is one data center of the deployment, as every node is told.
type Room struct {
	DC    string
	Peers []string // peer-link addresses of its logic nodes
	// NodeLo and NodeHi bound the snowflake node ids its logic nodes
	// lease, so a msgid names the DC that minted it.
	NodeLo, NodeHi int64
}

// RoomsOptions configures Rooms.
type RoomsOptions struct {
	DC      string // this node's DC: one of Rooms
	Node    string // this logic node's id
	Version string
	Rooms   []Room // every DC, the same list in the same order on every node
	Svc     *logic.Service
	// Secret signs the hellos (the cluster secret); empty: none.
	Secret string
	// ServerTLS and ClientTLS put the links under mutual TLS (MutualTLS).
	ServerTLS, ClientTLS *tls.Config
	// QueueBytes bounds, per other DC, what is kept while its link is
	// down. Default 64 MiB.
	QueueBytes int
	// Resync asks this DC's gateways to announce their sessions again, so
	// that the other DCs' mirrors of them are whole (after a link came
	// back, or when another DC's router lost its mirror).
	Resync func()
	// Gateways lists this DC's live gateways that are not draining, for
	// the other DCs' GET /v1/gateways (peer-gateways, rooms_gateways.go);
	// nil: none.
	Gateways func(ctx context.Context) ([]logic.GatewayInfo, error)
	Logger   *slog.Logger
	Registry prometheus.Registerer
}

// Rooms links this logic node to the logic tiers of the other DCs and
// implements logic.Rooms over those links: one outbound link per other DC
// (to one of its peers, the next one when it fails) carries this node's
// requests; the links other DCs' nodes dial in carry theirs. Frames queued
// on a link leave together, so a busy link batches by itself; session
// changes are batched explicitly.
type Rooms struct {
	o     RoomsOptions
	log   *slog.Logger
	peers map[string]*peer
	order []string // DCs in config order (HomeDC)

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	ln      net.Listener
	inbound map[*Link]struct{}
	closed  bool

	gws gatewayCache // the other DCs' gateways (rooms_gateways.go)

	mUp       *prometheus.GaugeVec
	mForward  *prometheus.CounterVec
	mQueued   *prometheus.GaugeVec
	mMirror   *prometheus.CounterVec
	mDropped  *prometheus.CounterVec
	mLinkUps  *prometheus.CounterVec
	mRTT      *prometheus.HistogramVec
	mInbound  *prometheus.GaugeVec
	mResyncs  prometheus.Counter
	mReplayed *prometheus.CounterVec
}

var _ logic.Rooms = (*Rooms)(nil)

// peer is one other DC, as seen from this node.
type peer struct {
	r     *Rooms
	dc    string
	addrs []string

	mu        sync.Mutex
	link      *Link  // the outbound link; nil while down or replaying
	held      []held // requests kept while the link is down, in order
	heldBytes int    // their size, bounded by QueueBytes
	ops       []*pb.PeerMirrorOp
	opsLost   bool          // mirror ops dropped: resync when the link is back
	wake      chan struct{} // ops to send
	inbound   int           // links from this DC's nodes
}

// held is a request kept for the link.
type held struct {
	h    schema.Header
	body []byte
}

// NewRooms validates o and starts linking to the other DCs.
func NewRooms(o RoomsOptions) (*Rooms, error) {
	if o.Svc == nil || o.DC == "" || o.Node == "" {
		return nil, errors.New("rpc: rooms need a service, a DC and a node id")
	}
	if o.QueueBytes <= 0 {
		o.QueueBytes = 64 << 20
	}
	if o.Resync == nil {
		o.Resync = func() {}
	}
	r := &Rooms{o: o, log: o.Logger, peers: map[string]*peer{}, inbound: map[*Link]struct{}{}}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	self := false
	for _, rm := range o.Rooms {
		if rm.DC == "" {
			return nil, errors.New("rpc: a room without a dc name")
		}
		if _, dup := r.peers[rm.DC]; dup || (rm.DC == o.DC && self) {
			return nil, fmt.Errorf("rpc: room %s listed twice", rm.DC)
		}
		if rm.NodeLo < 0 || rm.NodeHi > 1023 || rm.NodeLo > rm.NodeHi {
			return nil, fmt.Errorf("rpc: room %s: node ids %d-%d are not a range within 0-1023", rm.DC, rm.NodeLo, rm.NodeHi)
		}
		r.order = append(r.order, rm.DC)
		if rm.DC == o.DC {
			self = true
			continue
		}
		if len(rm.Peers) == 0 {
			return nil, fmt.Errorf("rpc: room %s has no peers to link to", rm.DC)
		}
		r.peers[rm.DC] = &peer{r: r, dc: rm.DC, addrs: rm.Peers, wake: make(chan struct{}, 1)}
	}
	if !self {
		return nil, fmt.Errorf("rpc: this node's DC %q is not among the rooms", o.DC)
	}
	for i, a := range o.Rooms {
		for _, b := range o.Rooms[i+1:] {
			if a.NodeLo <= b.NodeHi && b.NodeLo <= a.NodeHi {
				return nil, fmt.Errorf("rpc: rooms %s and %s share node ids: msgids of the two DCs could collide", a.DC, b.DC)
			}
		}
	}
	if err := r.metrics(o.Registry); err != nil {
		return nil, err
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	for _, p := range r.peers {
		r.mUp.WithLabelValues(p.dc).Set(0)
		r.wg.Add(2)
		go p.keep()
		go p.sendOps()
	}
	return r, nil
}

func (r *Rooms) metrics(reg prometheus.Registerer) error {
	r.mUp = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "dc", Name: "link_up",
		Help: "1 while this logic node's link to the DC is open."}, []string{"dc"})
	r.mInbound = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "dc", Name: "inbound_links",
		Help: "Links the DC's logic nodes hold open to this node."}, []string{"dc"})
	r.mForward = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "dc", Name: "forwarded_total",
		Help: "Requests sent to the DC by kind: push, kick, mirror, forward, ack, resync."}, []string{"dc", "cmd"})
	r.mQueued = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "dc", Name: "link_queued_bytes",
		Help: "Bytes kept for the DC while its link is down."}, []string{"dc"})
	r.mMirror = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "dc", Name: "mirror_events_total",
		Help: "Session changes by direction (sent, applied) and kind (login, end, purge)."}, []string{"dc", "kind"})
	r.mDropped = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "dc", Name: "dropped_total",
		Help: "What the DC's link could not keep (its queue was full): push, kick, mirror."}, []string{"dc", "cmd"})
	r.mReplayed = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "dc", Name: "replayed_total",
		Help: "Requests kept while the DC's link was down and sent when it came back."}, []string{"dc"})
	r.mLinkUps = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "imd", Subsystem: "dc", Name: "link_opens_total",
		Help: "Times this node's link to the DC opened."}, []string{"dc"})
	r.mRTT = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "imd", Subsystem: "dc", Name: "call_seconds",
		Help: "Time of requests to the DC, answer included.", Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}},
		[]string{"dc"})
	r.mResyncs = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "imd", Subsystem: "dc", Name: "resyncs_total",
		Help: "Times this node asked its DC's gateways to announce their sessions again for the other DCs."})
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{r.mUp, r.mInbound, r.mForward, r.mQueued, r.mMirror, r.mDropped, r.mReplayed, r.mLinkUps, r.mRTT, r.mResyncs} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("rpc: rooms metrics: %w", err)
		}
	}
	return nil
}

// DC implements logic.Rooms.
func (r *Rooms) DC() string { return r.o.DC }

// HomeDC implements logic.Rooms: a hash of the group id over the rooms,
// in config order, so every node of every DC names the same one.
func (r *Rooms) HomeDC(group uint64) string {
	h := fnv.New64a()
	var b [8]byte
	for i := range b {
		b[i] = byte(group >> (8 * i))
	}
	h.Write(b[:])
	return r.order[h.Sum64()%uint64(len(r.order))]
}

// MsgDC implements logic.Rooms.
func (r *Rooms) MsgDC(msgid uint64) string {
	node := int64(msgid>>12) & 1023
	for _, rm := range r.o.Rooms {
		if node >= rm.NodeLo && node <= rm.NodeHi {
			return rm.DC
		}
	}
	return ""
}

// SessionChanged implements logic.Rooms.
func (r *Rooms) SessionChanged(s router.Session, on bool) {
	kind := "end"
	if on {
		kind = "login"
	}
	op := &pb.PeerMirrorOp{Session: sessionToPB(s), On: on}
	for _, p := range r.peers {
		p.addOp(op, kind)
	}
}

// GatePurged implements logic.Rooms.
func (r *Rooms) GatePurged(gate string) {
	op := &pb.PeerMirrorOp{Purge: gate}
	for _, p := range r.peers {
		p.addOp(op, "purge")
	}
}

// Gate implements logic.Rooms.
func (r *Rooms) Gate(dc, gate string) logic.Gate {
	p := r.peers[dc]
	if p == nil {
		return nil
	}
	return dcGate{p: p, gate: gate}
}

// Forward implements logic.Rooms. It waits for the other DC: a group
// send's answer carries the seq its home DC gave.
func (r *Rooms) Forward(ctx context.Context, dc string, sess router.Session, h *schema.Header, body []byte) ([]byte, error) {
	p := r.peers[dc]
	if p == nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "data center %s is not linked to this one", dc)
	}
	l := p.current()
	if l == nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "data center %s is unreachable; retry", dc)
	}
	hb := make([]byte, schema.HeaderLen)
	h.Put(hb)
	b, err := proto.Marshal(&pb.PeerForward{Session: sessionToPB(sess), Header: hb, Body: body})
	if err != nil {
		return nil, err
	}
	return p.call(ctx, l, schema.Header{Cmd: schema.RPCPeerForward, LogID: h.LogID}, b, "forward")
}

// Acked implements logic.Rooms.
func (r *Rooms) Acked(dc string, sess router.Session, msgids []uint64, logid uint64) {
	p := r.peers[dc]
	if p == nil {
		return
	}
	b, _ := proto.Marshal(&pb.PeerAck{Session: sessionToPB(sess), Msgids: msgids})
	p.send(schema.Header{Cmd: schema.RPCPeerAck, LogID: logid}, b, "ack")
}

// RequestResync asks every other DC to announce its sessions again: this
// DC's router lost its mirror of them (a Redis master came back empty).
func (r *Rooms) RequestResync() {
	for _, p := range r.peers {
		p.send(schema.Header{Cmd: schema.RPCPeerResync}, nil, "resync")
	}
}

// Links reports, per other DC, whether this node's link to it is open.
func (r *Rooms) Links() map[string]bool {
	out := make(map[string]bool, len(r.peers))
	for dc, p := range r.peers {
		out[dc] = p.current() != nil
	}
	return out
}

// Close sends the session changes still waiting for links that are up
// (bounded by ctx and 2 seconds), then stops linking and closes every
// link. What is held for a link that is down is dropped: it was stored
// (c2c) or is soft state that the other DC rebuilds (a resync).
func (r *Rooms) Close(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for ctx.Err() == nil && r.pendingOps() {
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Millisecond):
		}
	}
	r.mu.Lock()
	r.closed = true
	ln := r.ln
	in := make([]*Link, 0, len(r.inbound))
	for l := range r.inbound {
		in = append(in, l)
	}
	r.mu.Unlock()
	r.cancel()
	if ln != nil {
		_ = ln.Close()
	}
	for _, l := range in {
		_ = l.Close()
	}
	r.wg.Wait()
}

// pendingOps reports whether session changes wait for a link that is up.
func (r *Rooms) pendingOps() bool {
	for _, p := range r.peers {
		p.mu.Lock()
		waiting := p.link != nil && len(p.ops) > 0
		p.mu.Unlock()
		if waiting {
			return true
		}
	}
	return false
}

// ---- the outbound side

func (p *peer) current() *Link {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.link
}

// call sends one request on l and times it.
func (p *peer) call(ctx context.Context, l *Link, h schema.Header, body []byte, kind string) ([]byte, error) {
	p.r.mForward.WithLabelValues(p.dc, kind).Inc()
	start := time.Now()
	rb, err := l.CallRaw(ctx, h, body)
	p.r.mRTT.WithLabelValues(p.dc).Observe(time.Since(start).Seconds())
	return rb, err
}

// hold keeps a request for the link; false when the queue is full.
func (p *peer) hold(h schema.Header, body []byte, kind string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.heldBytes+len(body)+schema.HeaderLen > p.r.o.QueueBytes {
		p.r.mDropped.WithLabelValues(p.dc, kind).Inc()
		return false
	}
	p.held = append(p.held, held{h: h, body: body})
	p.heldBytes += len(body) + schema.HeaderLen
	p.r.mQueued.WithLabelValues(p.dc).Set(float64(p.heldBytes))
	return true
}

// send delivers a request whose answer nobody waits for: now when the
// link is up, else when it is back.
func (p *peer) send(h schema.Header, body []byte, kind string) {
	p.mu.Lock()
	l := p.link
	p.mu.Unlock()
	if l == nil {
		if !p.hold(h, body, kind) {
			p.r.log.Warn("dc link queue full; dropped", "dc", p.dc, "cmd", h.Cmd.String(), "logid", h.LogID)
		}
		return
	}
	p.r.wg.Add(1)
	go func() {
		defer p.r.wg.Done()
		ctx, cancel := context.WithTimeout(p.r.ctx, 30*time.Second)
		defer cancel()
		if _, err := p.call(ctx, l, h, body, kind); err != nil {
			var se *schema.Error
			if errors.As(err, &se) && se.Status == schema.StatusUnavailable && l.Err() != nil {
				p.hold(h, body, kind) // the link broke under it: again when it is back
				return
			}
			p.r.log.Warn("dc request failed", "dc", p.dc, "cmd", h.Cmd.String(), "err", err, "logid", h.LogID)
		}
	}()
}

func (p *peer) addOp(op *pb.PeerMirrorOp, kind string) {
	p.r.mMirror.WithLabelValues(p.dc, "sent_"+kind).Inc()
	p.mu.Lock()
	// Each op is about 80 bytes; bound them with the rest of the queue.
	if len(p.ops)*80+p.heldBytes > p.r.o.QueueBytes {
		p.opsLost = true
		p.mu.Unlock()
		p.r.mDropped.WithLabelValues(p.dc, "mirror").Inc()
		return
	}
	p.ops = append(p.ops, op)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// sendOps sends the session changes in batches, in order, one batch in
// flight at a time; while the link is down they wait.
func (p *peer) sendOps() {
	defer p.r.wg.Done()
	const maxBatch = 1024
	for {
		select {
		case <-p.r.ctx.Done():
			return
		case <-p.wake:
		}
		for {
			p.mu.Lock()
			l := p.link
			n := min(len(p.ops), maxBatch)
			if l == nil || n == 0 {
				p.mu.Unlock()
				break
			}
			batch := p.ops[:n:n]
			p.mu.Unlock()
			b, _ := proto.Marshal(&pb.PeerMirror{Ops: batch})
			ctx, cancel := context.WithTimeout(p.r.ctx, 30*time.Second)
			_, err := p.call(ctx, l, schema.Header{Cmd: schema.RPCPeerMirror}, b, "mirror")
			cancel()
			if err != nil {
				if p.r.ctx.Err() != nil {
					return
				}
				p.r.log.Warn("dc session changes not sent; again when the link is back", "dc", p.dc, "ops", n, "err", err)
				select { // the link is closing: keep's next round wakes us
				case <-l.Done():
				case <-time.After(time.Second):
				case <-p.r.ctx.Done():
					return
				}
				continue
			}
			p.mu.Lock()
			p.ops = p.ops[n:]
			if len(p.ops) == 0 {
				p.ops = nil
			}
			p.mu.Unlock()
		}
	}
}

// keep holds the outbound link to one of the DC's peers open: it starts
// at a peer chosen by this node's id (spreading the links) and moves to
// the next when one fails.
func (p *peer) keep() {
	defer p.r.wg.Done()
	h := fnv.New32a()
	h.Write([]byte(p.r.o.Node))
	next := int(h.Sum32() % uint32(len(p.addrs)))
	var backoff time.Duration
	for p.r.ctx.Err() == nil {
		addr := p.addrs[next]
		l, err := p.dial(addr)
		if err != nil {
			next = (next + 1) % len(p.addrs)
			backoff = min(max(2*backoff, 50*time.Millisecond), 2*time.Second)
			wait := backoff/2 + rand.N(backoff/2+1)
			p.r.log.Warn("dc peer unreachable; trying the next", "dc", p.dc, "addr", addr, "err", err, "retry_in", wait)
			select {
			case <-p.r.ctx.Done():
				return
			case <-time.After(wait):
			}
			continue
		}
		backoff = 0
		p.r.log.Info("dc link open", "dc", p.dc, "addr", addr, "peer", l.Peer())
		p.up(l)
		select {
		case <-p.r.ctx.Done():
			_ = l.Close()
		case <-l.Done():
			p.r.log.Warn("dc link closed; redialling", "dc", p.dc, "addr", addr, "err", l.Err())
		}
		p.mu.Lock()
		if p.link == l {
			p.link = nil
		}
		p.mu.Unlock()
		p.r.mUp.WithLabelValues(p.dc).Set(0)
	}
}

// up replays what was held, in order, then opens the link to new
// requests, sends the session changes that waited, and has this DC's
// gateways announce their sessions again: changes made while the link
// was down may have been lost with a node that died meanwhile.
func (p *peer) up(l *Link) {
	replayed := 0
	for l.Err() == nil {
		p.mu.Lock()
		batch := p.held
		p.held, p.heldBytes = nil, 0
		if len(batch) == 0 {
			p.link = l
			p.mu.Unlock()
			break
		}
		p.mu.Unlock()
		// One at a time, in order: the other DC serves a link's requests
		// concurrently, and a sender's messages must arrive in its order.
		for i, x := range batch {
			ctx, cancel := context.WithTimeout(p.r.ctx, 30*time.Second)
			_, err := p.call(ctx, l, x.h, x.body, "replay")
			cancel()
			if err != nil && l.Err() != nil {
				// The link broke again: keep the rest, in order, for the
				// next one (the one that failed may have arrived: a
				// notify shown twice is dropped by the client).
				p.mu.Lock()
				p.held = append(slices.Clone(batch[i:]), p.held...)
				for _, y := range batch[i:] {
					p.heldBytes += len(y.body) + schema.HeaderLen
				}
				p.mu.Unlock()
				p.r.log.Warn("dc link broke while sending what was kept; again on the next link", "dc", p.dc, "left", len(batch)-i)
				return
			}
			if err != nil {
				p.r.log.Warn("dc replay failed", "dc", p.dc, "cmd", x.h.Cmd.String(), "err", err, "logid", x.h.LogID)
			}
			replayed++
		}
	}
	if l.Err() != nil {
		return
	}
	p.r.mQueued.WithLabelValues(p.dc).Set(0)
	p.r.mUp.WithLabelValues(p.dc).Set(1)
	p.r.mLinkUps.WithLabelValues(p.dc).Inc()
	if replayed > 0 {
		p.r.mReplayed.WithLabelValues(p.dc).Add(float64(replayed))
		p.r.log.Info("dc link back: kept requests sent", "dc", p.dc, "requests", replayed)
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
	p.r.mResyncs.Inc()
	p.r.o.Resync()
}

func (p *peer) dial(addr string) (*Link, error) {
	ctx, cancel := context.WithTimeout(p.r.ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tuneTCP(nc)
	if p.r.o.ClientTLS != nil {
		if nc, err = clientTLS(ctx, nc, p.r.o.ClientTLS, addr); err != nil {
			return nil, err
		}
	}
	l := newLink(p.r.ctx, nc, p.r.serve, p.r.log, nil)
	hello := &pb.PeerHello{Dc: p.r.o.DC, Node: p.r.o.Node, Version: p.r.o.Version}
	if p.r.o.Secret != "" {
		hello.TimeMs = time.Now().UnixMilli()
		hello.Mac = helloMAC(p.r.o.Secret, peerHelloName(hello.Dc, hello.Node), hello.TimeMs)
	}
	var resp pb.PeerHelloResponse
	if _, err := l.Call(ctx, schema.Header{Cmd: schema.RPCPeerHello}, hello, &resp); err != nil {
		_ = l.Close()
		return nil, err
	}
	if resp.GetDc() != p.dc {
		_ = l.Close()
		return nil, fmt.Errorf("the node at %s is in DC %q, not %q: check the rooms' peers", addr, resp.GetDc(), p.dc)
	}
	l.SetPeer(resp.GetDc() + "/" + resp.GetNode())
	return l, nil
}

func peerHelloName(dc, node string) string { return "peer:" + dc + "/" + node }

// dcGate is a gateway of another DC.
type dcGate struct {
	p    *peer
	gate string
}

// Push implements logic.Gate. With the link up it waits for the other
// DC's answer; with the link down the push is kept for the link and
// counts as queued (false for every connection when the queue is full).
func (g dcGate) Push(ctx context.Context, conns []uint64, cmd schema.Cmd, msgtype uint32, logid uint64, body []byte, queued []bool) error {
	b, err := proto.Marshal(&pb.PeerPush{Gate: g.gate, Push: &pb.RPCPush{Conns: conns, Cmd: uint32(cmd), Msgtype: msgtype, Body: body}})
	if err != nil {
		return err
	}
	h := schema.Header{Cmd: schema.RPCPeerPush, MsgType: msgtype, LogID: logid}
	if l := g.p.current(); l != nil {
		rb, err := g.p.call(ctx, l, h, b, "push")
		if err == nil {
			var resp pb.RPCPushResponse
			if err := proto.Unmarshal(rb, &resp); err != nil || len(resp.GetQueued()) != len(conns) {
				return schema.Errorf(schema.StatusInternal, "rpc: peer push answer for %d of %d connections", len(resp.GetQueued()), len(conns))
			}
			copy(queued, resp.GetQueued())
			return nil
		}
		if l.Err() == nil {
			return err // the other DC answered with an error, or ctx ended
		}
		// The link broke under the push: keep it for the next link.
	}
	ok := g.p.hold(h, b, "push")
	for i := range queued {
		queued[i] = ok
	}
	if !ok {
		return schema.Errorf(schema.StatusUnavailable, "data center %s unreachable and its queue is full", g.p.dc)
	}
	return nil
}

// Kick implements logic.Gate; it never waits for the other DC.
func (g dcGate) Kick(_ context.Context, conn uint64, k *pb.Kickout, logid uint64) error {
	b, err := proto.Marshal(&pb.PeerKick{Gate: g.gate, Kick: &pb.RPCKick{Conn: conn, Kickout: k}})
	if err != nil {
		return err
	}
	g.p.send(schema.Header{Cmd: schema.RPCPeerKick, LogID: logid}, b, "kick")
	return nil
}

// ---- the inbound side

// Serve accepts the links of other DCs' logic nodes on ln until Close.
func (r *Rooms) Serve(ln net.Listener) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return net.ErrClosed
	}
	r.ln = ln
	r.mu.Unlock()
	return acceptLoop(ln, "dc links", r.log, func() bool { return r.ctx.Err() != nil }, func(nc net.Conn) bool {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			if r.o.ServerTLS != nil {
				tc, err := serverHandshake(r.ctx, nc, r.o.ServerTLS)
				if err != nil {
					r.log.Warn("dc link refused: tls handshake failed", "remote", nc.RemoteAddr().String(), "err", err)
					return
				}
				nc = tc
			} else {
				tuneTCP(nc)
			}
			r.mu.Lock()
			if r.closed {
				r.mu.Unlock()
				_ = nc.Close()
				return
			}
			l := newLink(r.ctx, nc, r.serve, r.log, nil)
			r.inbound[l] = struct{}{}
			r.mu.Unlock()
			waitClosed(l, r.log, "dc link")
			r.mu.Lock()
			delete(r.inbound, l)
			if dc, _, ok := cutPeer(l.Peer()); ok {
				if p := r.peers[dc]; p != nil {
					p.inbound--
					r.mInbound.WithLabelValues(dc).Set(float64(p.inbound))
				}
				r.log.Info("dc link from a peer closed", "peer", l.Peer(), "err", l.Err())
			}
			r.mu.Unlock()
		}()
		return true
	})
}

// cutPeer splits a DC link's peer name, "dc/node".
func cutPeer(name string) (dc, node string, ok bool) {
	dc, node, ok = strings.Cut(name, "/")
	return dc, node, ok && dc != ""
}

// serve answers a request of another DC on any link, ours or theirs.
func (r *Rooms) serve(ctx context.Context, l *Link, f *schema.Frame) ([]byte, error) {
	if f.Cmd == schema.RPCPeerHello {
		return r.hello(l, f)
	}
	dc, _, ok := cutPeer(l.Peer())
	if !ok {
		return nil, schema.Errorf(schema.StatusNotLoggedIn, "rpc: peer-hello first")
	}
	svc := r.o.Svc
	switch f.Cmd {
	case schema.RPCPeerMirror:
		var in pb.PeerMirror
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		ops := make([]logic.MirrorOp, len(in.GetOps()))
		for i, op := range in.GetOps() {
			ops[i] = logic.MirrorOp{Session: sessionFromPB(op.GetSession()), On: op.GetOn(), Purge: op.GetPurge()}
			kind := "applied_end"
			switch {
			case op.GetPurge() != "":
				kind = "applied_purge"
			case op.GetOn():
				kind = "applied_login"
			}
			r.mMirror.WithLabelValues(dc, kind).Inc()
		}
		return nil, svc.ApplyMirror(ctx, dc, ops)
	case schema.RPCPeerPush:
		var in pb.PeerPush
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		push := in.GetPush()
		queued := make([]bool, len(push.GetConns()))
		if g := svc.LocalGate(in.GetGate()); g != nil {
			if err := g.Push(ctx, push.GetConns(), schema.Cmd(push.GetCmd()), push.GetMsgtype(), f.LogID, push.GetBody(), queued); err != nil {
				r.log.Info("peer push: gate unreachable", "gate", in.GetGate(), "err", err, "logid", f.LogID)
			}
		}
		return proto.Marshal(&pb.RPCPushResponse{Queued: queued})
	case schema.RPCPeerKick:
		var in pb.PeerKick
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		if g := svc.LocalGate(in.GetGate()); g != nil {
			if err := g.Kick(ctx, in.GetKick().GetConn(), in.GetKick().GetKickout(), f.LogID); err != nil {
				r.log.Info("peer kick undeliverable", "gate", in.GetGate(), "conn", in.GetKick().GetConn(), "err", err, "logid", f.LogID)
			}
		}
		return nil, nil
	case schema.RPCPeerForward:
		var in pb.PeerForward
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		h, err := schema.ParseHeader(in.GetHeader(), MaxBody)
		if err != nil {
			return nil, badBody(f.Cmd, err)
		}
		return svc.ServeForwarded(ctx, dc, sessionFromPB(in.GetSession()), &h, in.GetBody())
	case schema.RPCPeerAck:
		var in pb.PeerAck
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		return nil, svc.ServeRemoteAck(ctx, dc, sessionFromPB(in.GetSession()), in.GetMsgids(), f.LogID)
	case schema.RPCPeerResync:
		r.mResyncs.Inc()
		r.o.Resync()
		return nil, nil
	case schema.RPCPeerGateways:
		return r.serveGateways(ctx)
	case schema.RPCPeerBroadcast:
		return r.serveBroadcast(ctx, dc, f)
	case schema.RPCPing:
		return nil, nil
	}
	return nil, schema.Errorf(schema.StatusUnknownCmd, "rpc: a DC link does not serve %s", f.Cmd)
}

func (r *Rooms) hello(l *Link, f *schema.Frame) ([]byte, error) {
	var in pb.PeerHello
	if err := proto.Unmarshal(f.Body, &in); err != nil {
		return nil, badBody(f.Cmd, err)
	}
	p := r.peers[in.GetDc()]
	if p == nil || in.GetNode() == "" {
		return nil, schema.Errorf(schema.StatusBadArgument, "rpc: DC %q is not among this node's rooms", in.GetDc())
	}
	if r.o.Secret != "" {
		if d := time.Since(time.UnixMilli(in.GetTimeMs())); d > helloSkew || d < -helloSkew {
			return nil, schema.Errorf(schema.StatusTokenInvalid, "rpc: peer hello clock %s off this node's; check NTP", d.Round(time.Second))
		}
		if !hmac.Equal(in.GetMac(), helloMAC(r.o.Secret, peerHelloName(in.GetDc(), in.GetNode()), in.GetTimeMs())) {
			return nil, schema.Errorf(schema.StatusTokenInvalid, "rpc: peer hello signed with another cluster secret")
		}
	}
	r.mu.Lock()
	if _, ours := r.inbound[l]; ours && l.Peer() == "" {
		p.inbound++
		r.mInbound.WithLabelValues(p.dc).Set(float64(p.inbound))
	}
	r.mu.Unlock()
	l.SetPeer(in.GetDc() + "/" + in.GetNode())
	r.log.Info("dc link from a peer", "peer", l.Peer(), "remote", l.RemoteAddr(), "version", in.GetVersion())
	return proto.Marshal(&pb.PeerHelloResponse{Dc: r.o.DC, Node: r.o.Node})
}
