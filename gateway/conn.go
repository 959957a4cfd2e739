package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Connection states.
const (
	stateNew int32 = iota
	stateLoggedIn
	stateLoggedOut
)

// conn is the protocol half of one client connection, the same for every
// engine: frame handling, login, dispatch to logic, the outbound queue, kick,
// push and close. The engine's half (connIO) moves the bytes. An engine
// embeds conn in its own connection type, so each connection is one
// allocation.
type conn struct {
	srv *Server
	io  connIO
	id  uint64

	state    atomic.Int32
	inflight atomic.Int32
	sess     router.Session // written once at login, before state becomes stateLoggedIn

	mu       sync.Mutex
	out      []*[]byte // queued encoded frames in pooled buffers
	outBytes int       // bytes queued and not yet written
	flushing bool      // the engine has been asked to write the queue and has not finished
	closing  bool      // close once the queue is flushed
	closed   bool
	// compress: login negotiated body compression (schema.CompressionS2).
	// Like sess it is written once, before state leaves stateNew, and read
	// without c.mu only after a state load that saw it leave; it sits here
	// in the padding so that the connection structs keep their size class.
	compress bool
	failed   schema.Status // the error status that is closing the connection (fail), if any
}

// closeFramer is a connIO whose transport ends a connection with a frame
// of its own (a WebSocket close frame). closeFrame is called once, with
// c.mu held, when the connection starts closing; failed is the status of
// the error response that closes it (0 for a close without one). It
// returns the encoded frame to queue last, or nil.
type closeFramer interface {
	closeFrame(failed schema.Status) *[]byte
}

// connIO is an engine's half of a connection.
type connIO interface {
	// startFlush is called, without c.mu, when frames were queued on a
	// connection that was not flushing (c.flushing has just been set). The
	// engine writes the queue and clears c.flushing once it is empty.
	startFlush()
	// closeLater is called with c.mu held when a closing connection still
	// has frames to write: a peer that stops reading must not hold it open
	// longer than the write timeout.
	closeLater()
	// closeIO closes the socket. It is called once, without c.mu, after
	// c.closed is set.
	closeIO()
	// remoteAddr names the peer for logs.
	remoteAddr() string
}

// frame is a decoded frame and the pooled buffer its body lives in, which
// the handler owns until it calls release.
type frame struct {
	schema.Frame
	buf *[]byte // pooled body buffer filled by an event loop (nil from a schema.Decoder, which pools its own)
}

func (f *frame) release() {
	f.Frame.Release()
	if f.buf != nil {
		schema.PutBuf(f.buf)
		f.buf = nil
	}
}

// action tells an engine what to do after a frame.
type action uint8

const (
	actNext  action = iota // read the next frame
	actStop                // stop reading: the connection is closing
	actBlock               // call c.blocking with the frame: it needs a blocking call into logic
)

// handle serves one frame. It owns f's body: it releases it, hands it to a
// request goroutine that does, or (with actBlock) leaves it to c.blocking.
// It never blocks, so an event loop may call it.
func (c *conn) handle(f *frame) action {
	h := &f.Header
	if h.LogID == 0 {
		h.LogID = schema.NewLogID()
	}
	if h.Flags&schema.FlagCompressed != 0 && (c.state.Load() == stateNew || !c.compress) {
		// Compression is used only once login negotiated it.
		f.release()
		c.badFrame(h, errNotNegotiated)
		return actStop
	}
	if c.state.Load() != stateLoggedIn {
		if h.Kind() != schema.KindRequest || h.Cmd != schema.CmdLogin {
			f.release()
			c.fail(h, schema.StatusNotLoggedIn, "log in first")
			return actStop
		}
		return actBlock
	}
	if c.srv.lim.perConn {
		if a, over := c.overBudget(f); over {
			return a
		}
	}
	if h.Flags&schema.FlagCompressed != 0 {
		if a, bad := c.inflate(f); bad {
			return a
		}
	}
	// Logged in: the header's uid and appcode are checked, never trusted.
	if (h.UID != 0 && h.UID != c.sess.UID) || (h.AppCode != 0 && h.AppCode != c.sess.AppCode) {
		f.release()
		if h.Kind() == schema.KindRequest {
			c.respondErr(h, schema.StatusUIDMismatch, "uid and appcode must be 0 or those of the login")
		}
		return actNext
	}
	h.UID, h.AppCode = c.sess.UID, c.sess.AppCode
	switch {
	case h.Kind() == schema.KindNotify && h.Cmd.Known():
		// Client notifies (acks) go to logic with no response.
		c.dispatch(f, false)
		return actNext
	case h.Kind() != schema.KindRequest:
		f.release()
		c.respondErr(h, schema.StatusBadKind, "clients send requests and notifies only")
		return actNext
	}
	switch h.Cmd {
	case schema.CmdKeepalive:
		f.release()
		c.respond(h, &pb.KeepaliveResponse{ServerTimeMs: time.Now().UnixMilli()})
		return actNext
	case schema.CmdLogin:
		f.release()
		c.respondErr(h, schema.StatusAlreadyLogged, "this connection is already logged in")
		return actNext
	case schema.CmdLogout:
		return actBlock
	}
	if !h.Cmd.Known() {
		f.release()
		c.respondErr(h, schema.StatusUnknownCmd, "command "+h.Cmd.String()+" is not in the command table")
		return actNext
	}
	c.dispatch(f, true)
	return actNext
}

var errNotNegotiated = fmt.Errorf("%w: compressed body on a connection whose login did not negotiate compression", schema.ErrBadFlags)

// inflate replaces the compressed body of f with the decompressed one. A
// body that would decompress to more than MaxBody is refused from its
// length prefix, before anything is inflated (1003, and the connection is
// closed); a corrupt one is answered with 1004. bad reports that f was
// released and the caller returns a.
func (c *conn) inflate(f *frame) (a action, bad bool) {
	h := &f.Header
	n, err := schema.DecompressedLen(f.Body, c.srv.opts.MaxBody)
	if errors.Is(err, schema.ErrBodyTooLarge) {
		f.release()
		c.badFrame(h, err)
		return actStop, true
	}
	var bp *[]byte
	if err == nil {
		bp = schema.GetBuf(n)
		err = schema.Decompress(*bp, f.Body)
	}
	if err != nil {
		if bp != nil {
			schema.PutBuf(bp)
		}
		f.release()
		if h.Kind() == schema.KindRequest {
			c.respondErr(h, schema.StatusBadBody, err.Error())
		}
		return actNext, true
	}
	f.release()
	f.buf, f.Body = bp, *bp
	h.BodyLen = uint32(n)
	h.Flags &^= schema.FlagCompressed
	return actNext, false
}

// blocking serves a frame handle answered actBlock for: a login on a new
// connection or a logout. It calls logic and waits for it, so an event loop
// runs it on a goroutine of its own. It releases f.
func (c *conn) blocking(f *frame) action {
	defer f.release()
	if c.state.Load() == stateLoggedIn {
		c.logout(&f.Header)
		return actStop
	}
	return c.login(&f.Header, f.Body)
}

// dispatch hands a request or client notify to logic on a worker
// (workers.go) or a goroutine of its own, so that many requests of one
// connection are in flight at once.
func (c *conn) dispatch(f *frame, respond bool) {
	s := c.srv
	if int(c.inflight.Add(1)) > s.opts.MaxInFlight {
		c.inflight.Add(-1)
		f.release()
		if respond {
			c.respondErr(&f.Header, schema.StatusTooManyInFlight, "too many requests in flight on this connection")
		}
		return
	}
	fr := *f // the worker or goroutine owns the body now
	*f = frame{}
	s.wg.Add(1)
	ordered := respond && fr.Flags&schema.FlagOrdered != 0
	if ordered && !s.lanes.join(c, &fr) {
		return // queued behind the ordered request being served
	}
	j := job{c: c, fr: fr, respond: respond, ordered: ordered}
	if s.work.put(&j) {
		return
	}
	go j.run()
}

// serve hands a request (answered) or client notify to logic. failed
// reports a request answered with an error.
func (c *conn) serve(fr *frame, respond bool) (failed bool) {
	s := c.srv
	defer s.wg.Done()
	defer c.inflight.Add(-1)
	defer fr.release()
	body, err := s.api.Handle(s.reqs.get(), c.sess, &fr.Header, fr.Body)
	if !respond {
		if err != nil {
			s.log.Debug("notify failed", "conn", c.id, "cmd", fr.Cmd.String(), "logid", fr.LogID, "err", err)
		}
		return false
	}
	if err != nil {
		if s.log.Enabled(context.Background(), slog.LevelDebug) {
			s.log.Debug("request failed", "conn", c.id, "cmd", fr.Cmd.String(), "uid", c.sess.UID, "logid", fr.LogID, "err", err)
		}
		c.respondError(&fr.Header, err)
		return true
	}
	if s.log.Enabled(context.Background(), slog.LevelDebug) {
		s.log.Debug("request served", "conn", c.id, "cmd", fr.Cmd.String(), "uid", c.sess.UID, "logid", fr.LogID)
	}
	c.respondRaw(&fr.Header, body)
	return false
}

func (c *conn) login(h *schema.Header, body []byte) action {
	s := c.srv
	if s.draining.Load() {
		c.fail(h, schema.StatusShuttingDown, "gateway is shutting down")
		return actStop
	}
	var req pb.LoginRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		c.fail(h, schema.StatusBadBody, "login body: "+err.Error())
		return actStop
	}
	var src netip.Addr // read only when a login limit or the ACL needs it: it costs a system call
	if s.lim.byAddr || s.opts.ACL.HasAllow() {
		src = parseAddr(c.io.remoteAddr())
	}
	allowed := s.opts.ACL.AllowedIP(src) // an allowed range bypasses the login limits
	if allowed {
		src = netip.Addr{} // nor is it locked out for its failures
	} else if msg := s.loginRate(src, h.UID); msg != "" {
		s.log.Info("login refused", "conn", c.id, "remote", src.String(), "appcode", h.AppCode, "uid", h.UID, "status", schema.StatusRateLimited.String(), "logid", h.LogID, "err", msg)
		c.fail(h, schema.StatusRateLimited, msg)
		return actStop
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.opts.RequestTimeout)
	res, err := s.api.Login(ctx, logic.LoginInput{
		AppCode: h.AppCode, UID: h.UID, Token: req.Token, DeviceID: req.DeviceId,
		Platform: req.Platform, Gate: s.opts.ID, Conn: c.id, LogID: h.LogID,
	})
	cancel()
	if err != nil {
		st := statusOf(err)
		s.log.Info("login refused", "conn", c.id, "appcode", h.AppCode, "uid", h.UID, "status", st.String(), "logid", h.LogID, "err", err)
		s.loginFailed(src, st)
		c.failErr(h, err)
		return actStop
	}
	c.mu.Lock() // readers on other goroutines take c.mu or see state first
	c.sess = res.Session
	c.mu.Unlock()
	var compression string
	if s.opts.CompressMin >= 0 && slices.Contains(req.AcceptCompression, schema.CompressionS2) {
		compression = schema.CompressionS2
		c.compress = true
	}
	c.state.Store(stateLoggedIn)
	s.loggedIn.Add(1) // taken back by whichever of logout and disconnected leaves stateLoggedIn
	c.respond(h, &pb.LoginResponse{
		Epoch:         res.Session.Epoch,
		ServerTimeMs:  time.Now().UnixMilli(),
		KeepaliveMs:   uint32(s.opts.KeepaliveInterval / time.Millisecond),
		IdleTimeoutMs: uint32(s.opts.IdleTimeout / time.Millisecond),
		GateId:        s.opts.ID,
		MaxBody:       s.opts.MaxBody,
		Account:       res.Session.Account,
		Compression:   compression,
	})
	s.log.Debug("login", "conn", c.id, "appcode", h.AppCode, "uid", h.UID, "epoch", res.Session.Epoch, "logid", h.LogID)
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed { // the connection died while logic registered it
		c.disconnected()
	}
	return actNext
}

func (c *conn) logout(h *schema.Header) {
	s := c.srv
	ctx, cancel := context.WithTimeout(s.ctx, s.opts.RequestTimeout)
	err := s.api.Logout(ctx, c.sess)
	cancel()
	if err != nil {
		c.respondError(h, err)
		c.closeAfterFlush()
		return
	}
	if c.state.Swap(stateLoggedOut) == stateLoggedIn {
		s.loggedIn.Add(-1)
	}
	c.respond(h, &pb.LogoutResponse{})
	c.closeAfterFlush()
}

// badFrame answers a frame that cannot be parsed and closes the connection.
func (c *conn) badFrame(h *schema.Header, err error) {
	s := c.srv
	s.m.closed.WithLabelValues("bad_frame").Inc()
	s.log.Info("bad frame; closing", "conn", c.id, "remote", c.io.remoteAddr(), "err", err)
	c.fail(h, schema.StatusOf(err), err.Error())
}

// readTimeout closes a connection that sent nothing in time: one that has
// not logged in gets an error frame first.
func (c *conn) readTimeout(h *schema.Header) {
	s := c.srv
	if c.state.Load() == stateNew {
		s.m.closed.WithLabelValues("login_timeout").Inc()
		c.fail(h, schema.StatusLoginTimeout, "no login within "+s.opts.LoginTimeout.String())
		return
	}
	s.m.closed.WithLabelValues("idle_timeout").Inc()
	c.close("idle timeout")
}

// session returns the connection's session once it has logged in. Reading
// c.sess through here is race-free: it is written before state leaves
// stateNew and never again.
func (c *conn) session() (router.Session, bool) {
	if c.state.Load() == stateNew {
		return router.Session{}, false
	}
	return c.sess, true
}

// disconnected unregisters, on a goroutine of its own, the session of a
// connection that closed while logged in: close may run on an event loop,
// which must not wait for logic.
func (c *conn) disconnected() {
	if !c.state.CompareAndSwap(stateLoggedIn, stateLoggedOut) {
		return
	}
	s := c.srv
	s.loggedIn.Add(-1)
	c.mu.Lock()
	sess := c.sess
	c.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.RequestTimeout)
		s.api.Disconnected(ctx, sess)
		cancel()
	}()
}

func statusOf(err error) schema.Status {
	var se *schema.Error
	if errors.As(err, &se) {
		return se.Status
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return schema.StatusTimeout
	}
	return schema.StatusInternal
}

// ---- writing ----

// errorFrame appends a response frame carrying an Error body to dst.
func errorFrame(dst []byte, req *schema.Header, st schema.Status, msg string) []byte {
	body := schema.ErrorBody(st, msg)
	h := *req
	h.Flags = 0
	h.SetKind(schema.KindResponse)
	h.Status = st
	h.Version = 0
	return schema.AppendFrame(dst, &h, body)
}

func (c *conn) respond(req *schema.Header, m proto.Message) {
	body, err := proto.Marshal(m)
	if err != nil {
		c.respondErr(req, schema.StatusInternal, err.Error())
		return
	}
	c.respondRaw(req, body)
}

func (c *conn) respondRaw(req *schema.Header, body []byte) {
	h := *req
	h.Flags = 0
	h.SetKind(schema.KindResponse)
	h.Status = schema.StatusOK
	h.Version = 0
	c.enqueue(&h, body)
}

func (c *conn) respondErr(req *schema.Header, st schema.Status, msg string) {
	c.srv.m.errorsOut.WithLabelValues(st.String()).Inc()
	bp := schema.GetBuf(0)
	*bp = errorFrame((*bp)[:0], req, st, msg)
	c.enqueueBuf(bp)
}

func (c *conn) respondError(req *schema.Header, err error) {
	st := statusOf(err)
	msg := err.Error()
	var se *schema.Error
	if errors.As(err, &se) {
		msg = se.Message
	}
	c.respondErr(req, st, msg)
}

// fail answers with an error and closes the connection once it has left.
func (c *conn) fail(req *schema.Header, st schema.Status, msg string) {
	c.setFailed(st)
	c.respondErr(req, st, msg)
	c.closeAfterFlush()
}

func (c *conn) failErr(req *schema.Header, err error) {
	c.setFailed(statusOf(err))
	c.respondError(req, err)
	c.closeAfterFlush()
}

func (c *conn) setFailed(st schema.Status) {
	c.mu.Lock()
	if c.failed == 0 {
		c.failed = st
	}
	c.mu.Unlock()
}

// notify pushes a server notify.
func (c *conn) notify(cmd schema.Cmd, msgtype uint32, m proto.Message) {
	body, _ := proto.Marshal(m)
	c.pushRaw(cmd, msgtype, 0, body)
}

// pushRaw queues a server notify with an encoded body and reports whether
// it was queued. logid is the trace id of what caused it (the send of a
// message, an HTTP push); 0 gets a new one.
func (c *conn) pushRaw(cmd schema.Cmd, msgtype uint32, logid uint64, body []byte) bool {
	sess, _ := c.session()
	if logid == 0 {
		logid = schema.NewLogID()
	}
	h := schema.Header{Cmd: cmd, MsgType: msgtype, UID: sess.UID, AppCode: sess.AppCode, LogID: logid}
	h.SetKind(schema.KindNotify)
	return c.enqueue(&h, body)
}

func (c *conn) notifyAndClose(cmd schema.Cmd, m proto.Message, reason string, logid uint64) {
	sess, _ := c.session()
	c.srv.log.Info("closing after notify", "conn", c.id, "uid", sess.UID, "appcode", sess.AppCode, "reason", reason, "logid", logid)
	body, _ := proto.Marshal(m)
	c.pushRaw(cmd, 0, logid, body)
	c.closeAfterFlush()
}

// enqueue encodes a frame into a pooled buffer and queues it; false means
// the connection is closing or was just closed as a slow consumer. On a
// connection that negotiated compression a body of CompressMin bytes or
// more is compressed here, per connection, so a body shared by many
// connections is encoded once and compressed only for those that asked.
func (c *conn) enqueue(h *schema.Header, body []byte) bool {
	if len(body) >= c.srv.opts.CompressMin && c.state.Load() != stateNew && c.compress {
		if bp := compressedFrame(h, body); bp != nil {
			return c.enqueueBuf(bp)
		}
	}
	bp := schema.GetBuf(schema.HeaderLen + len(body))
	h.BodyLen = uint32(len(body))
	h.Put(*bp)
	copy((*bp)[schema.HeaderLen:], body)
	return c.enqueueBuf(bp)
}

// compressedFrame encodes a frame with a compressed body into a pooled
// buffer, or returns nil when compression would not make it smaller.
func compressedFrame(h *schema.Header, body []byte) *[]byte {
	bp := schema.GetBuf(schema.HeaderLen + schema.CompressBound(len(body)))
	n := schema.Compress((*bp)[schema.HeaderLen:], body)
	if n == 0 {
		schema.PutBuf(bp)
		return nil
	}
	*bp = (*bp)[:schema.HeaderLen+n]
	h.Flags |= schema.FlagCompressed
	h.BodyLen = uint32(n)
	h.Put(*bp)
	return bp
}

// enqueueBuf queues an encoded frame and asks the engine to write it unless
// a flush is already under way (which then takes this frame along in the
// same writev). A connection whose unsent bytes outgrow MaxQueueBytes is a
// slow consumer and is closed: the frames it could not take are dropped
// with it, and the platform's acks (not the socket) decide what is
// redelivered. It reports whether the frame was queued.
func (c *conn) enqueueBuf(bp *[]byte) bool {
	c.mu.Lock()
	if c.closed || c.closing {
		c.mu.Unlock()
		schema.PutBuf(bp)
		return false
	}
	c.out = append(c.out, bp)
	c.outBytes += len(*bp)
	if c.outBytes > c.srv.opts.MaxQueueBytes {
		c.mu.Unlock()
		c.srv.m.closed.WithLabelValues("slow_consumer").Inc()
		c.close("slow consumer")
		return false
	}
	start := !c.flushing
	c.flushing = true
	c.mu.Unlock()
	if start {
		c.io.startFlush()
	}
	return true
}

// maxIdleQueueCap bounds the queue slice an idle connection keeps for its
// next frames: a burst's slice is dropped, not held.
const maxIdleQueueCap = 64

func (c *conn) closeAfterFlush() {
	c.mu.Lock()
	if c.closed || c.closing {
		c.mu.Unlock()
		return
	}
	c.closing = true
	start := false
	if cf, ok := c.io.(closeFramer); ok {
		if bp := cf.closeFrame(c.failed); bp != nil {
			c.out = append(c.out, bp)
			c.outBytes += len(*bp)
			start = !c.flushing
			c.flushing = true
		}
	}
	idle := !c.flushing
	if !idle {
		c.io.closeLater()
	}
	c.mu.Unlock()
	if start {
		c.io.startFlush()
	}
	if idle {
		c.close("closed")
	}
}

// readerDone runs when an engine stops reading a connection. A connection
// that is closing after a final response (a failed login, a logout) is left
// to the flush, which closes it once that response is written; anything
// else is closed now.
func (c *conn) readerDone() {
	c.mu.Lock()
	closing := c.closing
	c.mu.Unlock()
	if !closing {
		c.close("reader done")
	}
}

// close closes the socket once, drops queued frames, removes the connection
// from the server and unregisters its session.
func (c *conn) close(reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	for i, p := range c.out {
		schema.PutBuf(p)
		c.out[i] = nil
	}
	c.out, c.outBytes = nil, 0
	c.mu.Unlock()
	c.io.closeIO()
	c.srv.removeConn(c)
	sess, _ := c.session()
	c.srv.log.Debug("conn closed", "conn", c.id, "uid", sess.UID, "reason", reason)
	c.disconnected()
}
