package gateway

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// workPool runs calls into logic on long-lived goroutines. A goroutine
// per frame was a tenth of a delivery's cost in a fan-out (one ack frame
// per read) and an eighth of a c2c message's: its start, and its stack
// growing again each time through protobuf decoding and the store. A
// worker keeps its grown stack.
//
// Requests are handed over only to a worker that is waiting (an
// unbuffered queue): a request never waits behind a busy worker. When
// none waits, the request starts a new worker, which stays while there is
// work (up to maxReqWorkers per GOMAXPROCS, and leaves after workerIdle
// without any); beyond that bound it gets a plain goroutine. Client
// notifies (acks, read marks) are short and answer nothing, so they may
// wait in a buffered queue for a few fixed workers; when it is full
// (logic is slow, say a remote ledger) they get goroutines too. So an
// event loop never waits.
type workPool struct {
	once    sync.Once
	reqs    chan job // unbuffered: taken by a waiting worker or not at all
	notes   chan job
	nreq    atomic.Int32  // request workers running
	maxReqs int32         // 0: maxReqWorkers per GOMAXPROCS (tests set less)
	idle    time.Duration // 0: workerIdle (tests set less)
}

// job is a frame for logic: a request on reqs, a notify on notes.
type job struct {
	c       *conn
	fr      frame
	respond bool // a request
	ordered bool // an ordered request: the first of its connection's lane
}

// run serves j, and for an ordered request the lane behind it.
func (j *job) run() {
	if j.ordered {
		j.c.serveOrdered(&j.fr)
		return
	}
	j.c.serve(&j.fr, j.respond)
}

const (
	// noteQueue is how many notifies wait for a worker before new ones get
	// goroutines of their own.
	noteQueue = 4096
	// noteWorkers are the notify workers, maxReqWorkers the most request
	// workers, per GOMAXPROCS.
	noteWorkers   = 2
	maxReqWorkers = 128
	// workerIdle is how long a request worker waits for work before it
	// leaves.
	workerIdle = 10 * time.Second
)

// put hands j to a worker, which owns it from here; false means none
// took it and the caller runs it. The caller has counted it in the
// server's WaitGroup and the connection's in-flight requests.
func (p *workPool) put(j *job) bool {
	s := j.c.srv
	p.once.Do(func() {
		p.reqs, p.notes = make(chan job), make(chan job, noteQueue)
		procs := runtime.GOMAXPROCS(0)
		if p.maxReqs == 0 {
			p.maxReqs = int32(maxReqWorkers * procs)
		}
		if p.idle == 0 {
			p.idle = workerIdle
		}
		for range noteWorkers * procs {
			go p.work(s)
		}
	})
	if !j.respond {
		select {
		case p.notes <- *j:
			return true
		default:
			return false
		}
	}
	select {
	case p.reqs <- *j:
		return true
	default:
	}
	if p.nreq.Add(1) > p.maxReqs {
		p.nreq.Add(-1)
		return false
	}
	go p.reqWorker(s, *j)
	return true
}

// work serves queued notifies until the server's last shutdown step. By
// then no job is queued: Shutdown waits for every one (they are in the
// WaitGroup) before that step.
func (p *workPool) work(s *Server) {
	for {
		select {
		case j := <-p.notes:
			j.run()
		case <-s.ctx.Done():
			return
		}
	}
}

// reqWorker serves first, then the requests handed to it, until it has
// waited workerIdle for one or the server's last shutdown step.
func (p *workPool) reqWorker(s *Server, first job) {
	defer p.nreq.Add(-1)
	first.run()
	idle := time.NewTimer(p.idle)
	defer idle.Stop()
	for {
		select {
		case j := <-p.reqs:
			j.run()
			idle.Reset(p.idle)
		case <-idle.C:
			return
		case <-s.ctx.Done():
			return
		}
	}
}
