package gateway

import (
	"runtime"
	"sync"
)

// workPool runs calls into logic on long-lived goroutines. A goroutine
// per frame was a tenth of a delivery's cost in a fan-out (one ack frame
// per read) and an eighth of a c2c message's: its start, and its stack
// growing again each time through protobuf decoding and the store. A
// worker keeps its grown stack.
//
// Requests are handed over only to a worker that is waiting (an
// unbuffered queue): a request never waits behind a busy worker, it gets
// a goroutine of its own as before. Client notifies (acks, read marks) are
// short and answer nothing, so they may wait in a buffered queue; when it
// is full (logic is slow, say a remote ledger) they get goroutines too. So
// an event loop never waits.
type workPool struct {
	once  sync.Once
	reqs  chan job // unbuffered: taken by a waiting worker or not at all
	notes chan job
}

type job struct {
	c       *conn
	fr      frame
	respond bool
}

const (
	// noteQueue is how many notifies wait for a worker before new ones get
	// goroutines of their own.
	noteQueue = 4096
	// reqWorkers and noteWorkers are the workers per GOMAXPROCS.
	reqWorkers  = 16
	noteWorkers = 2
)

// put hands f (a request when respond, else a notify) to a worker, which
// owns it from here; false means none took it and the caller serves it.
// The caller has counted it in the server's WaitGroup and the
// connection's in-flight requests.
func (p *workPool) put(c *conn, fr *frame, respond bool) bool {
	s := c.srv
	p.once.Do(func() {
		p.reqs, p.notes = make(chan job), make(chan job, noteQueue)
		procs := runtime.GOMAXPROCS(0)
		for range reqWorkers * procs {
			go p.work(s, p.reqs)
		}
		for range noteWorkers * procs {
			go p.work(s, p.notes)
		}
	})
	q := p.notes
	if respond {
		q = p.reqs
	}
	select {
	case q <- job{c: c, fr: *fr, respond: respond}:
		return true
	default:
		return false
	}
}

// work serves jobs until the server's last shutdown step. By then no job
// is queued: Shutdown waits for every one (they are in the WaitGroup)
// before that step.
func (p *workPool) work(s *Server, q chan job) {
	for {
		select {
		case j := <-q:
			j.c.serve(&j.fr, j.respond)
		case <-s.ctx.Done():
			return
		}
	}
}
