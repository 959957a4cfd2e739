package gateway

import (
	"sync"

	"github.com/imd-dev/imd/schema"
)

// lanes serve each connection's ordered requests (schema.FlagOrdered) one
// at a time, in the order they arrived: a client may pipeline its chat
// sends and still have them stored in the order it wrote them
// (PROTOCOL.md, "Ordered sends"). A connection has a lane only while one
// of its ordered requests is being served, so an idle connection pays
// nothing for it: the lanes live here, not in the connection's struct.
type lanes struct {
	shards [laneShards]laneShard
}

const laneShards = 64

type laneShard struct {
	mu sync.Mutex
	m  map[*conn]*lane
}

// lane is the ordered requests of a connection that wait behind the one
// being served.
type lane struct {
	q []frame
}

func (l *lanes) shard(c *conn) *laneShard { return &l.shards[c.id%laneShards] }

// join queues fr behind c's ordered request being served, or, when none
// is, opens c's lane and reports that the caller serves fr (serveOrdered).
func (l *lanes) join(c *conn, fr *frame) (serveNow bool) {
	sh := l.shard(c)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if ln, ok := sh.m[c]; ok {
		ln.q = append(ln.q, *fr)
		*fr = frame{}
		return false
	}
	if sh.m == nil {
		sh.m = make(map[*conn]*lane)
	}
	sh.m[c] = &lane{}
	return true
}

// next returns the request to serve after one that ended (failed: it was
// answered with an error), or closes c's lane and returns false. After a
// failure the requests queued behind it are returned in dropped, to be
// answered 3005 unserved: each may depend on the one that failed.
func (l *lanes) next(c *conn, failed bool) (fr frame, ok bool, dropped []frame) {
	sh := l.shard(c)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	ln := sh.m[c]
	if failed {
		dropped, ln.q = ln.q, nil
	}
	if len(ln.q) == 0 {
		delete(sh.m, c)
		return frame{}, false, dropped
	}
	fr = ln.q[0]
	ln.q[0] = frame{}
	ln.q = ln.q[1:]
	return fr, true, nil
}

// serveOrdered serves fr and then the ordered requests of c queued
// behind it, one after another, until the lane is empty.
func (c *conn) serveOrdered(fr *frame) {
	s := c.srv
	for {
		failed := c.serve(fr, true)
		next, ok, dropped := s.lanes.next(c, failed)
		for i := range dropped {
			d := &dropped[i]
			c.respondErr(&d.Header, schema.StatusOutOfOrder, "an ordered request before this one on this connection failed; send this one again after it")
			d.release()
			c.inflight.Add(-1)
			s.wg.Done()
		}
		if !ok {
			return
		}
		*fr = next
	}
}
