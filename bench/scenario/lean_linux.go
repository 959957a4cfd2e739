package scenario

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"
)

// On Linux a lean fleet's connections are read by a few epoll loops:
// level-triggered, one read per ready connection per wake-up, into the
// loop's buffer, and any ack written back at once from the same goroutine.

func newLeanEngine(f *LeanFleet, loops int) (leanEngine, error) {
	return newEpollEngine(f, loops)
}

type epollEngine struct {
	f   *LeanFleet
	lps []*epollLoop
	wg  sync.WaitGroup
}

type epollLoop struct {
	leanLoop
	epfd int

	mu    sync.Mutex
	added []*leanConn // handed over since the loop last looked
	mine  []*leanConn // every connection of the loop (keepalives, close)
}

// fdSock is a non-blocking socket descriptor owned by a loop.
type fdSock struct{ fd int }

func (s *fdSock) write(b []byte) (int, error) {
	for {
		n, err := syscall.Write(s.fd, b)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return 0, nil
		case err != nil:
			return 0, err
		}
		return n, nil
	}
}

func (s *fdSock) close() { _ = syscall.Close(s.fd) }

func newEpollEngine(f *LeanFleet, loops int) (*epollEngine, error) {
	e := &epollEngine{f: f}
	for i := range loops {
		fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
		if err != nil {
			e.close()
			return nil, fmt.Errorf("lean client: epoll: %w", err)
		}
		lp := &epollLoop{leanLoop: leanLoop{n: i, f: f, buf: make([]byte, 64<<10), wbuf: make([]byte, 0, 4<<10)}, epfd: fd}
		e.lps = append(e.lps, lp)
		e.wg.Go(lp.run)
	}
	return e, nil
}

func (e *epollEngine) loops() int { return len(e.lps) }

// add takes the socket of nc over: the descriptor is duplicated out of
// Go's poller, which then lets go of its own.
func (e *epollEngine) add(c *leanConn, nc net.Conn) error {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return errors.New("lean client: not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = syscall.Dup(int(s)) }); err != nil {
		return err
	}
	if derr != nil {
		return fmt.Errorf("lean client: dup: %w", derr)
	}
	_ = nc.Close()
	syscall.CloseOnExec(fd)
	if err := syscall.SetNonblock(fd, true); err != nil {
		_ = syscall.Close(fd)
		return err
	}
	c.conn = &fdSock{fd: fd}
	lp := e.lps[c.idx%len(e.lps)]
	e.f.conns[c.idx].Store(c)
	lp.mu.Lock()
	lp.added = append(lp.added, c)
	lp.mu.Unlock()
	// The connection's index rides in the event's data.
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(c.idx)}
	if err := syscall.EpollCtl(lp.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("lean client: epoll_ctl: %w", err)
	}
	return nil
}

func (lp *epollLoop) run() {
	events := make([]syscall.EpollEvent, 256)
	f := lp.f
	lastTick, lastKA := time.Now(), time.Now()
	for !f.closing.Load() {
		n, err := syscall.EpollWait(lp.epfd, events, 20)
		if err != nil && err != syscall.EINTR {
			f.stats.setErr("epoll_wait: " + err.Error())
			return
		}
		now := time.Now()
		for i := range max(n, 0) {
			c := f.conns[int(events[i].Fd)].Load()
			if c == nil || c.dead {
				continue
			}
			lp.read(c, now)
		}
		if now.Sub(lastTick) >= 10*time.Millisecond {
			lastTick = now
			lp.mu.Lock()
			lp.mine = append(lp.mine, lp.added...)
			lp.added = lp.added[:0]
			lp.mu.Unlock()
			lp.tick(now)
			if now.Sub(lastKA) >= f.keepalive() {
				lastKA = now
				for _, c := range lp.mine {
					if !c.dead {
						lp.writeKeepalive(c)
					}
				}
			}
		}
	}
}

// read reads once from c: level-triggered epoll reports it again if more
// is waiting.
func (lp *epollLoop) read(c *leanConn, now time.Time) {
	fd := c.conn.(*fdSock).fd
	for {
		n, err := syscall.Read(fd, lp.buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return
		case err != nil:
			lp.fail(c, err)
			return
		case n == 0:
			lp.fail(c, errors.New("connection closed by the server"))
			return
		}
		lp.handle(c, lp.buf[:n], now)
		return
	}
}

// close stops the loops, then closes every connection and the epoll
// descriptors.
func (e *epollEngine) close() {
	e.f.closing.Store(true)
	e.wg.Wait()
	for _, lp := range e.lps {
		lp.mine = append(lp.mine, lp.added...)
		lp.added = nil
		for _, c := range lp.mine {
			if !c.dead {
				c.dead = true
				c.conn.close()
			}
		}
		_ = syscall.Close(lp.epfd)
	}
}
