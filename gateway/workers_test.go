package gateway

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
)

// blockingAPI is a logic.API whose Handle waits for release and counts
// the calls it served.
type blockingAPI struct {
	release chan struct{}
	served  atomic.Int32
}

func (a *blockingAPI) Login(context.Context, logic.LoginInput) (logic.LoginResult, error) {
	return logic.LoginResult{}, nil
}
func (a *blockingAPI) Logout(context.Context, router.Session) error { return nil }
func (a *blockingAPI) Disconnected(context.Context, router.Session) {}
func (a *blockingAPI) Handle(ctx context.Context, _ router.Session, _ *schema.Header, _ []byte) ([]byte, error) {
	select {
	case <-a.release:
	case <-ctx.Done():
	}
	a.served.Add(1)
	return nil, nil
}

// TestWorkPool: a request that finds no waiting worker starts one, up to
// the bound, beyond which it is left to the caller; a worker that
// finished waits for the next request, and leaves once idle; notifies
// wait in their queue for the fixed workers.
func TestWorkPool(t *testing.T) {
	api := &blockingAPI{release: make(chan struct{})}
	s, err := New(Options{Addr: "127.0.0.1:0"}, api)
	if err != nil {
		t.Fatal(err)
	}
	defer s.stop()
	p := &s.work
	p.maxReqs, p.idle = 3, 100*time.Millisecond
	// A closed connection: serve answers into nothing.
	c := &conn{srv: s, closed: true}
	put := func(respond bool) bool {
		c.inflight.Add(1)
		s.wg.Add(1)
		j := job{c: c, respond: respond}
		j.fr.Header.Cmd = schema.CmdC2CSend
		if p.put(&j) {
			return true
		}
		c.inflight.Add(-1)
		s.wg.Done()
		return false
	}
	for i := range 3 {
		if !put(true) {
			t.Fatalf("request %d was not taken below the bound", i)
		}
	}
	if n := p.nreq.Load(); n != 3 {
		t.Fatalf("%d request workers for 3 blocked requests, want 3", n)
	}
	if put(true) {
		t.Fatal("a request beyond the bound was taken")
	}
	for range 3 {
		api.release <- struct{}{}
	}
	eventually(t, 2*time.Second, "three requests served", func() bool { return api.served.Load() == 3 })
	// The workers now wait: the next request is handed over, no new one starts.
	var wg sync.WaitGroup
	wg.Go(func() { api.release <- struct{}{} })
	eventually(t, 2*time.Second, "a waiting worker takes the request", func() bool { return put(true) })
	wg.Wait()
	if n := p.nreq.Load(); n > 3 {
		t.Fatalf("%d request workers after a handover, want at most 3", n)
	}
	// Notifies queue for the fixed workers.
	for range 5 {
		if !put(false) {
			t.Fatal("a notify was not queued")
		}
	}
	for range 5 {
		api.release <- struct{}{}
	}
	eventually(t, 2*time.Second, "all served", func() bool { return api.served.Load() == 9 })
	// Idle request workers leave.
	eventually(t, 2*time.Second, "idle request workers left", func() bool { return p.nreq.Load() == 0 })
	s.wg.Wait()
	if n := c.inflight.Load(); n != 0 {
		t.Fatalf("%d requests still counted in flight", n)
	}
}
