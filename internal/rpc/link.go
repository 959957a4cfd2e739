// Package rpc is the internal RPC between tiers (schema/PROTOCOL.md,
// "Internal RPC"): persistent TCP links that carry the client frame, with
// many requests in flight each way, matched by seq. A gateway dials every
// logic node and serves logic.Gate on the link it dialed; the logic node
// serves logic.API on it. Nothing here is visible to clients.
package rpc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/schema"
	"google.golang.org/protobuf/proto"
)

// MaxBody bounds an internal frame's body: a client body (64 KiB by
// default) plus its session and header, or a push to many connections.
const MaxBody = 4 << 20

// maxQueue is the most unsent bytes a link holds before calls on it fail
// with StatusUnavailable instead of growing memory without bound.
const maxQueue = 64 << 20

// maxServing bounds the requests a link serves at once; past it the link
// stops reading, and TCP pushes back on the peer.
const maxServing = 4096

// Handler serves a request or notify that arrived on a link. It returns
// the response body, or an error: a *schema.Error travels as its status,
// any other error as StatusInternal. For a notify the result is dropped.
// f.Body is only valid until Handler returns.
type Handler func(ctx context.Context, l *Link, f *schema.Frame) ([]byte, error)

// Link is one multiplexed connection between two tiers. All methods are
// safe for concurrent use.
type Link struct {
	nc      net.Conn
	handler Handler
	log     *slog.Logger

	seq     atomic.Uint32
	pmu     sync.Mutex
	pending map[uint32]chan reply

	wmu     sync.Mutex
	out     []byte // frames waiting for the writer
	spare   []byte
	wake    chan struct{}
	serving chan struct{}

	ctx    context.Context // cancelled when the link closes
	cancel context.CancelFunc
	hctx   context.Context // handlers run under it: it outlives the link
	m      *Metrics
	once   sync.Once
	err    error // why it closed; read after ctx is done
	done   chan struct{}

	// Peer names the other end once the hello has been exchanged.
	peer atomic.Pointer[string]
}

type reply struct {
	h    schema.Header
	body []byte
	err  error
}

// ErrClosed is returned by calls on a link that has closed.
var ErrClosed = errors.New("rpc: link closed")

// NewLink starts serving nc: a reader and a writer goroutine run until the
// connection fails or Close is called. handler serves the peer's requests
// under hctx, not under the link: a request that arrived is served to the
// end even if the link closes meanwhile (a gateway's last disconnects
// before it exits must still unregister their sessions).
func NewLink(hctx context.Context, nc net.Conn, handler Handler, log *slog.Logger) *Link {
	return newLink(hctx, nc, handler, log, nil)
}

func newLink(hctx context.Context, nc net.Conn, handler Handler, log *slog.Logger, m *Metrics) *Link {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Link{
		nc: nc, handler: handler, log: log, hctx: hctx, m: m,
		pending: make(map[uint32]chan reply),
		wake:    make(chan struct{}, 1),
		serving: make(chan struct{}, maxServing),
		done:    make(chan struct{}),
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		_ = tc.SetKeepAlive(true)
		_ = tc.SetKeepAlivePeriod(15 * time.Second)
	}
	go l.readLoop()
	go l.writeLoop()
	return l
}

// Peer returns the name the peer gave in its hello, or "".
func (l *Link) Peer() string {
	if p := l.peer.Load(); p != nil {
		return *p
	}
	return ""
}

// SetPeer records the peer's name.
func (l *Link) SetPeer(name string) { l.peer.Store(&name) }

// RemoteAddr is the peer's address.
func (l *Link) RemoteAddr() string { return l.nc.RemoteAddr().String() }

// Done is closed when the link has closed.
func (l *Link) Done() <-chan struct{} { return l.done }

// Err says why the link closed; nil while it is open.
func (l *Link) Err() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// Close closes the link; calls in flight fail with ErrClosed.
func (l *Link) Close() error {
	l.fail(ErrClosed)
	return nil
}

// closeAfter closes the link after d, so that a last answer can leave.
func (l *Link) closeAfter(d time.Duration) {
	time.AfterFunc(d, func() { _ = l.Close() })
}

func (l *Link) fail(err error) {
	l.once.Do(func() {
		l.err = err
		l.cancel()
		_ = l.nc.Close()
		l.pmu.Lock()
		for seq, ch := range l.pending {
			ch <- reply{err: fmt.Errorf("%w: %v", ErrClosed, err)}
			delete(l.pending, seq)
		}
		l.pmu.Unlock()
		close(l.done)
	})
}

// Call sends a request and waits for its response. h supplies the header
// fields other than kind, seq and body length. A non-zero response status
// comes back as a *schema.Error; a broken link or an expired ctx as a
// retryable *schema.Error too (StatusUnavailable, StatusTimeout), so that
// callers pass every failure on to clients in the same form. On success
// the response body is unmarshalled into resp (when not nil) and returned.
func (l *Link) Call(ctx context.Context, h schema.Header, req proto.Message, resp proto.Message) ([]byte, error) {
	var body []byte
	if req != nil {
		var err error
		if body, err = proto.Marshal(req); err != nil {
			return nil, fmt.Errorf("rpc: marshal %s: %w", h.Cmd, err)
		}
	}
	rb, err := l.CallRaw(ctx, h, body)
	if err != nil {
		return nil, err
	}
	if resp != nil {
		if err := proto.Unmarshal(rb, resp); err != nil {
			return nil, schema.Errorf(schema.StatusInternal, "rpc: %s response from %s: %v", h.Cmd, l.Peer(), err)
		}
	}
	return rb, nil
}

// CallRaw is Call with an encoded request body and the response body
// returned as it came.
func (l *Link) CallRaw(ctx context.Context, h schema.Header, body []byte) (resp []byte, err error) {
	if l.m != nil {
		start := time.Now()
		defer func() { l.m.call(h.Cmd, err, time.Since(start)) }()
	}
	ch := make(chan reply, 1)
	seq := l.seq.Add(1)
	l.pmu.Lock()
	select {
	case <-l.done:
		l.pmu.Unlock()
		return nil, schema.Errorf(schema.StatusUnavailable, "rpc: link to %s closed: %v", l.Peer(), l.err)
	default:
	}
	l.pending[seq] = ch
	l.pmu.Unlock()
	h.Seq = seq
	h.Status = 0
	h.SetKind(schema.KindRequest)
	if err := l.send(&h, body); err != nil {
		l.forget(seq)
		return nil, err
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, schema.Errorf(schema.StatusUnavailable, "rpc: %s to %s: %v", h.Cmd, l.Peer(), r.err)
		}
		if r.h.Status != schema.StatusOK {
			return nil, schema.DecodeError(&r.h, r.body)
		}
		return r.body, nil
	case <-ctx.Done():
		l.forget(seq)
		return nil, schema.Errorf(schema.StatusTimeout, "rpc: %s to %s: %v", h.Cmd, l.Peer(), ctx.Err())
	}
}

// Notify sends a frame that gets no response.
func (l *Link) Notify(h schema.Header, m proto.Message) error {
	body, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("rpc: marshal %s: %w", h.Cmd, err)
	}
	h.Seq, h.Status = 0, 0
	h.SetKind(schema.KindNotify)
	return l.send(&h, body)
}

func (l *Link) forget(seq uint32) {
	l.pmu.Lock()
	delete(l.pending, seq)
	l.pmu.Unlock()
}

// send queues one frame for the writer. Frames queued while the writer is
// busy leave together in its next write.
func (l *Link) send(h *schema.Header, body []byte) error {
	l.wmu.Lock()
	if l.ctx.Err() != nil {
		l.wmu.Unlock()
		return schema.Errorf(schema.StatusUnavailable, "rpc: link to %s closed", l.Peer())
	}
	if len(l.out) > maxQueue {
		l.wmu.Unlock()
		return schema.Errorf(schema.StatusUnavailable, "rpc: link to %s is %d bytes behind", l.Peer(), len(l.out))
	}
	l.out = schema.AppendFrame(l.out, h, body)
	l.wmu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return nil
}

func (l *Link) writeLoop() {
	for {
		select {
		case <-l.ctx.Done():
			return
		case <-l.wake:
		}
		l.wmu.Lock()
		buf := l.out
		if len(buf) == 0 {
			l.wmu.Unlock()
			continue
		}
		// Two buffers take turns: senders fill one while this writes the other.
		l.out, l.spare = l.spare[:0], nil
		l.wmu.Unlock()
		_ = l.nc.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := l.nc.Write(buf); err != nil {
			l.fail(fmt.Errorf("write: %w", err))
			return
		}
		if cap(buf) > 1<<20 { // a burst's buffer is not kept
			buf = nil
		}
		l.wmu.Lock()
		l.spare = buf
		l.wmu.Unlock()
	}
}

func (l *Link) readLoop() {
	dec := schema.NewDecoder(bufio.NewReaderSize(l.nc, 64<<10), MaxBody)
	for {
		var f schema.Frame
		if err := dec.ReadFrame(&f); err != nil {
			if errors.Is(err, io.EOF) || l.ctx.Err() != nil {
				l.fail(io.EOF)
			} else {
				l.fail(fmt.Errorf("read: %w", err))
			}
			return
		}
		switch f.Kind() {
		case schema.KindResponse:
			l.pmu.Lock()
			ch := l.pending[f.Seq]
			delete(l.pending, f.Seq)
			l.pmu.Unlock()
			if ch != nil {
				// The waiter owns a copy: the pooled body goes back now.
				ch <- reply{h: f.Header, body: append([]byte(nil), f.Body...)}
			}
			f.Release()
		default:
			select {
			case l.serving <- struct{}{}:
			case <-l.ctx.Done():
				f.Release()
				return
			}
			go l.serve(f)
		}
	}
}

func (l *Link) serve(f schema.Frame) {
	defer func() { <-l.serving }()
	defer f.Release()
	body, err := l.handler(l.hctx, l, &f)
	l.m.serve(f.Cmd, err)
	if f.Kind() == schema.KindNotify {
		if err != nil {
			l.log.Debug("rpc notify failed", "cmd", f.Cmd, "peer", l.Peer(), "err", err)
		}
		return
	}
	h := f.Header
	h.SetKind(schema.KindResponse)
	h.Status = schema.StatusOK
	if err != nil {
		var se *schema.Error
		if !errors.As(err, &se) {
			l.log.Warn("rpc request failed", "cmd", f.Cmd, "peer", l.Peer(), "logid", f.LogID, "err", err)
			se = &schema.Error{Status: schema.StatusInternal, Message: err.Error()}
		}
		h.Status = se.Status
		body = schema.ErrorBody(se.Status, se.Message)
	}
	_ = l.send(&h, body)
}

// helloTimeout is how long a link that was dialled in may go without a
// hello before it is closed.
const helloTimeout = 10 * time.Second

// waitClosed waits until l closes, closing it when it sent no hello
// (named no peer) within helloTimeout.
func waitClosed(l *Link, log *slog.Logger, what string) {
	hello := time.NewTimer(helloTimeout)
	defer hello.Stop()
	select {
	case <-l.Done():
	case <-hello.C:
		if l.Peer() == "" {
			log.Warn(what+" sent no hello; closing", "remote", l.RemoteAddr())
			_ = l.Close()
		}
		<-l.Done()
	}
}
