package sdk

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/schema"
	"google.golang.org/protobuf/proto"
)

// link is one TCP connection to a gateway: a reader goroutine that matches
// responses to pending requests by seq and hands notifies to the client.
type link struct {
	cl   *Client
	nc   net.Conn
	addr string // the gateway dialled

	// online is set (under cl.mu) once a login succeeded on the link.
	online bool

	wmu sync.Mutex // serialises frame writes
	wb  []byte

	// compress is set once the login on this link negotiated body
	// compression: bodies of compressMin bytes or more go out compressed.
	compress atomic.Bool

	mu      sync.Mutex
	pending map[uint32]chan result
	err     error // set once the link is dead
	done    chan struct{}
}

type result struct {
	h    schema.Header
	body []byte
}

func dialLink(ctx context.Context, cl *Client, addr string) (*link, error) {
	ctx, cancel := context.WithTimeout(ctx, cl.opts.DialTimeout)
	defer cancel()
	nc, err := dialConn(ctx, &cl.opts, addr)
	if err != nil {
		return nil, err
	}
	l := &link{cl: cl, nc: nc, addr: addr, pending: make(map[uint32]chan result), done: make(chan struct{})}
	go l.readLoop()
	return l, nil
}

// dialConn opens the connection to addr: TCP, then a TLS handshake when
// Options.TLS is set (its ServerName defaulting to addr's host).
func dialConn(ctx context.Context, o *Options, addr string) (net.Conn, error) {
	if o.TLS != nil && o.Dialer == nil {
		d := tls.Dialer{Config: o.TLS}
		return d.DialContext(ctx, "tcp", addr)
	}
	dial := o.Dialer
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	nc, err := dial(ctx, "tcp", addr)
	if err != nil || o.TLS == nil {
		return nc, err
	}
	cfg := o.TLS
	if cfg.ServerName == "" {
		host, _, serr := net.SplitHostPort(addr)
		if serr != nil {
			host = addr
		}
		cfg = cfg.Clone()
		cfg.ServerName = host
	}
	tc := tls.Client(nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = nc.Close()
		return nil, err
	}
	return tc, nil
}

func (l *link) readLoop() {
	dec := schema.NewDecoder(bufio.NewReaderSize(l.nc, 4<<10), l.cl.opts.MaxBody)
	var f schema.Frame
	for {
		if err := dec.ReadFrame(&f); err != nil {
			l.fail(fmt.Errorf("%w: %v", ErrConnLost, err))
			return
		}
		body, err := l.body(&f)
		f.Release()
		if err != nil {
			l.fail(fmt.Errorf("%w: %v", ErrConnLost, err))
			return
		}
		switch f.Kind() {
		case schema.KindResponse:
			l.mu.Lock()
			ch := l.pending[f.Seq]
			delete(l.pending, f.Seq)
			l.mu.Unlock()
			if ch != nil {
				ch <- result{h: f.Header, body: body}
			} else if f.Status != schema.StatusOK {
				// An error that answers no request of ours: the server is
				// telling us why it is about to close (login timeout,
				// too many connections, ...).
				l.fail(schema.DecodeError(&f.Header, body))
				return
			}
		case schema.KindNotify:
			l.cl.notified(l, f.Header, body)
		}
	}
}

// compressMin is the smallest body the client compresses.
const compressMin = 512

// body returns a copy of f's body, decompressed when the frame says it is
// compressed (and the client offered compression): a body that would
// decompress to more than MaxBody is refused before it is inflated.
func (l *link) body(f *schema.Frame) ([]byte, error) {
	if f.Flags&schema.FlagCompressed == 0 {
		return append([]byte(nil), f.Body...), nil
	}
	if l.cl.opts.Compression == CompressionOff {
		return nil, errors.New("compressed frame, but the client did not offer compression")
	}
	n, err := schema.DecompressedLen(f.Body, l.cl.opts.MaxBody)
	if err != nil {
		return nil, err
	}
	body := make([]byte, n)
	if err := schema.Decompress(body, f.Body); err != nil {
		return nil, err
	}
	f.Flags &^= schema.FlagCompressed
	f.BodyLen = uint32(n)
	return body, nil
}

// fail marks the link dead with err, closes the socket and wakes every
// pending request.
func (l *link) fail(err error) {
	l.mu.Lock()
	if l.err != nil {
		l.mu.Unlock()
		return
	}
	l.err = err
	pend := l.pending
	l.pending = nil
	close(l.done)
	l.mu.Unlock()
	_ = l.nc.Close()
	for _, ch := range pend {
		close(ch)
	}
	l.cl.linkDown(l, err)
}

func (l *link) dead() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// roundTrip sends a request and waits for its response.
func (l *link) roundTrip(ctx context.Context, h schema.Header, req proto.Message, resp proto.Message) error {
	seq, ch, err := l.start(h, req)
	if err != nil {
		return err
	}
	return l.wait(ctx, h.Cmd, seq, ch, resp)
}

// start writes request req with header h (its flags other than the kind
// kept: schema.FlagOrdered) and returns its seq and the channel its
// response comes on, for wait.
func (l *link) start(h schema.Header, req proto.Message) (uint32, chan result, error) {
	body, err := proto.Marshal(req)
	if err != nil {
		return 0, nil, fmt.Errorf("sdk: marshal %s: %w", h.Cmd, err)
	}
	ch := make(chan result, 1)
	l.mu.Lock()
	if l.err != nil {
		l.mu.Unlock()
		return 0, nil, l.err
	}
	h.Seq = l.cl.seq.Add(1)
	l.pending[h.Seq] = ch
	l.mu.Unlock()

	h.Flags &= schema.FlagOrdered
	h.SetKind(schema.KindRequest)
	if err := l.write(&h, body); err != nil {
		l.fail(fmt.Errorf("%w: write: %v", ErrConnLost, err))
		return 0, nil, l.dead()
	}
	return h.Seq, ch, nil
}

// wait returns the response of the request start wrote, decoded into
// resp, or its error status as a *schema.Error.
func (l *link) wait(ctx context.Context, cmd schema.Cmd, seq uint32, ch chan result, resp proto.Message) error {
	select {
	case r, ok := <-ch:
		if !ok {
			return l.dead()
		}
		if r.h.Status != schema.StatusOK {
			return schema.DecodeError(&r.h, r.body)
		}
		if resp != nil {
			if err := proto.Unmarshal(r.body, resp); err != nil {
				return fmt.Errorf("sdk: %s response: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		if l.pending != nil {
			delete(l.pending, seq)
		}
		l.mu.Unlock()
		return ctx.Err()
	}
}

// send writes a notify (acks) without waiting for anything.
func (l *link) send(h schema.Header, m proto.Message) error {
	body, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	h.Flags = 0
	h.SetKind(schema.KindNotify)
	if err := l.write(&h, body); err != nil {
		l.fail(fmt.Errorf("%w: write: %v", ErrConnLost, err))
		return l.dead()
	}
	return nil
}

func (l *link) write(h *schema.Header, body []byte) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if len(body) >= compressMin && l.compress.Load() {
		need := schema.HeaderLen + schema.CompressBound(len(body))
		if cap(l.wb) < need {
			l.wb = make([]byte, need)
		}
		l.wb = l.wb[:need]
		if n := schema.Compress(l.wb[schema.HeaderLen:], body); n > 0 {
			h.Flags |= schema.FlagCompressed
			h.BodyLen = uint32(n)
			h.Put(l.wb)
			l.wb = l.wb[:schema.HeaderLen+n]
		} else {
			l.wb = schema.AppendFrame(l.wb[:0], h, body)
		}
	} else {
		l.wb = schema.AppendFrame(l.wb[:0], h, body)
	}
	_ = l.nc.SetWriteDeadline(time.Now().Add(l.cl.opts.RequestTimeout))
	_, err := l.nc.Write(l.wb)
	if cap(l.wb) > 64<<10 {
		l.wb = nil
	}
	return err
}

func (l *link) close(err error) { l.fail(err) }

// IsRetryable reports whether err (from any Client method) may succeed if
// the same call is made again later.
func IsRetryable(err error) bool {
	var se *schema.Error
	if errors.As(err, &se) {
		// 1006 on a connection this client logged in means the server
		// does not count it as logged in any more; it closes it, and the
		// request can go again once the client has logged in anew.
		return se.Retryable() || se.Status == schema.StatusNotLoggedIn
	}
	return errors.Is(err, ErrConnLost) || errors.Is(err, ErrNotConnected) || errors.Is(err, context.DeadlineExceeded)
}
