package gateway

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// reqSlices is how many shared request contexts a RequestTimeout spans.
const reqSlices = 20

// reqCtxs hands out the contexts that bound calls into logic. Requests
// that start within the same slice of RequestTimeout/reqSlices share one
// context, so a request costs no timer and no allocation of its own (a
// context.WithTimeout per request was a tenth of the gateway's CPU under
// an s2c fan-out, where every delivery brings an ack). A request gets
// between RequestTimeout less one slice and RequestTimeout.
type reqCtxs struct {
	parent  context.Context
	timeout time.Duration
	slice   time.Duration
	cur     atomic.Pointer[reqCtx]
	mu      sync.Mutex
}

type reqCtx struct {
	ctx    context.Context
	cancel context.CancelFunc // released by the context's own deadline
	until  time.Time          // hand it out until then
}

func newReqCtxs(parent context.Context, timeout time.Duration) *reqCtxs {
	return &reqCtxs{parent: parent, timeout: timeout, slice: max(timeout/reqSlices, time.Millisecond)}
}

// get returns a context that ends about RequestTimeout from now.
func (r *reqCtxs) get() context.Context {
	now := time.Now()
	if c := r.cur.Load(); c != nil && now.Before(c.until) {
		return c.ctx
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c := r.cur.Load(); c != nil && now.Before(c.until) {
		return c.ctx
	}
	ctx, cancel := context.WithDeadline(r.parent, now.Add(r.timeout))
	r.cur.Store(&reqCtx{ctx: ctx, cancel: cancel, until: now.Add(r.slice)})
	return ctx
}
