//go:build linux

package gateway

import (
	"net/netip"
	"sync/atomic"
	"unsafe"

	"github.com/imd-dev/imd/schema"
	"golang.org/x/sys/unix"
)

// epConn is a connection of the epoll engine. Between frames it holds no
// buffer: a frame split across reads (its header, or its header and body)
// waits in a pooled buffer taken for that frame only. Keeping even a split
// header out of the struct holds it to the 240-byte size class.
//
// The socket is used (read, writev, epoll_ctl) only with conn.mu held and
// conn.closed false, and close sets closed under the same lock before the
// descriptor is closed, so no call can reach a descriptor number that has
// since been reused.
type epConn struct {
	conn
	l    *loop
	fd   int32
	slot int32 // index in l.conns; fixed once added

	// Guarded by conn.mu.
	events  uint32 // epoll interest registered
	woff    int32  // bytes of out[0] already written
	paused  bool   // a blocking call (login, logout) owns the read side
	rdone   bool   // reading has stopped for good
	wantOut bool   // the socket was full: wait for EPOLLOUT

	// The read side, used by its owner only: the loop, or while paused the
	// goroutine of the blocking call. Ownership passes through conn.mu.
	poff uint32  // bytes of *part filled
	part *[]byte // a split frame: its header, then once that is parsed, header and body

	rdl atomic.Int64 // read deadline on the engine's clock: the login deadline, then the idle one
	wdl atomic.Int64 // write deadline on the engine's clock: 0 unless frames wait for a full socket

	tl wheelLinks[epConn] // guarded by l.mu
}

func (c *epConn) links() *wheelLinks[epConn] { return &c.tl }

func (c *epConn) epollEvent() *unix.EpollEvent {
	return &unix.EpollEvent{Events: c.events, Fd: c.slot, Pad: int32(uint32(c.id))}
}

// setInterest brings the epoll registration in line with the state. It is
// called with c.mu held.
func (c *epConn) setInterest() {
	if c.closed {
		return
	}
	var ev uint32
	if !c.paused && !c.rdone {
		ev = unix.EPOLLIN | unix.EPOLLRDHUP
	}
	if c.wantOut {
		ev |= unix.EPOLLOUT
	}
	if ev == c.events {
		return
	}
	c.events = ev
	_ = unix.EpollCtl(c.l.epfd, unix.EPOLL_CTL_MOD, int(c.fd), c.epollEvent())
}

// event serves one epoll event on the loop.
func (c *epConn) event(ev uint32) {
	if ev&unix.EPOLLOUT != 0 {
		c.writable()
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.readable(ev)
	}
}

func (c *epConn) readable(ev uint32) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	if c.paused || c.rdone {
		c.mu.Unlock()
		if ev&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			c.close("hangup")
		}
		return
	}
	n, err := unix.Read(int(c.fd), c.l.buf)
	c.mu.Unlock()
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
	case err != nil:
		c.close("read: " + err.Error())
	case n == 0:
		if c.part != nil {
			c.close("read: unexpected EOF")
		} else {
			c.close("peer closed")
		}
		c.dropPart()
	default:
		if w := c.wsConn(); w != nil {
			w.read(c.l.buf[:n])
		} else if c.feed(c.l.buf[:n], false) == actStop {
			c.stopReading()
		}
	}
}

// feed parses and serves the frames in data, keeping a split frame's start
// for the next call. On the loop (canBlock false) a frame that needs a
// blocking call is handed to a goroutine with the rest of data, the read
// side paused, and feed returns actBlock; on that goroutine (canBlock true)
// such frames are served inline.
func (c *epConn) feed(data []byte, canBlock bool) action {
	s := c.srv
	if c.state.Load() == stateLoggedIn {
		c.rdl.Store(c.l.e.after(s.opts.IdleTimeout))
	}
	for len(data) > 0 {
		var f frame
		if c.part == nil { // at a frame boundary: parse in place
			if len(data) < schema.HeaderLen {
				c.keep(schema.HeaderLen, data)
				return actNext
			}
			h, err := schema.ParseHeader(data, s.opts.MaxBody)
			if err != nil {
				s.m.framesIn.Inc()
				c.badFrame(&h, err)
				return actStop
			}
			n := int(h.BodyLen)
			if len(data) < schema.HeaderLen+n {
				c.keep(schema.HeaderLen+n, data)
				return actNext
			}
			f.Header = h
			if n > 0 {
				f.buf = schema.GetBuf(n)
				copy(*f.buf, data[schema.HeaderLen:])
				f.Body = *f.buf
			}
			data = data[schema.HeaderLen+n:]
		} else { // completing a split frame
			p := *c.part
			k := copy(p[c.poff:], data)
			c.poff += uint32(k)
			data = data[k:]
			if int(c.poff) < len(p) {
				return actNext
			}
			h, err := schema.ParseHeader(p, s.opts.MaxBody)
			switch {
			case len(p) > schema.HeaderLen: // header (checked before) and body
				f.Header, f.buf, f.Body = h, c.part, p[schema.HeaderLen:]
			case err != nil:
				c.dropPart()
				s.m.framesIn.Inc()
				c.badFrame(&h, err)
				return actStop
			case h.BodyLen > 0: // the header is complete; room for the body
				hdr := c.part
				c.part = schema.GetBuf(schema.HeaderLen + int(h.BodyLen))
				copy(*c.part, p)
				schema.PutBuf(hdr)
				continue
			default:
				schema.PutBuf(c.part)
				f.Header = h
			}
			c.part, c.poff = nil, 0
		}
		s.m.framesIn.Inc()
		a := c.handle(&f)
		if a == actBlock {
			if !canBlock {
				c.block(&f, data)
				return actBlock
			}
			a = c.blocking(&f)
		}
		if a == actStop {
			return actStop
		}
	}
	return actNext
}

// keep starts a split frame of size bytes with the bytes that came.
func (c *epConn) keep(size int, data []byte) {
	c.part = schema.GetBuf(size)
	c.poff = uint32(copy(*c.part, data))
}

// block runs the blocking call for f on a goroutine, which owns the read
// side (and rest, the bytes read after f) until it resumes the connection.
func (c *epConn) block(f *frame, rest []byte) {
	s := c.srv
	var pend *[]byte
	if len(rest) > 0 {
		pend = schema.GetBuf(len(rest))
		copy(*pend, rest)
	}
	c.mu.Lock()
	c.paused = true
	c.setInterest()
	c.mu.Unlock()
	fr := *f
	*f = frame{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		c.resume(c.blocking(&fr), pend)
	}()
}

// resume serves what was read behind a blocking call's frame and hands the
// read side back to the loop.
func (c *epConn) resume(a action, pend *[]byte) {
	s := c.srv
	if pend != nil {
		if a == actNext {
			a = c.feed(*pend, true)
		}
		schema.PutBuf(pend)
	}
	if a == actStop {
		c.stopReading()
		return
	}
	if c.state.Load() == stateLoggedIn {
		c.rdl.Store(c.l.e.after(s.opts.IdleTimeout))
	}
	c.mu.Lock()
	c.paused = false
	c.setInterest()
	c.mu.Unlock()
	c.l.schedule(c, c.rdl.Load())
}

// stopReading ends the read side for good; the read side's owner calls it.
func (c *epConn) stopReading() {
	c.dropPart()
	c.mu.Lock()
	c.rdone, c.paused = true, false
	c.setInterest()
	c.mu.Unlock()
	c.readerDone()
}

func (c *epConn) dropPart() {
	if c.part != nil {
		schema.PutBuf(c.part)
		c.part, c.poff = nil, 0
	}
}

// expire runs on the loop when c's time on the wheel has come: it applies
// whichever timeout has passed, or puts c back on the wheel for the next.
func (c *epConn) expire(now int64) {
	s := c.srv
	c.mu.Lock()
	closed, paused, rdone := c.closed, c.paused, c.rdone
	c.mu.Unlock()
	if closed {
		return
	}
	wdl := c.wdl.Load()
	if wdl != 0 && now >= wdl {
		c.close("write timeout")
		return
	}
	var next int64
	switch rdl := c.rdl.Load(); {
	case rdone:
	case paused: // logic has it; resume reschedules
		next = now + int64(s.opts.LoginTimeout)
	case now >= rdl:
		c.readTimeout(&schema.Header{})
		c.stopReading()
		return
	default:
		next = rdl
	}
	if wdl != 0 && (next == 0 || wdl < next) {
		next = wdl
	}
	if next != 0 {
		c.l.schedule(c, next)
	}
}

func (c *epConn) startFlush() { c.l.markDirty(c) }

// writable answers EPOLLOUT on the loop.
func (c *epConn) writable() {
	c.mu.Lock()
	want := c.wantOut && !c.closed
	c.mu.Unlock()
	if want {
		c.flush()
	}
}

// flush writes the queue with non-blocking writevs. When the socket is
// full it leaves the rest queued (c.flushing stays set) and asks for
// EPOLLOUT, whose handler calls flush again; the write deadline closes a
// peer that takes nothing for WriteTimeout.
func (c *epConn) flush() {
	s := c.srv
	w := c.wsConn()
	c.mu.Lock()
	for !c.closed && len(c.out) > 0 {
		if w != nil && w.ws.pending == 0 {
			w.frameOut()
		}
		bufs := c.out
		if w != nil { // one WebSocket message (or control frame) at a time
			bufs = bufs[:w.ws.pending]
		}
		n, tried, err := writev(int(c.fd), bufs, int(c.woff))
		s.m.writes.Inc()
		if n > 0 {
			c.wrote(n)
			if c.wdl.Load() != 0 { // progress: the peer reads, slowly
				c.wdl.Store(c.l.e.after(s.opts.WriteTimeout))
			}
		}
		switch {
		case err == unix.EINTR:
			continue
		case err != nil && err != unix.EAGAIN:
			c.mu.Unlock()
			c.close("write: " + err.Error())
			return
		case err == unix.EAGAIN || n < tried: // the socket is full
			if c.wdl.Load() == 0 {
				d := c.l.e.after(s.opts.WriteTimeout)
				c.wdl.Store(d)
				c.l.schedule(c, d)
			}
			c.wantOut = true
			c.setInterest()
			c.mu.Unlock()
			return
		}
	}
	c.flushing = false
	c.wantOut = false
	c.wdl.Store(0)
	c.setInterest()
	closing := c.closing && !c.closed
	c.mu.Unlock()
	if closing {
		c.close("closed after flush")
	}
}

// wrote records, with c.mu held, that n more bytes of the queue have left.
func (c *epConn) wrote(n int) {
	k := 0
	for n > 0 {
		rem := len(*c.out[k]) - int(c.woff)
		if n < rem {
			c.woff += int32(n)
			c.outBytes -= n
			break
		}
		n -= rem
		c.outBytes -= rem
		c.woff = 0
		k++
	}
	c.flushed(k)
}

// flushed records, with c.mu held, that the queue was written up to (not
// including) out[k]: it returns those buffers to the pool and moves the
// rest to the front.
func (c *epConn) flushed(k int) {
	for _, p := range c.out[:k] {
		schema.PutBuf(p)
	}
	if w := c.wsConn(); w != nil {
		w.ws.pending = max(w.ws.pending-k, 0)
	}
	n := copy(c.out, c.out[k:])
	clear(c.out[n:])
	c.out = c.out[:n]
	if n == 0 && cap(c.out) > maxIdleQueueCap {
		c.out = nil
	}
	c.srv.m.framesOut.Add(float64(k))
}

// maxIov bounds the buffers one writev takes.
const maxIov = 64

// writev writes bufs, the first from off, in one system call. It returns
// the bytes written and the bytes it tried to write.
func writev(fd int, bufs []*[]byte, off int) (n, tried int, err error) {
	var iov [maxIov]unix.Iovec
	k := 0
	for _, p := range bufs {
		if k == maxIov {
			break
		}
		b := *p
		if k == 0 {
			b = b[off:]
		}
		iov[k].Base = &b[0]
		iov[k].SetLen(len(b))
		tried += len(b)
		k++
	}
	r, _, e := unix.Syscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(k))
	if e != 0 {
		return 0, tried, e
	}
	return int(r), tried, nil
}

func (c *epConn) closeLater() {
	if c.wdl.Load() == 0 {
		d := c.l.e.after(c.srv.opts.WriteTimeout)
		c.wdl.Store(d)
		c.l.schedule(c, d)
	}
}

func (c *epConn) closeIO() {
	c.l.remove(c)
	_ = unix.Close(int(c.fd))
}

func (c *epConn) remoteAddr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ""
	}
	sa, err := unix.Getpeername(int(c.fd))
	if err != nil {
		return ""
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrUnix:
		return "unix:" + a.Name
	}
	return ""
}
