package scenario

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"google.golang.org/protobuf/proto"
)

// Client kinds.
const (
	ClientSDK = "sdk" // the real Go SDK: sdk.Dial + Login (and its callbacks)
	ClientRaw = "raw" // imbench's minimal client: logs in, reads, acknowledges in batches
)

// plan is the share of the connections one client process opens. Worker
// processes get theirs as JSON in the environment.
type plan struct {
	Addr string `json:"addr"`
	// Addrs, when set, are several gateways: connection i dials
	// Addrs[i % len(Addrs)].
	Addrs        []string      `json:"addrs,omitempty"`
	AppCode      uint32        `json:"appcode"`
	Secret       string        `json:"secret"`
	Client       string        `json:"client"`
	N            int           `json:"n"`     // connections of this process
	First        int           `json:"first"` // global index of its first connection
	UIDBase      uint64        `json:"uid_base"`
	Concurrency  int           `json:"concurrency"`
	SrcIPs       int           `json:"src_ips"` // connection i binds 127.0.0.(1 + i%SrcIPs); 0 lets the kernel choose
	DialTimeout  time.Duration `json:"dial_timeout"`
	LoginTimeout time.Duration `json:"login_timeout"`
	TokenTTL     time.Duration `json:"token_ttl"`
	MaxErrors    int           `json:"max_errors"` // stop opening after this many failures; 0 never
}

// addr is the gateway connection idx dials.
func (p *plan) addr(idx int) string {
	if len(p.Addrs) > 0 {
		return p.Addrs[idx%len(p.Addrs)]
	}
	return p.Addr
}

// openResult is what opening a plan's connections produced.
type openResult struct {
	Opened  int64           `json:"opened"`
	Failed  int64           `json:"failed"`
	Start   time.Time       `json:"start"`
	End     time.Time       `json:"end"`
	Dial    bench.Histogram `json:"dial"`  // TCP connect (sdk: sdk.Dial)
	Login   bench.Histogram `json:"login"` // login request to response
	Errors  map[string]int  `json:"errors,omitempty"`
	Aborted string          `json:"aborted,omitempty"`
}

func (r *openResult) merge(o *openResult) {
	if r.Start.IsZero() || (!o.Start.IsZero() && o.Start.Before(r.Start)) {
		r.Start = o.Start
	}
	if o.End.After(r.End) {
		r.End = o.End
	}
	r.Opened += o.Opened
	r.Failed += o.Failed
	r.Dial.Merge(&o.Dial)
	r.Login.Merge(&o.Login)
	for k, v := range o.Errors {
		if r.Errors == nil {
			r.Errors = map[string]int{}
		}
		r.Errors[k] += v
	}
	if r.Aborted == "" {
		r.Aborted = o.Aborted
	}
}

// progress is a snapshot of the clients' counters.
type progress struct {
	Opened, Failed, Dropped int64
	ClientRSS               int64 // bytes, over every client process
	ClientRSSBase           int64 // the same before any connection was opened
	Done                    bool  // every connection was attempted
}

// fleet is a set of client connections being opened or held, in this
// process or in worker processes.
type fleet interface {
	progress() progress
	// wait blocks until every connection was attempted (or opening was
	// abandoned) and returns the merged result.
	wait(ctx context.Context) (*openResult, error)
	// close closes every connection; the fleet is finished afterwards.
	close() error
}

// opener opens and holds one process's connections.
type opener struct {
	p plan

	opened, failed, dropped atomic.Int64
	closing                 atomic.Bool

	mu     sync.Mutex
	res    openResult
	conns  []io.Closer
	kaStop chan struct{}
	kaIv   atomic.Int64 // raw: keepalive interval the server advertised, ns
}

func newOpener(p plan) *opener {
	return &opener{p: p, conns: make([]io.Closer, p.N), kaStop: make(chan struct{})}
}

// run opens the plan's connections with p.Concurrency logins in flight and
// returns when each was attempted, ctx ended or too many failed.
func (o *opener) run(ctx context.Context) *openResult {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	o.mu.Lock()
	o.res.Start = time.Now()
	o.mu.Unlock()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range max(1, min(o.p.Concurrency, o.p.N)) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= o.p.N {
					return
				}
				c, dial, login, err := o.open(ctx, o.p.First+i)
				if err != nil {
					if ctx.Err() != nil {
						return // abandoned, not a failure of the server
					}
					o.fail(err)
					if o.p.MaxErrors > 0 && o.failed.Load() >= int64(o.p.MaxErrors) {
						o.abort(fmt.Sprintf("%d connections failed (--max-errors)", o.failed.Load()))
						cancel()
					}
					continue
				}
				o.mu.Lock()
				o.conns[i] = c
				o.res.Dial.Record(dial)
				o.res.Login.Record(login)
				o.mu.Unlock()
				o.opened.Add(1)
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		o.abort(context.Cause(ctx).Error())
	}
	if o.p.Client == ClientRaw {
		go o.keepalive()
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.res.End = time.Now()
	o.res.Opened, o.res.Failed = o.opened.Load(), o.failed.Load()
	r := o.res
	return &r
}

func (o *opener) abort(why string) {
	o.mu.Lock()
	if o.res.Aborted == "" {
		o.res.Aborted = why
	}
	o.mu.Unlock()
}

func (o *opener) fail(err error) {
	o.failed.Add(1)
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.res.Errors == nil {
		o.res.Errors = map[string]int{}
	}
	msg := err.Error()
	if _, ok := o.res.Errors[msg]; ok || len(o.res.Errors) < maxDistinctErrors {
		o.res.Errors[msg]++
	} else {
		o.res.Errors["(other errors)"]++
	}
}

func (o *opener) progress() progress {
	return progress{Opened: o.opened.Load(), Failed: o.failed.Load(), Dropped: o.dropped.Load()}
}

// closeAll closes every connection, several at a time.
func (o *opener) closeAll() {
	if o.closing.Swap(true) {
		return
	}
	close(o.kaStop)
	o.mu.Lock()
	conns := o.conns
	o.mu.Unlock()
	var wg sync.WaitGroup
	const parts = 8
	for p := range parts {
		wg.Go(func() {
			for i := p; i < len(conns); i += parts {
				if conns[i] != nil {
					_ = conns[i].Close()
				}
			}
		})
	}
	wg.Wait()
}

func (o *opener) token(uid uint64) string {
	return MintToken(o.p.Secret, o.p.AppCode, uid, time.Now().Add(o.p.TokenTTL))
}

// open opens and logs in connection idx.
func (o *opener) open(ctx context.Context, idx int) (io.Closer, time.Duration, time.Duration, error) {
	if o.p.Client == ClientRaw {
		return o.openRaw(ctx, idx)
	}
	return o.openSDK(ctx, idx)
}

// dialer binds connection idx to its source address when SrcIPs is set.
func (o *opener) dialer(idx int) *net.Dialer {
	d := &net.Dialer{Timeout: o.p.DialTimeout}
	if o.p.SrcIPs > 0 {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+idx%o.p.SrcIPs))}
		d.Control = bindNoPort
	}
	return d
}

func (o *opener) openSDK(ctx context.Context, idx int) (io.Closer, time.Duration, time.Duration, error) {
	uid := o.p.UIDBase + uint64(idx)
	var up atomic.Bool
	opts := sdk.Options{
		Addrs:          []string{o.p.addr(idx)},
		DeviceID:       "imbench-" + strconv.FormatUint(uid, 10),
		Platform:       "imbench",
		DialTimeout:    o.p.DialTimeout,
		Dialer:         o.dialer(idx).DialContext,
		RequestTimeout: o.p.LoginTimeout,
		NoReconnect:    true, // a drop must show as a drop, not as a second login
		OnState: func(s sdk.State, _ error) {
			if s == sdk.StateClosed && up.Load() && !o.closing.Load() {
				o.dropped.Add(1)
			}
		},
	}
	t0 := time.Now()
	dctx, cancel := context.WithTimeout(ctx, o.p.DialTimeout)
	cl, err := sdk.Dial(dctx, opts)
	cancel()
	if err != nil {
		return nil, 0, 0, fmt.Errorf("dial: %w", err)
	}
	t1 := time.Now()
	lctx, cancel := context.WithTimeout(ctx, o.p.LoginTimeout)
	_, err = cl.Login(lctx, sdk.Credentials{AppCode: o.p.AppCode, UID: uid, Token: o.token(uid)})
	cancel()
	t2 := time.Now()
	if err != nil {
		_ = cl.Close()
		return nil, 0, 0, fmt.Errorf("login: %w", err)
	}
	up.Store(true)
	return cl, t1.Sub(t0), t2.Sub(t1), nil
}

// rawConn is a logged-in connection of the raw client: one goroutine reads
// (and drops) whatever the server sends; the opener's keepalive loop writes.
type rawConn struct {
	nc  net.Conn
	seq uint32
	wb  []byte
}

func (c *rawConn) Close() error { return c.nc.Close() }

func (o *opener) openRaw(ctx context.Context, idx int) (io.Closer, time.Duration, time.Duration, error) {
	uid := o.p.UIDBase + uint64(idx)
	d := o.dialer(idx)
	t0 := time.Now()
	nc, err := d.DialContext(ctx, "tcp", o.p.addr(idx))
	if err != nil {
		return nil, 0, 0, fmt.Errorf("dial: %w", err)
	}
	t1 := time.Now()
	c := &rawConn{nc: nc}
	resp, err := c.login(ctx, o.p.LoginTimeout, o.p.AppCode, uid, o.token(uid))
	t2 := time.Now()
	if err != nil {
		_ = nc.Close()
		return nil, 0, 0, fmt.Errorf("login: %w", err)
	}
	if iv := int64(resp.KeepaliveMs) * int64(time.Millisecond); iv > 0 {
		o.kaIv.CompareAndSwap(0, iv)
	}
	go o.rawReader(c)
	return c, t1.Sub(t0), t2.Sub(t1), nil
}

// login sends a login request and waits for its response, skipping
// notifies, within timeout or until ctx ends.
func (c *rawConn) login(ctx context.Context, timeout time.Duration, appcode uint32, uid uint64, token string) (*pb.LoginResponse, error) {
	body, err := proto.Marshal(&pb.LoginRequest{Token: token, DeviceId: "imbench-" + strconv.FormatUint(uid, 10),
		Platform: "imbench", SdkVersion: "imbench-raw"})
	if err != nil {
		return nil, err
	}
	c.seq++
	h := schema.Header{Cmd: schema.CmdLogin, AppCode: appcode, UID: uid, Seq: c.seq}
	h.SetKind(schema.KindRequest)
	_ = c.nc.SetDeadline(time.Now().Add(timeout))
	stop := context.AfterFunc(ctx, func() { _ = c.nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.nc.Write(schema.AppendFrame(nil, &h, body)); err != nil {
		return nil, err
	}
	dec := schema.NewDecoder(c.nc, 1<<20)
	var f schema.Frame
	defer f.Release()
	for {
		if err := dec.ReadFrame(&f); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, err
		}
		if f.Kind() != schema.KindResponse {
			continue
		}
		if f.Status != schema.StatusOK {
			var e pb.Error
			_ = proto.Unmarshal(f.Body, &e)
			return nil, &schema.Error{Status: f.Status, Message: e.Message}
		}
		if f.Seq != h.Seq {
			continue
		}
		var resp pb.LoginResponse
		if err := proto.Unmarshal(f.Body, &resp); err != nil {
			return nil, fmt.Errorf("login response: %w", err)
		}
		if !stop() {
			return nil, ctx.Err()
		}
		return &resp, c.nc.SetDeadline(time.Time{})
	}
}

// rawReader drains a logged-in raw connection until it closes; a close
// imbench did not ask for counts as a drop.
func (o *opener) rawReader(c *rawConn) {
	dec := schema.NewDecoder(c.nc, 1<<20)
	var f schema.Frame
	for {
		if err := dec.ReadFrame(&f); err != nil {
			f.Release()
			if !o.closing.Load() {
				o.dropped.Add(1)
			}
			return
		}
	}
}

// keepalive sends a keepalive request on every raw connection at the
// interval the server advertised, so a run longer than the server's idle
// timeout keeps its connections. Responses are drained by the readers.
func (o *opener) keepalive() {
	iv := time.Duration(o.kaIv.Load())
	if iv <= 0 {
		iv = 30 * time.Second
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	body, _ := proto.Marshal(&pb.KeepaliveRequest{})
	for {
		select {
		case <-o.kaStop:
			return
		case <-t.C:
		}
		o.mu.Lock()
		conns := o.conns
		o.mu.Unlock()
		for _, cl := range conns {
			c, ok := cl.(*rawConn)
			if !ok || o.closing.Load() {
				continue
			}
			c.seq++
			h := schema.Header{Cmd: schema.CmdKeepalive, Seq: c.seq}
			h.SetKind(schema.KindRequest)
			c.wb = schema.AppendFrame(c.wb[:0], &h, body)
			_ = c.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.nc.Write(c.wb) // a failed write shows up in the reader
		}
	}
}

// localFleet runs an opener in this process.
type localFleet struct {
	o       *opener
	done    chan struct{}
	res     *openResult
	baseRSS int64
}

func startLocal(ctx context.Context, p plan) *localFleet {
	f := &localFleet{o: newOpener(p), done: make(chan struct{})}
	if st, err := bench.ReadProcStatus(selfPID); err == nil {
		f.baseRSS = st.VmRSS
	}
	go func() {
		f.res = f.o.run(ctx)
		close(f.done)
	}()
	return f
}

func (f *localFleet) progress() progress {
	p := f.o.progress()
	select {
	case <-f.done:
		p.Done = true
	default:
	}
	if st, err := bench.ReadProcStatus(selfPID); err == nil {
		p.ClientRSS = st.VmRSS
	}
	p.ClientRSSBase = f.baseRSS
	return p
}

// wait returns once run has; run ends soon after ctx does, as every dial
// and login honours it.
func (f *localFleet) wait(ctx context.Context) (*openResult, error) {
	<-f.done
	return f.res, ctx.Err()
}

func (f *localFleet) close() error {
	<-f.done // run ends soon after its context does
	f.o.closeAll()
	return nil
}
