package scenario

import (
	"errors"
	"net"
	"os"
	"sync"
	"time"
)

// goEngine reads each connection of a lean fleet on a goroutine of its
// own: the portable form, used where there is no epoll.
type goEngine struct {
	f  *LeanFleet
	mu sync.Mutex
	cs []*leanConn
	wg sync.WaitGroup
}

func newGoEngine(f *LeanFleet) *goEngine { return &goEngine{f: f} }

func (e *goEngine) loops() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.cs)
}

// netSock writes with a short deadline: a connection whose server stopped
// reading fails instead of blocking its reader.
type netSock struct{ nc net.Conn }

func (s *netSock) write(b []byte) (int, error) {
	_ = s.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	return s.nc.Write(b)
}

func (s *netSock) close() { _ = s.nc.Close() }

func (e *goEngine) add(c *leanConn, nc net.Conn) error {
	c.conn = &netSock{nc: nc}
	e.f.conns[c.idx].Store(c)
	e.mu.Lock()
	e.cs = append(e.cs, c)
	e.mu.Unlock()
	e.wg.Go(func() { e.read(c, nc) })
	return nil
}

// read is connection c's reader: it wakes every 20 ms to acknowledge
// delayed group cursors and to send keepalives.
func (e *goEngine) read(c *leanConn, nc net.Conn) {
	lp := &leanLoop{n: c.idx, f: e.f, buf: make([]byte, 16<<10), wbuf: make([]byte, 0, 1<<10)}
	lastKA := time.Now()
	for !c.dead && !e.f.closing.Load() {
		_ = nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		n, err := nc.Read(lp.buf)
		now := time.Now()
		if n > 0 {
			lp.handle(c, lp.buf[:n], now)
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			lp.fail(c, err)
			return
		}
		lp.tick(now)
		if now.Sub(lastKA) >= e.f.keepalive() {
			lastKA = now
			lp.writeKeepalive(c)
		}
	}
}

func (e *goEngine) close() {
	e.f.closing.Store(true)
	e.mu.Lock()
	cs := e.cs
	e.mu.Unlock()
	for _, c := range cs {
		c.conn.close()
	}
	e.wg.Wait()
}
