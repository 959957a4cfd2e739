package gateway

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"time"

	"github.com/imd-dev/imd/schema"
)

// goEngine serves each connection with a reader goroutine blocked in
// net.Conn.Read (Go's netpoller underneath) and, while frames are queued, a
// writer goroutine. It runs everywhere; an idle connection costs its
// parked reader's stack (about 4 KiB) on top of the heap.
//
// With tls set it serves the TLS listener: each connection is wrapped in a
// tls.Conn whose handshake runs in the reader's first read, under the
// login deadline.
type goEngine struct {
	s        *Server
	tls      *tls.Config   // nil: plain TCP
	refusals chan struct{} // with tls: a token per goroutine refusing a connection
}

func (e *goEngine) name() string { return EngineGoroutine }

func (e *goEngine) serve(ln net.Listener) error {
	s := e.s
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.draining.Load() || errors.Is(err, net.ErrClosed) {
				return ErrServerClosed
			}
			s.acceptFailed(err, &backoff)
			continue
		}
		backoff = 0
		s.m.accepted.Inc()
		if st := s.admission(addrOf(nc.RemoteAddr())); st != schema.StatusOK {
			e.reject(nc, st)
			continue
		}
		e.start(nc)
	}
}

// reject answers a connection that cannot be held with one error frame and
// closes it, without blocking the accept loop for long.
func (e *goEngine) reject(nc net.Conn, st schema.Status) {
	frame := e.s.rejectFrame(st)
	if e.tls != nil {
		e.rejectTLS(nc, frame)
		return
	}
	_ = nc.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	_, _ = nc.Write(frame)
	_ = nc.Close()
}

// rejectTLS refuses a TLS connection on a goroutine of its own, since the
// frame can only go after a handshake; when maxTLSRefusals are under way
// the connection is closed without one.
func (e *goEngine) rejectTLS(nc net.Conn, frame []byte) {
	select {
	case e.refusals <- struct{}{}:
	default:
		_ = nc.Close()
		return
	}
	if _, ok := nc.(*tls.Conn); !ok {
		nc = tls.Server(nc, e.tls)
	}
	go func() {
		defer func() { <-e.refusals }()
		_ = nc.SetDeadline(time.Now().Add(time.Second))
		_, _ = nc.Write(frame)
		_ = nc.Close()
	}()
}

func (e *goEngine) start(nc net.Conn) {
	s := e.s
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		_ = tc.SetKeepAlive(false) // application keepalive does this job
	}
	if e.tls != nil {
		nc = tls.Server(nc, e.tls)
	}
	c := &goConn{nc: nc}
	c.conn = conn{srv: s, io: c, id: s.nextConn.Add(1)}
	c.dec = *schema.NewDecoder(nc, s.opts.MaxBody)
	if !s.track(&c.conn, func() { s.wg.Add(1); go c.serve() }) {
		e.reject(nc, schema.StatusShuttingDown)
	}
}

// closeListener has nothing to do: closing the listener stops Accept.
func (e *goEngine) closeListener() {}

// stop has nothing to stop: readers end with their connections.
func (e *goEngine) stop() {}

// goConn is a connection of the goroutine engine.
type goConn struct {
	conn
	nc         net.Conn
	dec        schema.Decoder
	closeTimer *time.Timer // guarded by conn.mu
}

// serve is the connection's reader goroutine.
func (c *goConn) serve() {
	s := c.srv
	defer s.wg.Done()
	defer c.readerDone()
	_ = c.nc.SetReadDeadline(time.Now().Add(s.opts.LoginTimeout))
	var f frame
	for {
		if err := c.dec.ReadFrame(&f.Frame); err != nil {
			c.readFailed(&f.Header, err)
			return
		}
		s.m.framesIn.Inc()
		a := c.handle(&f)
		if a == actBlock {
			a = c.blocking(&f)
		}
		if a == actStop {
			return
		}
		if c.state.Load() == stateLoggedIn {
			_ = c.nc.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout))
		}
	}
}

func (c *goConn) readFailed(h *schema.Header, err error) {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		c.close("peer closed")
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.readTimeout(h)
	case schema.StatusOf(err) != schema.StatusInternal:
		c.badFrame(h, err)
	default: // io.ErrUnexpectedEOF, reset, ...
		c.close("read: " + err.Error())
	}
}

func (c *goConn) startFlush() {
	c.srv.wg.Add(1)
	go c.flush()
}

// flush writes everything queued, one writev per batch, until the queue is
// empty; then the goroutine exits.
func (c *goConn) flush() {
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
		// swap the queue with the (empty) spare slice
		ptrs, c.out = c.out, ptrs[:0]
		c.outBytes = 0
		c.mu.Unlock()

		for _, p := range ptrs {
			bufs = append(bufs, *p)
		}
		_ = c.nc.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
		wb := bufs // WriteTo consumes its receiver
		_, err := wb.WriteTo(c.nc)
		s.m.writes.Inc()
		s.m.framesOut.Add(float64(len(ptrs)))
		for i, p := range ptrs {
			schema.PutBuf(p)
			ptrs[i] = nil
			bufs[i] = nil
		}
		ptrs, bufs = ptrs[:0], bufs[:0]
		if err != nil {
			c.close("write: " + err.Error())
			// go round to release whatever was queued meanwhile
		}
		if cap(bufs) > maxIdleQueueCap { // do not keep a burst's slices on an idle connection
			bufs, ptrs = nil, nil
		}
	}
}

func (c *goConn) closeLater() {
	c.closeTimer = time.AfterFunc(c.srv.opts.WriteTimeout, func() { c.close("close timeout") })
}

func (c *goConn) closeIO() {
	if c.closeTimer != nil {
		c.closeTimer.Stop()
	}
	_ = c.nc.Close()
}

func (c *goConn) remoteAddr() string { return c.nc.RemoteAddr().String() }
