package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"sync"
	"time"

	"github.com/imd-dev/imd/schema"
)

// The HTTP long-poll transport (PROTOCOL.md, "Web transports") is one more
// engine half of a connection: an lpConn embeds conn like the socket
// engines' connection types do, and its "socket" is the client's pending
// poll. Frames a send carries go through conn.handle exactly as frames read
// from a socket; frames conn queues wait in conn.out until a poll takes
// them. Nothing in conn.go or in logic can tell the difference.
//
// conn.flushing keeps its meaning, "frames are queued and not yet handed
// to the client": it stays set while frames are held for the next poll, so
// a kickout or a failed login queued with no poll pending is still
// delivered (closeAfterFlush waits for the poll, closeLater bounds the
// wait) instead of being dropped by an immediate close.

// lpKey is a session id: 128 random bits, shown to clients as 32 hex digits.
type lpKey [16]byte

func (k lpKey) String() string { return hex.EncodeToString(k[:]) }

// parseLPKey reads a session id; anything but 32 hex digits is no session.
func parseLPKey(s string) (lpKey, bool) {
	var k lpKey
	if len(s) != 2*len(k) {
		return k, false
	}
	if _, err := hex.Decode(k[:], []byte(s)); err != nil {
		return k, false
	}
	return k, true
}

// lpHub holds the long-poll sessions of one gateway and runs the sweeper
// that enforces their deadlines: one goroutine for all sessions instead of
// a runtime timer each, running only while sessions exist.
type lpHub struct {
	s     *Server
	epoch time.Time // the clock's zero, with its monotonic reading
	tick  time.Duration

	mu       sync.Mutex
	m        map[lpKey]*lpConn
	sweeping bool          // the sweeper goroutine runs
	nudge    chan struct{} // makes the sweeper look now: the last session left, or the gateway drains
}

func newLPHub(s *Server) *lpHub {
	o := &s.opts
	// As for the epoll engine's wheel: a quarter of the shortest timeout,
	// between 5ms and one second, so a deadline fires at most 25% late.
	tick := min(o.LoginTimeout, o.IdleTimeout, o.WriteTimeout) / 4
	tick = min(max(tick, 5*time.Millisecond), time.Second)
	return &lpHub{s: s, epoch: time.Now(), tick: tick, m: make(map[lpKey]*lpConn), nudge: make(chan struct{}, 1)}
}

// clock reads the hub's monotonic clock: nanoseconds since it started.
func (h *lpHub) clock() int64 { return int64(time.Since(h.epoch)) }

// lpConn is a long-poll session: a connection of the gateway whose reads
// are sends and whose writes are polls.
type lpConn struct {
	conn
	hub    *lpHub
	key    lpKey
	remote string

	// sendMu serializes sends: a socket is read one frame after another,
	// so two sends of one session are served one after the other, in the
	// order they take the lock.
	sendMu sync.Mutex

	// Guarded by conn.mu; times are on the hub's clock.
	poll     chan struct{} // non-nil while a poll is pending; signalled when frames are queued or the session closes
	sending  bool          // a send is being served (possibly waiting for logic, as a login does)
	stopped  bool          // the read side stopped (a fatal frame, a logout): sends answer 404
	opened   int64         // login deadline = opened + LoginTimeout
	lastIn   int64         // the end of the last send: idle deadline = lastIn + IdleTimeout
	lastPoll int64         // the end of the last poll: with none pending, closed at lastPoll + IdleTimeout
	closeAt  int64         // set by closeLater: the most a closing session waits for a poll to take its last frames
}

var _ connIO = (*lpConn)(nil)

// open creates a session and registers it as a connection of the gateway,
// so it counts toward MaxConns and drains on Shutdown. A status other than
// StatusOK says why it was refused.
func (h *lpHub) open(remote string) (*lpConn, schema.Status) {
	s := h.s
	s.m.accepted.Inc()
	if st := s.admission(parseAddr(remote)); st != schema.StatusOK {
		s.m.rejected.WithLabelValues(st.String()).Inc()
		return nil, st
	}
	c := &lpConn{hub: h, remote: remote}
	c.conn = conn{srv: s, io: c, id: s.nextConn.Add(1)}
	if _, err := rand.Read(c.key[:]); err != nil { // never fails on supported platforms; refuse rather than hand out a weak id
		s.log.Error("long-poll: no random session id", "err", err)
		return nil, schema.StatusInternal
	}
	now := h.clock()
	c.opened, c.lastIn, c.lastPoll = now, now, now
	ok := s.track(&c.conn, func() {
		h.mu.Lock()
		h.m[c.key] = c
		start := !h.sweeping
		h.sweeping = true
		h.mu.Unlock()
		if start {
			// Added under track's admission lock, like every connection's
			// goroutine, so Shutdown's wait sees it.
			s.wg.Add(1)
			go h.sweep()
		}
	})
	if !ok {
		s.m.rejected.WithLabelValues(schema.StatusShuttingDown.String()).Inc()
		return nil, schema.StatusShuttingDown
	}
	return c, schema.StatusOK
}

// get returns the open session of key, or nil.
func (h *lpHub) get(key lpKey) *lpConn {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.m[key]
}

// len returns the number of sessions held.
func (h *lpHub) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.m)
}

func (h *lpHub) remove(c *lpConn) {
	h.mu.Lock()
	if h.m[c.key] == c {
		delete(h.m, c.key)
	}
	last := len(h.m) == 0
	h.mu.Unlock()
	if last {
		h.wakeSweeper() // so that it ends now, not a tick later
	}
}

func (h *lpHub) wakeSweeper() {
	select {
	case h.nudge <- struct{}{}:
	default:
	}
}

// sweep checks every session's deadlines once a tick and returns when no
// session is left.
func (h *lpHub) sweep() {
	defer h.s.wg.Done()
	t := time.NewTicker(h.tick)
	defer t.Stop()
	var list []*lpConn
	for {
		select {
		case <-t.C:
		case <-h.nudge:
		}
		h.mu.Lock()
		if len(h.m) == 0 {
			h.sweeping = false
			h.mu.Unlock()
			return
		}
		for _, c := range h.m {
			list = append(list, c)
		}
		h.mu.Unlock()
		now := h.clock()
		draining := h.s.draining.Load()
		for i, c := range list {
			c.expire(now, draining)
			list[i] = nil
		}
		list = list[:0]
	}
}

// What expire found due.
const (
	lpNothing = iota
	lpReadTimeout
	lpCloseTimeout
	lpDrained
)

// expire enforces the session's deadlines as a socket engine's read and
// write deadlines would: no login in time, no frame for the idle timeout,
// no poll for the idle timeout (a silent client), a closing session whose
// last frames no poll took.
func (c *lpConn) expire(now int64, draining bool) {
	o := &c.srv.opts
	c.mu.Lock()
	due := lpNothing
	switch {
	case c.closed:
	case c.closeAt != 0 && now >= c.closeAt:
		due = lpCloseTimeout
	case c.closing || c.sending:
		// Closing: only closeAt applies. Sending: the read side is busy
		// (a login waits for logic), and a socket's read deadline does
		// not run while its reader waits either.
	case draining && c.poll == nil:
		// The web listener stopped with Shutdown: no poll can reach this
		// session any more.
		due = lpDrained
	case c.state.Load() == stateNew && now >= c.opened+int64(o.LoginTimeout):
		due = lpReadTimeout
	case c.state.Load() == stateLoggedIn && now >= c.lastIn+int64(o.IdleTimeout):
		due = lpReadTimeout
	case c.poll == nil && now >= c.lastPoll+int64(o.IdleTimeout):
		due = lpReadTimeout
	}
	c.mu.Unlock()
	switch due {
	case lpReadTimeout:
		c.readTimeout(&schema.Header{})
	case lpCloseTimeout:
		c.close("close timeout")
	case lpDrained:
		c.close("server shutdown")
	}
}

// ---- connIO ----

// startFlush hands the queue to the pending poll, if there is one; else
// the frames wait for the next poll, with c.flushing still set. While the
// gateway drains (this is its GoAway), the sweeper is asked to close at
// once the sessions that no poll can reach any more.
func (c *lpConn) startFlush() {
	c.mu.Lock()
	c.wake()
	c.mu.Unlock()
	if c.srv.draining.Load() {
		c.hub.wakeSweeper()
	}
}

// wake signals the pending poll. Called with c.mu held.
func (c *lpConn) wake() {
	if c.poll != nil {
		select {
		case c.poll <- struct{}{}:
		default:
		}
	}
}

// closeLater bounds how long a closing session's last frames wait for a
// poll. Called with c.mu held.
func (c *lpConn) closeLater() {
	c.closeAt = c.hub.clock() + int64(c.srv.opts.WriteTimeout)
}

// closeIO ends the pending poll (it answers 404) and forgets the session.
func (c *lpConn) closeIO() {
	c.mu.Lock()
	c.wake()
	c.mu.Unlock()
	c.hub.remove(c)
}

func (c *lpConn) remoteAddr() string { return c.remote }

// ---- the client's requests ----

// lpSendResult is the outcome of a send.
type lpSendResult uint8

const (
	lpSent     lpSendResult = iota // the frames were served
	lpGone                         // the session is closed or no longer reads
	lpPartial                      // the body does not end on a frame boundary: nothing was served
	lpEmpty                        // the body holds no frame
	lpTooLarge                     // the body is over the send limit before a bad frame: nothing was served
)

// send serves the frames of a send's body as if read from a socket. The
// body must end on a frame boundary, or nothing is served: a client whose
// send failed may send it again without doubling any of it. A bad header
// (magic, version, flags, body over max_body) is answered as on a socket,
// after the frames before it, with an error frame and a close; what
// follows it is not looked at. truncated says the body was cut at the
// send limit.
func (c *lpConn) send(body []byte, truncated bool) lpSendResult {
	s := c.srv
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	c.mu.Lock()
	if c.closed || c.stopped {
		c.mu.Unlock()
		return lpGone
	}
	c.mu.Unlock()

	// Check first that the body splits into whole frames (up to a bad
	// header, if any).
	off := 0
	for off < len(body) {
		if len(body)-off < schema.HeaderLen {
			break
		}
		h, err := schema.ParseHeader(body[off:], s.opts.MaxBody)
		if err != nil {
			off = -1 // served up to here, then the bad header closes the session
			break
		}
		n := schema.HeaderLen + int(h.BodyLen)
		if len(body)-off < n {
			break
		}
		off += n
	}
	switch {
	case off == -1:
	case truncated:
		return lpTooLarge
	case len(body) == 0:
		return lpEmpty
	case off != len(body):
		return lpPartial
	}

	c.mu.Lock()
	c.sending = true
	c.mu.Unlock()
	stop := c.serveFrames(body)
	c.mu.Lock()
	c.sending = false
	if stop {
		c.stopped = true
	} else if c.state.Load() == stateLoggedIn {
		c.lastIn = c.hub.clock() // any frame restarts the idle timer
	}
	c.mu.Unlock()
	if stop {
		c.readerDone()
	}
	return lpSent
}

// serveFrames hands each frame of data to conn.handle, as a socket
// engine's reader does, and reports whether the read side stopped.
func (c *lpConn) serveFrames(data []byte) (stop bool) {
	s := c.srv
	for len(data) > 0 {
		h, err := schema.ParseHeader(data, s.opts.MaxBody)
		s.m.framesIn.Inc()
		if err != nil {
			c.badFrame(&h, err)
			return true
		}
		n := int(h.BodyLen)
		f := frame{}
		f.Header = h
		if n > 0 {
			f.buf = schema.GetBuf(n)
			copy(*f.buf, data[schema.HeaderLen:schema.HeaderLen+n])
			f.Body = *f.buf
		}
		data = data[schema.HeaderLen+n:]
		a := c.handle(&f)
		if a == actBlock {
			a = c.blocking(&f) // the send waits, as a socket's reader does
		}
		if a == actStop {
			return true
		}
	}
	return false
}

// lpPollResult is the outcome of a poll.
type lpPollResult uint8

const (
	lpPolled   lpPollResult = iota // frames (possibly none) to answer with
	lpConflict                     // another poll is pending
	lpClosed                       // the session is closed
	lpLeft                         // the client went away; the frames stay queued
)

// takePoll waits until frames are queued, the session closes, ctx ends or
// wait passes, and takes every queued frame. closing says the session
// closes once they are written (the caller then calls finishPoll).
func (c *lpConn) takePoll(ctx context.Context, wait time.Duration) (out []*[]byte, closing bool, res lpPollResult) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, false, lpClosed
	}
	if c.poll != nil {
		c.mu.Unlock()
		return nil, false, lpConflict
	}
	if len(c.out) == 0 {
		wake := make(chan struct{}, 1)
		c.poll = wake
		c.mu.Unlock()
		t := time.NewTimer(wait)
		for {
			woken := false
			select {
			case <-wake:
				woken = true
			case <-t.C:
			case <-ctx.Done():
			}
			c.mu.Lock()
			if !woken || c.closed || len(c.out) > 0 {
				break
			}
			// A stale signal, for frames an earlier poll took: wait on.
			c.mu.Unlock()
		}
		t.Stop()
		c.poll = nil
	}
	c.lastPoll = c.hub.clock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return nil, false, lpClosed
	case ctx.Err() != nil:
		c.mu.Unlock()
		return nil, false, lpLeft
	}
	out, c.out = c.out, nil
	c.outBytes = 0
	c.flushing = false
	closing = c.closing
	c.mu.Unlock()
	return out, closing, lpPolled
}

// finishPoll runs after a poll's frames were written (or failed to be): a
// closing session closes now that its last frames have left, and while
// the gateway drains, a session closes after its poll, since the web
// listener takes no further request.
func (c *lpConn) finishPoll(closing bool, err error) {
	switch {
	case closing:
		c.close("closed after flush")
	case err != nil:
		c.close("poll write: " + err.Error())
	case c.srv.draining.Load():
		c.close("server shutdown")
	}
}

// release returns polled frames to the pool.
func releaseFrames(out []*[]byte) {
	for i, p := range out {
		schema.PutBuf(p)
		out[i] = nil
	}
}
