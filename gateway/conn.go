package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
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

// conn is one client connection. One goroutine reads and serves frames; a
// writer goroutine exists only while frames are queued, and sends everything
// queued in one writev. An idle connection therefore holds one parked
// goroutine, its socket and this struct, and no buffer.
type conn struct {
	srv *Server
	nc  net.Conn
	id  uint64
	dec schema.Decoder

	state    atomic.Int32
	inflight atomic.Int32
	sess     router.Session // written once by the reader at login, before state becomes stateLoggedIn

	mu         sync.Mutex
	out        [][]byte  // queued encoded frames
	outBufs    []*[]byte // their pooled buffers, released after the write
	outBytes   int
	flushing   bool
	closing    bool // close once the queue is flushed
	closed     bool
	closeTimer *time.Timer
}

func newConn(s *Server, nc net.Conn, id uint64) *conn {
	c := &conn{srv: s, nc: nc, id: id}
	c.dec = *schema.NewDecoder(nc, s.opts.MaxBody)
	return c
}

// serve is the connection's reader goroutine.
func (c *conn) serve() {
	s := c.srv
	defer s.wg.Done()
	defer c.readerDone()
	_ = c.nc.SetReadDeadline(time.Now().Add(s.opts.LoginTimeout))
	var f schema.Frame
	for {
		err := c.dec.ReadFrame(&f)
		if err != nil {
			c.readFailed(&f.Header, err)
			return
		}
		s.m.framesIn.Inc()
		if c.state.Load() == stateLoggedIn {
			_ = c.nc.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout))
		}
		if !c.handle(&f) {
			f.Release()
			return
		}
	}
}

func (c *conn) readFailed(h *schema.Header, err error) {
	s := c.srv
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		c.close("peer closed")
	case errors.Is(err, os.ErrDeadlineExceeded):
		if c.state.Load() == stateNew {
			s.m.closed.WithLabelValues("login_timeout").Inc()
			c.fail(h, schema.StatusLoginTimeout, "no login within "+s.opts.LoginTimeout.String())
		} else {
			s.m.closed.WithLabelValues("idle_timeout").Inc()
			c.close("idle timeout")
		}
	case schema.StatusOf(err) != schema.StatusInternal:
		s.m.closed.WithLabelValues("bad_frame").Inc()
		s.log.Info("bad frame; closing", "conn", c.id, "remote", c.nc.RemoteAddr().String(), "err", err)
		c.fail(h, schema.StatusOf(err), err.Error())
	default: // io.ErrUnexpectedEOF, reset, ...
		c.close("read: " + err.Error())
	}
}

// handle serves one frame and reports whether the reader should go on. It
// owns f's body: it releases it or hands it to a request goroutine that does.
func (c *conn) handle(f *schema.Frame) bool {
	s := c.srv
	h := &f.Header
	if h.LogID == 0 {
		h.LogID = s.nextLog.Add(1)
	}
	state := c.state.Load()
	if state != stateLoggedIn {
		defer f.Release()
		if h.Kind() != schema.KindRequest || h.Cmd != schema.CmdLogin {
			c.fail(h, schema.StatusNotLoggedIn, "log in first")
			return false
		}
		return c.login(h, f.Body)
	}
	// Logged in: the header's uid and appcode are checked, never trusted.
	if (h.UID != 0 && h.UID != c.sess.UID) || (h.AppCode != 0 && h.AppCode != c.sess.AppCode) {
		defer f.Release()
		if h.Kind() == schema.KindRequest {
			c.respondErr(h, schema.StatusUIDMismatch, "uid and appcode must be 0 or those of the login")
		}
		return true
	}
	h.UID, h.AppCode = c.sess.UID, c.sess.AppCode
	switch {
	case h.Kind() == schema.KindNotify && h.Cmd.Known():
		// Client notifies (acks) go to logic with no response.
		return c.dispatch(f, false)
	case h.Kind() != schema.KindRequest:
		f.Release()
		c.respondErr(h, schema.StatusBadKind, "clients send requests and notifies only")
		return true
	}
	switch h.Cmd {
	case schema.CmdKeepalive:
		f.Release()
		c.respond(h, &pb.KeepaliveResponse{ServerTimeMs: time.Now().UnixMilli()})
		return true
	case schema.CmdLogin:
		f.Release()
		c.respondErr(h, schema.StatusAlreadyLogged, "this connection is already logged in")
		return true
	case schema.CmdLogout:
		f.Release()
		c.logout(h)
		return false
	}
	if !h.Cmd.Known() {
		f.Release()
		c.respondErr(h, schema.StatusUnknownCmd, "command "+h.Cmd.String()+" is not in the command table")
		return true
	}
	return c.dispatch(f, true)
}

// dispatch hands a request or client notify to logic on its own goroutine so
// that many requests of one connection are in flight at once.
func (c *conn) dispatch(f *schema.Frame, respond bool) bool {
	s := c.srv
	if int(c.inflight.Add(1)) > s.opts.MaxInFlight {
		c.inflight.Add(-1)
		f.Release()
		if respond {
			c.respondErr(&f.Header, schema.StatusTooManyInFlight, "too many requests in flight on this connection")
		}
		return true
	}
	fr := *f // the goroutine owns the body now
	*f = schema.Frame{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer c.inflight.Add(-1)
		defer fr.Release()
		ctx, cancel := context.WithTimeout(s.ctx, s.opts.RequestTimeout)
		body, err := s.api.Handle(ctx, c.sess, &fr.Header, fr.Body)
		cancel()
		if !respond {
			if err != nil {
				s.log.Debug("notify failed", "conn", c.id, "cmd", fr.Cmd.String(), "logid", fr.LogID, "err", err)
			}
			return
		}
		if err != nil {
			c.respondError(&fr.Header, err)
			return
		}
		c.respondRaw(&fr.Header, body)
	}()
	return true
}

func (c *conn) login(h *schema.Header, body []byte) bool {
	s := c.srv
	if s.draining.Load() {
		c.fail(h, schema.StatusShuttingDown, "gateway is shutting down")
		return false
	}
	var req pb.LoginRequest
	if err := proto.Unmarshal(body, &req); err != nil {
		c.fail(h, schema.StatusBadBody, "login body: "+err.Error())
		return false
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
		c.failErr(h, err)
		return false
	}
	c.sess = res.Session
	c.state.Store(stateLoggedIn)
	_ = c.nc.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout))
	c.respond(h, &pb.LoginResponse{
		Epoch:         res.Session.Epoch,
		ServerTimeMs:  time.Now().UnixMilli(),
		KeepaliveMs:   uint32(s.opts.KeepaliveInterval / time.Millisecond),
		IdleTimeoutMs: uint32(s.opts.IdleTimeout / time.Millisecond),
		GateId:        s.opts.ID,
		MaxBody:       s.opts.MaxBody,
		Account:       res.Session.Account,
	})
	s.log.Debug("login", "conn", c.id, "appcode", h.AppCode, "uid", h.UID, "epoch", res.Session.Epoch, "logid", h.LogID)
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed { // the connection died while logic registered it
		c.disconnected()
	}
	return true
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
	c.state.Store(stateLoggedOut)
	c.respond(h, &pb.LogoutResponse{})
	c.closeAfterFlush()
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

// disconnected unregisters the session of a connection that closed while
// logged in.
func (c *conn) disconnected() {
	if !c.state.CompareAndSwap(stateLoggedIn, stateLoggedOut) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.srv.opts.RequestTimeout)
	c.srv.api.Disconnected(ctx, c.sess)
	cancel()
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
	body, _ := proto.Marshal(&pb.Error{Code: uint32(st), Message: msg, Retryable: st.Retryable()})
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
	c.respondErr(req, st, msg)
	c.closeAfterFlush()
}

func (c *conn) failErr(req *schema.Header, err error) {
	c.respondError(req, err)
	c.closeAfterFlush()
}

// notify pushes a server notify.
func (c *conn) notify(cmd schema.Cmd, msgtype uint32, m proto.Message) {
	body, _ := proto.Marshal(m)
	c.pushRaw(cmd, msgtype, body)
}

// pushRaw pushes a server notify with an encoded body.
func (c *conn) pushRaw(cmd schema.Cmd, msgtype uint32, body []byte) {
	sess, _ := c.session()
	h := schema.Header{Cmd: cmd, MsgType: msgtype, UID: sess.UID, AppCode: sess.AppCode, LogID: c.srv.nextLog.Add(1)}
	h.SetKind(schema.KindNotify)
	c.enqueue(&h, body)
}

func (c *conn) notifyAndClose(cmd schema.Cmd, m proto.Message, reason string) {
	sess, _ := c.session()
	c.srv.log.Info("closing after notify", "conn", c.id, "uid", sess.UID, "appcode", sess.AppCode, "reason", reason)
	c.notify(cmd, 0, m)
	c.closeAfterFlush()
}

// enqueue encodes a frame into a pooled buffer and queues it.
func (c *conn) enqueue(h *schema.Header, body []byte) {
	bp := schema.GetBuf(schema.HeaderLen + len(body))
	h.BodyLen = uint32(len(body))
	h.Put(*bp)
	copy((*bp)[schema.HeaderLen:], body)
	c.enqueueBuf(bp)
}

// enqueueBuf queues an encoded frame and starts the writer if none runs.
// A connection whose queue outgrows MaxQueueBytes is a slow consumer and is
// closed: the frames it could not take are dropped with it, and the
// platform's acks (not the socket) decide what is redelivered.
func (c *conn) enqueueBuf(bp *[]byte) {
	c.mu.Lock()
	if c.closed || c.closing {
		c.mu.Unlock()
		schema.PutBuf(bp)
		return
	}
	c.out = append(c.out, *bp)
	c.outBufs = append(c.outBufs, bp)
	c.outBytes += len(*bp)
	if c.outBytes > c.srv.opts.MaxQueueBytes {
		c.mu.Unlock()
		c.srv.m.closed.WithLabelValues("slow_consumer").Inc()
		c.close("slow consumer")
		return
	}
	start := !c.flushing
	c.flushing = true
	c.mu.Unlock()
	if start {
		c.srv.wg.Add(1)
		go c.flush()
	}
}

// flush writes everything queued, one writev per batch, until the queue is
// empty; then the goroutine exits.
func (c *conn) flush() {
	s := c.srv
	defer s.wg.Done()
	var bufs net.Buffers
	var ptrs []*[]byte
	for {
		c.mu.Lock()
		if len(c.out) == 0 || c.closed {
			c.flushing = false
			closing := c.closing
			c.mu.Unlock()
			if closing {
				c.close("closed after flush")
			}
			return
		}
		// swap the queue with the (empty) spare slices
		bufs, c.out = c.out, bufs[:0]
		ptrs, c.outBufs = c.outBufs, ptrs[:0]
		c.outBytes = 0
		c.mu.Unlock()

		_ = c.nc.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
		n := len(ptrs)
		wb := bufs // WriteTo consumes its receiver
		_, err := wb.WriteTo(c.nc)
		s.m.writes.Inc()
		s.m.framesOut.Add(float64(n))
		for i, p := range ptrs {
			schema.PutBuf(p)
			ptrs[i] = nil
			bufs[i] = nil
		}
		if err != nil {
			c.close("write: " + err.Error())
			// fall through to release whatever was queued meanwhile
		}
		if cap(bufs) > 64 { // do not keep a burst's slices on an idle connection
			bufs, ptrs = nil, nil
		}
	}
}

func (c *conn) closeAfterFlush() {
	c.mu.Lock()
	if c.closed || c.closing {
		c.mu.Unlock()
		return
	}
	c.closing = true
	idle := !c.flushing
	if !idle {
		// A peer that stops reading must not hold the connection open.
		c.closeTimer = time.AfterFunc(c.srv.opts.WriteTimeout, func() { c.close("close timeout") })
	}
	c.mu.Unlock()
	if idle {
		c.close("closed")
	}
}

// readerDone runs when the reader goroutine stops. A connection that is
// closing after a final response (a failed login, a logout) is left to the
// flusher, which closes it once that response is written; anything else is
// closed now.
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
	for i, p := range c.outBufs {
		schema.PutBuf(p)
		c.outBufs[i] = nil
	}
	c.out, c.outBufs, c.outBytes = nil, nil, 0
	if c.closeTimer != nil {
		c.closeTimer.Stop()
	}
	c.mu.Unlock()
	_ = c.nc.Close()
	c.srv.removeConn(c)
	sess, _ := c.session()
	c.srv.log.Debug("conn closed", "conn", c.id, "uid", sess.UID, "reason", reason)
	c.disconnected()
}
