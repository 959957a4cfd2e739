package gateway

import (
	"runtime"
	"sync"
)

// notePool serves client notifies (acks, read marks): frames that get no
// response and whose handling is short. A fan-out brings one ack frame per
// connection read, so a goroutine per frame (its start and its stack's
// growth in protobuf decoding) was a tenth of a delivery's cost. A few
// long-lived workers take them from a queue instead; when the queue is
// full (logic is slow, say a remote ledger), a frame gets its own
// goroutine as before, so an event loop never waits.
type notePool struct {
	once sync.Once
	q    chan noteJob
}

type noteJob struct {
	c  *conn
	fr frame
}

// noteQueue is how many notifies wait for a worker before new ones get
// goroutines of their own.
const noteQueue = 4096

// put queues a notify for the workers, which own fr from here; false means
// the queue is full and the caller serves it. The caller has counted it in
// the server's WaitGroup and the connection's in-flight requests.
func (p *notePool) put(c *conn, fr *frame) bool {
	s := c.srv
	p.once.Do(func() {
		p.q = make(chan noteJob, noteQueue)
		for range 2 * runtime.GOMAXPROCS(0) {
			go p.work(s)
		}
	})
	select {
	case p.q <- noteJob{c: c, fr: *fr}:
		return true
	default:
		return false
	}
}

// work serves queued notifies until the server's last shutdown step. By
// then the queue is empty: Shutdown waits for every queued notify (they
// are in the WaitGroup) before that step.
func (p *notePool) work(s *Server) {
	for {
		select {
		case j := <-p.q:
			j.c.serveNote(&j.fr)
		case <-s.ctx.Done():
			return
		}
	}
}

// serveNote hands a client notify to logic.
func (c *conn) serveNote(fr *frame) {
	s := c.srv
	defer s.wg.Done()
	defer c.inflight.Add(-1)
	defer fr.release()
	if _, err := s.api.Handle(s.reqs.get(), c.sess, &fr.Header, fr.Body); err != nil {
		s.log.Debug("notify failed", "conn", c.id, "cmd", fr.Cmd.String(), "logid", fr.LogID, "err", err)
	}
}
