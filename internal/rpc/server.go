package rpc

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// serveTimeout bounds a request served for a gateway whose own deadline
// did not come along (the gateway bounds each call with its
// RequestTimeout; this is the backstop).
const serveTimeout = 30 * time.Second

// Server is the logic side: it serves logic.API to the gateways that dial
// it and reaches each of them as a logic.Gate over the same link.
type Server struct {
	svc     *logic.Service
	node    string
	version string
	log     *slog.Logger

	// local: the router is in this process (no Redis): gateways announce
	// their sessions on every new link, and a gateway whose link closed
	// has its sessions purged (it announces them again when it is back).
	local  bool
	m      *Metrics
	secret string
	tls    *tls.Config // ServerOptions.TLS
	// hsCtx bounds TLS handshakes under way; Close cancels it first.
	hsCtx    context.Context
	hsCancel context.CancelFunc

	mu       sync.Mutex
	ln       net.Listener
	links    map[*Link]struct{}
	gates    map[string]*Link // the current link of each gateway
	draining bool             // Close has begun: no new links, no new work
	wg       sync.WaitGroup   // one per link
	serving  sync.WaitGroup   // one per request being served
	ctx      context.Context
	cancel   context.CancelFunc
}

// ServerOptions configures a Server.
type ServerOptions struct {
	Node    string // names this logic node in hellos
	Version string
	// LocalRouter says the logic's router lives in this process (not in
	// Redis): gateways then announce their sessions on each new link.
	LocalRouter bool
	Logger      *slog.Logger
	Metrics     *Metrics
	// Secret, when set, is the cluster secret every gateway's hello must
	// be signed with.
	Secret string
	// TLS, when set, puts every link under TLS (see MutualTLS): with
	// ClientAuth RequireAndVerifyClientCert, a gateway without a client
	// certificate its ClientCAs signed cannot link.
	TLS *tls.Config
}

// NewServer returns a server for svc.
func NewServer(svc *logic.Service, o ServerOptions) *Server {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{svc: svc, node: o.Node, version: o.Version, local: o.LocalRouter, log: log, m: o.Metrics, secret: o.Secret, tls: o.TLS,
		links: make(map[*Link]struct{}), gates: make(map[string]*Link)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.hsCtx, s.hsCancel = context.WithCancel(context.Background())
	return s
}

// Serve accepts gateway links on ln until Close.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.ln = ln
	s.mu.Unlock()
	stopping := func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.draining
	}
	return acceptLoop(ln, "gateway links", s.log, stopping, func(nc net.Conn) bool {
		if s.tls == nil {
			return s.addLink(nc)
		}
		// The handshake runs on a goroutine of its own (counted in wg, so
		// Close waits for it), not to hold up the accept loop.
		s.mu.Lock()
		if s.draining {
			s.mu.Unlock()
			_ = nc.Close()
			return false
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			tc, err := s.serverTLS(nc)
			if err != nil {
				s.log.Warn("rpc link refused: tls handshake failed", "remote", nc.RemoteAddr().String(), "err", err)
				return
			}
			s.addLink(tc)
		}()
		return true
	})
}

// addLink serves a gateway's link on nc; false (nc closed) once Close
// has begun.
func (s *Server) addLink(nc net.Conn) bool {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		_ = nc.Close()
		return false
	}
	l := newLink(s.ctx, nc, s.serve, s.log, s.m)
	s.links[l] = struct{}{}
	s.m.link("logic", 1)
	s.wg.Add(1)
	s.mu.Unlock()
	go s.watch(l)
	return true
}

// watch waits for l to close and forgets the gateway it served.
func (s *Server) watch(l *Link) {
	defer s.wg.Done()
	waitClosed(l, s.log, "rpc link")
	if id := l.Peer(); id != "" {
		s.svc.ReleaseGate(id, remoteGate{l})
		s.log.Info("gateway link closed", "gate", id, "remote", l.RemoteAddr(), "err", l.Err())
		s.mu.Lock()
		current := s.gates[id] == l
		if current {
			delete(s.gates, id)
		}
		// With the router in this process nobody else will purge this
		// gateway's sessions: do it, unless it came back on a new link
		// (which announced them again) or this node is stopping. Under
		// the lock: a new link's hello waits for the purge, so the
		// sessions it announces next are not purged after it.
		if current && s.local && !s.draining {
			s.svc.DetachGate(s.ctx, id)
		}
		s.mu.Unlock()
	}
	s.mu.Lock()
	delete(s.links, l)
	s.mu.Unlock()
	s.m.link("logic", -1)
}

// Close stops accepting, lets the requests being served finish until ctx
// is done (new ones get StatusShuttingDown; disconnects and logouts are
// still served), then closes every link. Gateways move to the logic nodes
// still alive.
func (s *Server) Close(ctx context.Context) {
	s.mu.Lock()
	s.draining = true
	if s.ln != nil {
		_ = s.ln.Close()
	}
	s.mu.Unlock()
	s.hsCancel() // handshakes under way fail: their links would not be served
	done := make(chan struct{})
	go func() { s.serving.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn("rpc: closing with requests still being served", "err", ctx.Err())
	}
	s.mu.Lock()
	for l := range s.links {
		_ = l.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.cancel()
}

// Gateways returns how many gateway links are open.
func (s *Server) Gateways() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.links)
}

func badBody(cmd schema.Cmd, err error) error {
	return schema.Errorf(schema.StatusBadBody, "rpc: %s body: %v", cmd, err)
}

// serve counts the request for Close and refuses new work while draining.
func (s *Server) serve(ctx context.Context, l *Link, f *schema.Frame) ([]byte, error) {
	s.mu.Lock()
	draining := s.draining
	if !draining || f.Cmd == schema.RPCDisconnected || f.Cmd == schema.RPCLogout {
		s.serving.Add(1)
		draining = false
	}
	s.mu.Unlock()
	if draining {
		return nil, schema.Errorf(schema.StatusShuttingDown, "logic node %s is stopping", s.node)
	}
	defer s.serving.Done()
	return s.handle(ctx, l, f)
}

func (s *Server) handle(ctx context.Context, l *Link, f *schema.Frame) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, serveTimeout)
	defer cancel()
	if l.Peer() == "" {
		if f.Cmd != schema.RPCHello {
			_ = l.Close()
			return nil, schema.Errorf(schema.StatusNotLoggedIn, "rpc: %s before hello", f.Cmd)
		}
		var in pb.RPCHello
		if err := proto.Unmarshal(f.Body, &in); err != nil || in.GetGate() == "" {
			_ = l.Close()
			return nil, schema.Errorf(schema.StatusBadBody, "rpc: hello without a gate id (%v)", err)
		}
		if err := checkHello(&in, s.secret, time.Now()); err != nil {
			s.log.Warn("rpc hello refused", "gate", in.GetGate(), "remote", l.RemoteAddr(), "err", err)
			l.closeAfter(time.Second) // after the answer has left
			return nil, err
		}
		l.SetPeer(in.GetGate())
		s.mu.Lock()
		s.gates[in.GetGate()] = l
		s.svc.AttachGate(in.GetGate(), remoteGate{l})
		s.mu.Unlock()
		s.log.Info("gateway link open", "gate", in.GetGate(), "gate_addr", in.GetGateAddr(), "version", in.GetVersion(), "remote", l.RemoteAddr())
		return proto.Marshal(&pb.RPCHelloResponse{Node: s.node, Version: s.version, Announce: s.local})
	}
	switch f.Cmd {
	case schema.RPCLogin:
		var in pb.RPCLogin
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		res, err := s.svc.Login(ctx, logic.LoginInput{
			AppCode: in.GetAppcode(), UID: in.GetUid(), Token: in.GetToken(), DeviceID: in.GetDeviceId(),
			Platform: in.GetPlatform(), Gate: l.Peer(), Conn: in.GetConn(), LogID: f.LogID,
		})
		if err != nil {
			return nil, err
		}
		return proto.Marshal(&pb.RPCLoginResponse{Session: sessionToPB(res.Session), Evicted: uint32(res.Evicted)})
	case schema.RPCLogout, schema.RPCDisconnected:
		var in pb.RPCSessionOnly
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		sess := sessionFromPB(in.GetSession())
		if sess.Gate != l.Peer() {
			return nil, schema.Errorf(schema.StatusBadArgument, "rpc: gateway %s cannot end a session of gateway %s", l.Peer(), sess.Gate)
		}
		if f.Cmd == schema.RPCDisconnected {
			s.svc.Disconnected(ctx, sess)
			return nil, nil
		}
		return nil, s.svc.Logout(ctx, sess)
	case schema.RPCHandle:
		var in pb.RPCHandle
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		h, err := schema.ParseHeader(in.GetHeader(), MaxBody)
		if err != nil {
			return nil, badBody(f.Cmd, err)
		}
		sess := sessionFromPB(in.GetSession())
		if sess.Gate != l.Peer() {
			return nil, schema.Errorf(schema.StatusBadArgument, "rpc: gateway %s cannot act for a session of gateway %s", l.Peer(), sess.Gate)
		}
		return s.svc.Handle(ctx, sess, &h, in.GetBody())
	case schema.RPCAnnounce:
		var in pb.RPCAnnounce
		if err := proto.Unmarshal(f.Body, &in); err != nil {
			return nil, badBody(f.Cmd, err)
		}
		ss := make([]router.Session, 0, len(in.GetSessions()))
		for _, p := range in.GetSessions() {
			sess := sessionFromPB(p)
			if sess.Gate != l.Peer() {
				return nil, schema.Errorf(schema.StatusBadArgument, "rpc: gateway %s cannot announce a session of gateway %s", l.Peer(), sess.Gate)
			}
			ss = append(ss, sess)
		}
		return nil, s.svc.Announce(ctx, ss)
	case schema.RPCPing:
		return nil, nil
	}
	return nil, schema.Errorf(schema.StatusUnknownCmd, "rpc: logic does not serve %s", f.Cmd)
}

// remoteGate is a gateway reached over the link it dialed.
type remoteGate struct{ l *Link }

var _ logic.Gate = remoteGate{}

// Kick implements logic.Gate.
func (g remoteGate) Kick(ctx context.Context, conn uint64, k *pb.Kickout, logid uint64) error {
	_, err := g.l.Call(ctx, schema.Header{Cmd: schema.RPCKick, LogID: logid}, &pb.RPCKick{Conn: conn, Kickout: k}, nil)
	return err
}

// Push implements logic.Gate: one frame for every connection in conns,
// whose header carries the notify's trace id.
func (g remoteGate) Push(ctx context.Context, conns []uint64, cmd schema.Cmd, msgtype uint32, logid uint64, body []byte, queued []bool) error {
	var resp pb.RPCPushResponse
	if _, err := g.l.Call(ctx, schema.Header{Cmd: schema.RPCPush, MsgType: msgtype, LogID: logid}, &pb.RPCPush{Conns: conns, Cmd: uint32(cmd), Msgtype: msgtype, Body: body}, &resp); err != nil {
		return err
	}
	q := resp.GetQueued()
	if len(q) != len(conns) {
		return schema.Errorf(schema.StatusInternal, "rpc: push answer for %d of %d connections", len(q), len(conns))
	}
	copy(queued, q)
	return nil
}
