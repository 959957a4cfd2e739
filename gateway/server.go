// Package gateway is msg-gate: it holds the clients' TCP long connections,
// parses frames, enforces login, keepalive and limits, forwards requests to
// logic and pushes frames to connections. It is the source of truth for who
// is connected to it.
package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// ErrUnknownConn is returned by Kick for a connection this gateway does not hold.
var ErrUnknownConn = errors.New("gateway: unknown connection")

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("gateway: server closed")

const connShards = 64

// Server is a gateway. Create it with New, run it with Serve (or
// ListenAndServe) and stop it with Shutdown. All methods are safe for
// concurrent use.
type Server struct {
	opts  Options
	api   logic.API
	log   *slog.Logger
	m     *metrics
	ctx   context.Context // cancelled by the last step of Shutdown
	stop  context.CancelFunc
	lnMu  sync.Mutex
	ln    net.Listener
	tlsLn net.Listener // Options.TLSAddr; nil without it
	ready chan struct{}
	web   webListener

	reqs     *reqCtxs // the contexts of calls into logic
	work     workPool // the workers of requests and client notifies
	lanes    lanes    // connections' ordered requests waiting their turn
	lim      *limiter // the rate limits (Options.Limits)
	eng      engine
	tlsEng   *goEngine // serves tlsLn
	nextConn atomic.Uint64
	nconns   atomic.Int64
	loggedIn atomic.Int64 // connections in stateLoggedIn (LoggedIn)
	admitMu  sync.RWMutex // draining is set under the write lock, new connections are tracked under the read lock
	draining atomic.Bool
	shards   [connShards]connShard
	wg       sync.WaitGroup // one per connection, flush (goroutine engine), request and logic call

	shutdownOnce sync.Once
}

type connShard struct {
	mu sync.Mutex
	m  map[uint64]*conn

	bmu     sync.Mutex         // guards budgets, apart from mu, which pushes take
	budgets map[uint64]*budget // of busy connections, when Limits.Frames or Bytes is on
}

var _ logic.Gate = (*Server)(nil)

// New returns a gateway that forwards to api.
func New(opts Options, api logic.API) (*Server, error) {
	if api == nil {
		return nil, errors.New("gateway: logic API is required")
	}
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	m, err := newMetrics(opts.Registry)
	if err != nil {
		return nil, err
	}
	s := &Server{opts: opts, api: api, log: opts.Logger.With("gate", opts.ID), m: m, ready: make(chan struct{})}
	s.ctx, s.stop = context.WithCancel(context.Background())
	s.reqs = newReqCtxs(s.ctx, opts.RequestTimeout)
	s.lim = newLimiter(opts.Limits)
	for i := range s.shards {
		s.shards[i].m = make(map[uint64]*conn)
	}
	now := uint64(time.Now().UnixNano())
	s.nextConn.Store(now &^ (1<<20 - 1)) // ids stay unique across restarts within one gate id
	s.eng = newEngine(s)
	if opts.TLSAddr != "" {
		s.tlsEng = &goEngine{s: s, tls: s.opts.TLS, refusals: make(chan struct{}, maxTLSRefusals)}
	}
	s.opts.Engine = s.eng.name()
	return s, nil
}

// ID returns the gateway's id.
func (s *Server) ID() string { return s.opts.ID }

// Options returns the effective options (defaults applied).
func (s *Server) Options() Options { return s.opts }

// Listen binds the configured address; Serve then accepts on it.
func (s *Server) Listen() error {
	var ln, tlsLn net.Listener
	var err error
	if !s.opts.NoPlain {
		if ln, err = net.Listen("tcp", s.opts.Addr); err != nil {
			return fmt.Errorf("gateway: listen %s: %w", s.opts.Addr, err)
		}
	}
	closePlain := func() {
		if ln != nil {
			_ = ln.Close()
		}
	}
	if s.opts.TLSAddr != "" {
		if tlsLn, err = net.Listen("tcp", s.opts.TLSAddr); err != nil {
			closePlain()
			return fmt.Errorf("gateway: tls listen %s: %w", s.opts.TLSAddr, err)
		}
	}
	if err := s.listenWeb(); err != nil {
		closePlain()
		if tlsLn != nil {
			_ = tlsLn.Close()
		}
		return err
	}
	s.lnMu.Lock()
	s.ln = ln
	s.tlsLn = tlsLn
	s.lnMu.Unlock()
	close(s.ready)
	return nil
}

// Addr returns the plain-TCP listen address once Listen has succeeded,
// else nil; it stays nil with Options.NoPlain (see ClientAddr).
func (s *Server) Addr() net.Addr {
	s.lnMu.Lock()
	defer s.lnMu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// TLSAddr returns the TLS listener's address once Listen has succeeded,
// or nil when there is none.
func (s *Server) TLSAddr() net.Addr {
	s.lnMu.Lock()
	defer s.lnMu.Unlock()
	if s.tlsLn == nil {
		return nil
	}
	return s.tlsLn.Addr()
}

// ClientAddr returns the address clients dial: the plain-TCP listener's,
// or the TLS listener's when there is no plain one; nil before Listen.
func (s *Server) ClientAddr() net.Addr {
	if a := s.Addr(); a != nil {
		return a
	}
	return s.TLSAddr()
}

// Serve accepts connections until Shutdown. It returns ErrServerClosed after
// Shutdown and never fails on a transient accept error such as running out
// of file descriptors: it logs, backs off and goes on.
func (s *Server) Serve() error {
	<-s.ready
	if s.ln != nil {
		s.log.Info("gateway serving", "addr", s.ln.Addr().String(), "engine", s.eng.name(), "max_conns", s.opts.MaxConns)
	}
	s.serveWeb()
	if s.tlsLn != nil {
		s.log.Info("gateway tls serving", "addr", s.tlsLn.Addr().String(), "engine", s.tlsEng.name(), "min_version", tls.VersionName(s.opts.TLS.MinVersion), "max_conns", s.opts.MaxConns)
		if s.ln == nil {
			return s.tlsEng.serve(s.tlsLn) // Options.NoPlain
		}
		go func() { _ = s.tlsEng.serve(s.tlsLn) }() // returns ErrServerClosed only
	}
	return s.eng.serve(s.ln)
}

// acceptFailed counts and logs a transient accept error (EMFILE, ENFILE,
// ECONNABORTED and the like: the listener is fine, the moment is not) and
// backs off as net/http does.
func (s *Server) acceptFailed(err error, backoff *time.Duration) {
	*backoff = min(max(2**backoff, 5*time.Millisecond), time.Second)
	s.m.acceptErrors.Inc()
	s.log.Warn("accept failed; backing off", "err", err, "backoff", *backoff)
	time.Sleep(*backoff)
}

// admission returns StatusOK when a newly accepted connection from src
// (the zero Addr when unknown) may be held, else the status to refuse it
// with: draining, from a blocked range (StatusForbidden), at MaxConns, or
// over a new-connection rate limit (StatusRateLimited). Only a connection
// that passes the first three takes a token of the rate limits, and one
// from an allowed range (Options.ACL) takes none.
func (s *Server) admission(src netip.Addr) schema.Status {
	switch {
	case s.draining.Load():
		return schema.StatusShuttingDown
	case s.opts.ACL.BlockedIP(src):
		return schema.StatusForbidden
	case s.nconns.Load() >= int64(s.opts.MaxConns):
		return schema.StatusTooManyConns
	case !s.opts.ACL.AllowedIP(src) && !s.admitRate(src):
		return schema.StatusRateLimited
	}
	return schema.StatusOK
}

// refusal is the message that goes with an admission status.
func refusal(st schema.Status) string {
	switch st {
	case schema.StatusShuttingDown:
		return "gateway is shutting down"
	case schema.StatusRateLimited:
		return "too many new connections; retry later"
	case schema.StatusForbidden:
		return "connections from this address are not allowed"
	}
	return "gateway is at its connection limit"
}

// rejectFrame counts a refused connection and returns the error frame it
// gets.
func (s *Server) rejectFrame(st schema.Status) []byte {
	s.m.rejected.WithLabelValues(st.String()).Inc()
	return errorFrame(nil, &schema.Header{}, st, refusal(st))
}

// ListenAndServe is Listen followed by Serve.
func (s *Server) ListenAndServe() error {
	if err := s.Listen(); err != nil {
		return err
	}
	return s.Serve()
}

// track registers a new connection and calls start (which hands it to its
// engine) unless Shutdown has begun; then it reports false and the caller
// closes the socket.
func (s *Server) track(c *conn, start func()) bool {
	s.admitMu.RLock()
	defer s.admitMu.RUnlock()
	if s.draining.Load() {
		return false
	}
	sh := &s.shards[c.id%connShards]
	sh.mu.Lock()
	sh.m[c.id] = c
	sh.mu.Unlock()
	s.nconns.Add(1)
	s.m.conns.Inc()
	start()
	return true
}

func (s *Server) removeConn(c *conn) {
	sh := &s.shards[c.id%connShards]
	sh.mu.Lock()
	_, ok := sh.m[c.id]
	delete(sh.m, c.id)
	sh.mu.Unlock()
	if s.lim.perConn {
		sh.dropBudget(c.id)
	}
	if ok {
		s.nconns.Add(-1)
		s.m.conns.Dec()
	}
}

func (s *Server) conn(id uint64) *conn {
	sh := &s.shards[id%connShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return sh.m[id]
}

func (s *Server) each(fn func(*conn)) {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		list := make([]*conn, 0, len(sh.m))
		for _, c := range sh.m {
			list = append(list, c)
		}
		sh.mu.Unlock()
		for _, c := range list {
			fn(c)
		}
	}
}

// Draining reports whether Shutdown has begun.
func (s *Server) Draining() bool { return s.draining.Load() }

// Conns returns the number of connections held.
func (s *Server) Conns() int { return int(s.nconns.Load()) }

// LoggedIn returns the number of logged-in connections: the gateway's
// load, as its membership heartbeat reports it to the logic tier
// (GET /v1/gateways). It is a counter, cheap to read at any rate.
func (s *Server) LoggedIn() int { return int(max(0, s.loggedIn.Load())) }

// Kick implements logic.Gate: it pushes k to the connection and closes it
// once the frame has left.
func (s *Server) Kick(_ context.Context, id uint64, k *pb.Kickout, logid uint64) error {
	c := s.conn(id)
	if c == nil {
		return ErrUnknownConn
	}
	s.m.kicked.Inc()
	c.notifyAndClose(schema.CmdKickout, k, "kicked: "+k.GetReason().String(), logid)
	return nil
}

// Sessions returns the sessions of every logged-in connection, for a
// logic node that must learn them again (its router restarted).
func (s *Server) Sessions() []router.Session {
	var out []router.Session
	s.each(func(c *conn) {
		if c.state.Load() == stateLoggedIn {
			if ss, ok := c.session(); ok {
				out = append(out, ss)
			}
		}
	})
	return out
}

// Push implements logic.Gate: it queues the notify on each connection in
// ids that is open and not logged out. A connection whose login logic has
// registered but whose response has not left yet takes the notify too:
// logic only pushes to connections its router lists, and clients expect
// notifies before the login response (PROTOCOL.md). A false in queued
// means the connection is gone or going, and logic drops its session.
func (s *Server) Push(_ context.Context, ids []uint64, cmd schema.Cmd, msgtype uint32, logid uint64, body []byte, queued []bool) error {
	for i, id := range ids {
		c := s.conn(id)
		queued[i] = c != nil && c.state.Load() != stateLoggedOut && c.pushRaw(cmd, msgtype, logid, body)
	}
	return nil
}

// Shutdown stops accepting, sends GoAway to every connection, waits for
// in-flight requests and for clients to leave until ctx is done, then closes
// what is left (their sessions are unregistered). It is idempotent; later
// calls wait for nothing and return nil.
func (s *Server) Shutdown(ctx context.Context) error {
	first := false
	s.shutdownOnce.Do(func() { first = true })
	if !first {
		return nil
	}
	s.admitMu.Lock()
	s.draining.Store(true)
	s.admitMu.Unlock()
	s.lnMu.Lock()
	if s.ln != nil {
		_ = s.ln.Close()
	}
	if s.tlsLn != nil {
		_ = s.tlsLn.Close()
	}
	s.eng.closeListener()
	s.lnMu.Unlock()
	webDone := make(chan struct{})
	go func() { defer close(webDone); s.shutdownWeb(ctx) }()
	n := s.Conns()
	s.log.Info("gateway draining", "conns", n)
	ga := &pb.GoAway{Reason: "server shutting down", ReconnectAfterMs: 1000}
	s.each(func(c *conn) { c.notify(schema.CmdGoAway, 0, ga) })

	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var err error
wait:
	for s.Conns() > 0 {
		select {
		case <-ctx.Done():
			err = ctx.Err()
			break wait
		case <-tick.C:
		}
	}
	left := s.Conns()
	s.each(func(c *conn) { c.close("server shutdown") })
	s.closeWeb()
	<-webDone
	// Every connection is closed; the engine's own goroutines (event loops)
	// stop before the wait below, so none of them starts another goroutine.
	s.eng.stop()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(s.opts.WriteTimeout):
		s.log.Warn("gateway: goroutines still running after shutdown")
	}
	s.stop()
	s.log.Info("gateway stopped", "conns_at_start", n, "closed_by_force", left)
	return err
}
