//go:build linux

package gateway

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/imd-dev/imd/schema"
	"golang.org/x/sys/unix"
)

// defaultEngine is the engine used when none is configured: on Linux the
// event loops, whose idle connection costs a few hundred bytes of heap
// where a parked reader goroutine costs its stack.
const defaultEngine = EngineEpoll

// epollEngine serves connections from GOMAXPROCS event loops, each with its
// own epoll set (level-triggered). The acceptor takes raw non-blocking
// sockets from the listener's descriptor with accept4 and deals them out
// round robin. A loop reads whatever a socket holds (up to 64 KiB) into
// its own buffer and parses frames in place; only a frame split across
// reads leaves state on the connection, in a pooled buffer taken for that
// frame. Requests go to logic on workers as in the goroutine engine;
// login and logout, which the reader waits for, run on a goroutine too
// while the loop stops reading that connection. Frames go out through one
// flusher goroutine per loop, which writes every connection with frames
// waiting, all of each connection's frames in one non-blocking writev:
// when the socket is full the rest stays queued and waits for EPOLLOUT,
// which the loop answers. Login, idle and write timeouts live on
// a timing wheel per loop instead of a runtime timer per connection.
//
// A loop does not hold an OS thread while it waits: its epoll descriptor is
// itself registered with Go's netpoller (an epoll set is readable while it
// has events), so a loop parks like any goroutine blocked in a read, and
// the wheel's next tick is that read's deadline.
type epollEngine struct {
	s     *Server
	tick  time.Duration
	epoch time.Time // the clock's zero, with its monotonic reading
	loops []*loop
	next  atomic.Uint32

	lnMu     sync.Mutex
	lnFile   *os.File // the duplicate of the listener that serve accepts from
	lnClosed bool

	startOnce sync.Once
	startErr  error
	stopOnce  sync.Once
	wg        sync.WaitGroup // the loops
}

func newEpollEngine(s *Server) engine {
	o := &s.opts
	// The wheel's tick is a quarter of the shortest timeout (so a deadline
	// fires at most 25% late), between 5ms and one second.
	tick := min(o.LoginTimeout, o.IdleTimeout, o.WriteTimeout) / 4
	tick = min(max(tick, 5*time.Millisecond), time.Second)
	return &epollEngine{s: s, tick: tick, epoch: time.Now()}
}

// clock reads the engine's monotonic clock: nanoseconds since it started.
// Deadlines are kept on it, so a step of the wall clock moves none.
func (e *epollEngine) clock() int64 { return int64(time.Since(e.epoch)) }

// after returns the clock's reading d from now.
func (e *epollEngine) after(d time.Duration) int64 { return e.clock() + int64(d) }

func (e *epollEngine) name() string { return EngineEpoll }

// start creates the loops on first use.
func (e *epollEngine) start() error {
	e.startOnce.Do(func() {
		o := &e.s.opts
		span := max(o.LoginTimeout, o.IdleTimeout, o.WriteTimeout)
		for range runtime.GOMAXPROCS(0) {
			l, err := newLoop(e, span)
			if err != nil {
				for _, l := range e.loops {
					_ = l.file.Close()
				}
				e.loops = nil
				e.startErr = fmt.Errorf("gateway: epoll: %w", err)
				return
			}
			e.loops = append(e.loops, l)
		}
		for _, l := range e.loops {
			e.wg.Add(2)
			go l.run()
			go l.flusher()
		}
	})
	return e.startErr
}

func (e *epollEngine) stop() {
	e.stopOnce.Do(func() {
		e.startOnce.Do(func() { e.startErr = ErrServerClosed })
		for _, l := range e.loops {
			_ = l.file.Close() // wakes the loop, whose next read fails
			close(l.stop)      // and its flusher
		}
		e.wg.Wait()
	})
}

func (e *epollEngine) serve(ln net.Listener) error {
	s := e.s
	if err := e.start(); err != nil {
		return err
	}
	rc, err := e.listen(ln)
	if err != nil {
		return err
	}
	var backoff time.Duration
	for {
		var fd int
		var sa unix.Sockaddr
		var aerr error
		// RawConn.Read parks in Go's netpoller until the listener is
		// readable, and fails once closeListener has closed it.
		err := rc.Read(func(lfd uintptr) bool {
			fd, sa, aerr = unix.Accept4(int(lfd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
			return aerr != unix.EAGAIN
		})
		if err != nil {
			if s.draining.Load() || errors.Is(err, os.ErrClosed) {
				return ErrServerClosed
			}
			s.acceptFailed(err, &backoff)
			continue
		}
		switch aerr {
		case nil:
		case unix.EINTR, unix.ECONNABORTED:
			continue
		default: // EMFILE, ENFILE, ENOBUFS, ...
			s.acceptFailed(aerr, &backoff)
			continue
		}
		backoff = 0
		s.m.accepted.Inc()
		if st := s.admission(sockaddrAddr(sa)); st != schema.StatusOK {
			e.reject(fd, st)
			continue
		}
		_ = e.adopt(fd)
	}
}

// sockaddrAddr returns the IP address of sa, or the zero Addr.
func sockaddrAddr(sa unix.Sockaddr) netip.Addr {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrFrom4(a.Addr)
	case *unix.SockaddrInet6:
		return netip.AddrFrom16(a.Addr)
	}
	return netip.Addr{}
}

// listen returns the raw listening socket to accept from. A net.Listener
// lends its descriptor only to Control, so the engine takes a duplicate
// (the same socket, still non-blocking), which joins Go's netpoller as an
// os.File; closeListener closes it.
func (e *epollEngine) listen(ln net.Listener) (syscall.RawConn, error) {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("gateway: the epoll engine needs a TCP listener, not %T", ln)
	}
	e.lnMu.Lock()
	defer e.lnMu.Unlock()
	if e.lnClosed {
		return nil, ErrServerClosed
	}
	f, err := tl.File()
	if err != nil {
		return nil, fmt.Errorf("gateway: listener: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("gateway: listener: %w", err)
	}
	e.lnFile = f
	return rc, nil
}

func (e *epollEngine) closeListener() {
	e.lnMu.Lock()
	defer e.lnMu.Unlock()
	e.lnClosed = true
	if e.lnFile != nil {
		_ = e.lnFile.Close()
	}
}

// reject answers a socket that cannot be held with one error frame and
// closes it. The socket is new and empty, so the write does not block.
func (e *epollEngine) reject(fd int, st schema.Status) {
	_, _ = unix.Write(fd, e.s.rejectFrame(st))
	_ = unix.Close(fd)
}

// adopt serves the non-blocking socket fd; it owns fd from here on.
func (e *epollEngine) adopt(fd int) error { return e.adoptAs(fd, false) }

// adoptAs is adopt for a TCP connection or (ws) a WebSocket one whose
// upgrade is done.
func (e *epollEngine) adoptAs(fd int, ws bool) error {
	s := e.s
	if err := e.start(); err != nil {
		_ = unix.Close(fd)
		return err
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1) // fails harmlessly on a unix socket
	l := e.loops[e.next.Add(1)%uint32(len(e.loops))]
	var c *epConn
	if ws {
		w := &wsEpConn{}
		c = &w.epConn
		c.conn = conn{srv: s, io: w, id: s.nextConn.Add(1)}
	} else {
		c = &epConn{}
		c.conn = conn{srv: s, io: c, id: s.nextConn.Add(1)}
	}
	c.l, c.fd = l, int32(fd)
	c.rdl.Store(e.after(s.opts.LoginTimeout))
	var err error
	if !s.track(&c.conn, func() { err = l.add(c) }) {
		if ws { // no frame before the WebSocket framing: just close
			_ = unix.Close(fd)
		} else {
			e.reject(fd, schema.StatusShuttingDown)
		}
		return ErrServerClosed
	}
	if err != nil {
		c.close("epoll: " + err.Error())
		return err
	}
	return nil
}

// loopEvents is how many events one epoll_wait returns at most.
const loopEvents = 256

// loopReadBuf is each loop's read buffer: one read takes up to this much of
// one socket, and frames are parsed from it in place.
const loopReadBuf = 64 << 10

// loop is one event loop.
type loop struct {
	e    *epollEngine
	epfd int
	file *os.File // epfd, registered with Go's netpoller
	rc   syscall.RawConn

	// Used by the loop goroutine only.
	events [loopEvents]unix.EpollEvent
	buf    []byte
	batch  []*epConn
	due    []*epConn

	mu    sync.Mutex // guards conns, free and wheel; taken after a conn's mu, never before
	conns []*epConn  // by slot, the index carried in each epoll event
	free  []int32    // free slots
	wheel *wheel[epConn, *epConn]

	// The flusher's list: connections with frames queued and no write
	// under way. fmu is taken without any conn's mu.
	fmu     sync.Mutex
	dirty   []*epConn
	writing []*epConn     // the flusher's: the list it is writing
	fwake   chan struct{} // one token: the list went from empty to not
	stop    chan struct{} // closed when the engine stops
}

func newLoop(e *epollEngine, span time.Duration) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		_ = unix.Close(epfd)
		return nil, err
	}
	// A non-blocking descriptor handed to os.NewFile joins the netpoller.
	f := os.NewFile(uintptr(epfd), "epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	if err := f.SetReadDeadline(time.Time{}); err != nil { // fails if the netpoller refused it
		_ = f.Close()
		return nil, err
	}
	return &loop{
		e: e, epfd: epfd, file: f, rc: rc, buf: make([]byte, loopReadBuf),
		wheel: newWheel[epConn](e.tick, span, e.clock()),
		fwake: make(chan struct{}, 1), stop: make(chan struct{}),
	}, nil
}

// add registers c with the loop: a slot, a place on the wheel (its login
// deadline) and the epoll set.
func (l *loop) add(c *epConn) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	l.mu.Lock()
	if n := len(l.free); n > 0 {
		c.slot = l.free[n-1]
		l.free = l.free[:n-1]
	} else {
		c.slot = int32(len(l.conns))
		l.conns = append(l.conns, nil)
	}
	l.conns[c.slot] = c
	l.wheel.scheduleBy(c, c.rdl.Load())
	l.mu.Unlock()
	c.events = unix.EPOLLIN | unix.EPOLLRDHUP
	return unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, int(c.fd), c.epollEvent())
}

// remove unregisters c (closed) from the loop before its socket is closed.
func (l *loop) remove(c *epConn) {
	l.mu.Lock()
	if l.conns[c.slot] == c {
		l.conns[c.slot] = nil
		l.free = append(l.free, c.slot)
		l.wheel.remove(c)
	}
	l.mu.Unlock()
}

// schedule makes the wheel look at c no later than when (engine clock).
func (l *loop) schedule(c *epConn, when int64) {
	l.mu.Lock()
	if l.conns[c.slot] == c {
		l.wheel.scheduleBy(c, when)
	}
	l.mu.Unlock()
}

func (l *loop) run() {
	defer l.e.wg.Done()
	var deadline int64
	for {
		if now := l.e.clock(); now >= l.wheel.next() { // only this goroutine moves the wheel's clock
			l.expire(now)
		}
		if next := l.wheel.next(); next != deadline {
			if err := l.file.SetReadDeadline(l.e.epoch.Add(time.Duration(next))); err != nil {
				return // closed
			}
			deadline = next
		}
		n := 0
		var werr error
		err := l.rc.Read(func(uintptr) bool {
			n, werr = unix.EpollWait(l.epfd, l.events[:], 0)
			if werr == unix.EINTR {
				n, werr = 0, nil
			}
			return n > 0 || werr != nil
		})
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil || werr != nil {
			return // the engine closed the epoll descriptor
		}
		l.dispatch(n)
	}
}

// dispatch serves n events from l.events.
func (l *loop) dispatch(n int) {
	l.mu.Lock()
	for i := range n {
		ev := &l.events[i]
		var c *epConn
		if int(ev.Fd) < len(l.conns) {
			c = l.conns[ev.Fd]
		}
		if c != nil && uint32(ev.Pad) != uint32(c.id) {
			c = nil // the slot was reused after this event was queued
		}
		l.batch = append(l.batch, c)
	}
	l.mu.Unlock()
	for i, c := range l.batch {
		if c != nil {
			c.event(l.events[i].Events)
		}
		l.batch[i] = nil
	}
	l.batch = l.batch[:0]
}

// expire looks at every connection whose time on the wheel has come.
func (l *loop) expire(now int64) {
	l.mu.Lock()
	l.due = l.wheel.advance(now, l.due)
	l.mu.Unlock()
	for i, c := range l.due {
		l.due[i] = nil
		c.expire(now)
	}
	l.due = l.due[:0]
}

// markDirty puts c, which has frames queued and no write under way, on the
// flusher's list.
func (l *loop) markDirty(c *epConn) {
	l.fmu.Lock()
	l.dirty = append(l.dirty, c)
	first := len(l.dirty) == 1
	l.fmu.Unlock()
	if first {
		select {
		case l.fwake <- struct{}{}:
		default:
		}
	}
}

// flusher writes the queues of the loop's connections: it takes the whole
// list of connections with frames waiting and writes each, one writev for
// all of a connection's frames. A fan-out queues a frame on thousands of
// connections before the flusher reaches most of them, and frames that
// come while it works through a list go out with those already waiting:
// the busier the gateway, the more frames each system call carries, with
// one goroutine per loop instead of one per burst.
func (l *loop) flusher() {
	defer l.e.wg.Done()
	for {
		select {
		case <-l.fwake:
		case <-l.stop:
			return
		}
		l.fmu.Lock()
		l.dirty, l.writing = l.writing[:0], l.dirty
		l.fmu.Unlock()
		for i, c := range l.writing {
			c.flush()
			l.writing[i] = nil
		}
		if cap(l.writing) > maxIdleFlushList {
			l.writing = nil
		}
	}
}

// maxIdleFlushList bounds the list a flusher keeps between bursts.
const maxIdleFlushList = 4096
