package sdk

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// Ordered (pipelined) one-to-one sends, PROTOCOL.md "Ordered sends".
// Every SendC2CAsync goes through the chain (and a SendC2C made while the
// chain holds sends): its first try is written at once, in the order of
// the calls, without waiting for the answers to the sends before it (up
// to Options.SendWindow of them), each naming its predecessor, the
// nearest earlier send still unanswered. The server stores a send only
// after its predecessor, so one client's messages get msgids in the order
// they were sent. A send that failed goes again only once every earlier
// send has its outcome: retries go one after another.
//
// SendC2C calls made while the chain is empty do not join it: calls from
// several goroutines have no order to keep, and the gateway serves a
// connection's ordered sends one at a time, which would cap one
// connection's sends at one store commit each (a service sending for many
// users over one connection would notice).

// sendChain holds the client's sends that have no outcome yet, in order.
type sendChain struct {
	wmu   sync.Mutex // held while a send names its predecessor and writes a try
	mu    sync.Mutex // guards links
	links []*chainLink
	slots chan struct{} // Options.SendWindow
}

type chainLink struct {
	id   string        // the send's client_msg_id
	done chan struct{} // closed when the send has its outcome
}

// add appends lk; the caller holds wmu, so the chain's order is the
// order in which tries are first written.
func (ch *sendChain) add(lk *chainLink) {
	ch.mu.Lock()
	ch.links = append(ch.links, lk)
	ch.mu.Unlock()
}

// empty reports whether no send is in the chain.
func (ch *sendChain) empty() bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return len(ch.links) == 0
}

// remove takes lk out once it has its outcome.
func (ch *sendChain) remove(lk *chainLink) {
	ch.mu.Lock()
	if i := slices.Index(ch.links, lk); i >= 0 {
		ch.links = slices.Delete(ch.links, i, i+1)
	}
	ch.mu.Unlock()
	close(lk.done)
}

// before returns the send just before lk that has no outcome yet, or nil.
func (ch *sendChain) before(lk *chainLink) *chainLink {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if i := slices.Index(ch.links, lk); i > 0 {
		return ch.links[i-1]
	}
	return nil
}

// waitHead waits until every send before lk has its outcome.
func (ch *sendChain) waitHead(ctx context.Context, lk *chainLink, stop <-chan struct{}) error {
	for {
		prev := ch.before(lk)
		if prev == nil {
			return nil
		}
		select {
		case <-prev.done:
		case <-ctx.Done():
			return ctx.Err()
		case <-stop:
			return ErrClosed
		}
	}
}

// AsyncSend is a one-to-one send in flight (SendC2CAsync).
type AsyncSend struct {
	// ClientMsgID is the send's client message id.
	ClientMsgID string
	done        chan struct{}
	resp        *pb.C2CSendResponse
	err         error
}

// Done is closed when the send has its outcome.
func (a *AsyncSend) Done() <-chan struct{} { return a.done }

// Wait returns the send's outcome, as SendC2C does, or ctx's error if ctx
// ends first (the send goes on).
func (a *AsyncSend) Wait(ctx context.Context) (*pb.C2CSendResponse, error) {
	select {
	case <-a.done:
		return a.resp, a.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// SendC2CAsync is SendC2C that returns as soon as the message is written
// to the connection (or waits, in order, for one to be up), so an app can
// send the next message before this one is answered: messages sent by
// consecutive calls are stored, and shown to the recipient, in the order
// of the calls. ctx bounds the send with all its tries; Wait returns the
// outcome. At most Options.SendWindow sends are in flight: the call
// waits for a slot beyond that.
func (c *Client) SendC2CAsync(ctx context.Context, to *pb.User, msgtype uint32, content []byte) *AsyncSend {
	return c.sendOrdered(ctx, &pb.C2CSendRequest{To: to, ClientMsgId: NewClientMsgID(), Content: content}, msgtype)
}

// orderedTry is a try written and not yet answered.
type orderedTry struct {
	l      *link
	seq    uint32
	ch     chan result
	ctx    context.Context
	cancel context.CancelFunc
}

func (c *Client) sendOrdered(ctx context.Context, req *pb.C2CSendRequest, msgtype uint32) *AsyncSend {
	a := &AsyncSend{ClientMsgID: req.ClientMsgId, done: make(chan struct{})}
	select {
	case c.chain.slots <- struct{}{}:
	case <-ctx.Done():
		a.err = fmt.Errorf("%w: %w", ErrSendFailed, ctx.Err())
		close(a.done)
		return a
	case <-c.stop:
		a.err = ErrClosed
		close(a.done)
		return a
	}
	lk := &chainLink{id: req.ClientMsgId, done: make(chan struct{})}
	c.chain.wmu.Lock()
	c.chain.add(lk)
	t, err := c.writeOrdered(ctx, req, msgtype, lk)
	c.chain.wmu.Unlock()
	go func() {
		a.resp, a.err = c.finishOrdered(ctx, req, msgtype, lk, t, err)
		c.chain.remove(lk)
		<-c.chain.slots
		close(a.done)
	}()
	return a
}

// writeOrdered writes one try of req, naming its predecessor and the
// send floor as they are now. The caller holds c.chain.wmu.
func (c *Client) writeOrdered(ctx context.Context, req *pb.C2CSendRequest, msgtype uint32, lk *chainLink) (orderedTry, error) {
	actx, cancel := context.WithTimeout(ctx, c.opts.RequestTimeout)
	l, err := c.current(actx)
	if err != nil {
		cancel()
		return orderedTry{}, err
	}
	req.AfterClientMsgId = ""
	if prev := c.chain.before(lk); prev != nil {
		req.AfterClientMsgId = prev.id
	}
	req.AfterMsgid = c.sentMsgid.Load()
	seq, ch, err := l.start(schema.Header{Cmd: schema.CmdC2CSend, MsgType: msgtype, Flags: schema.FlagOrdered}, req)
	if err != nil {
		cancel()
		return orderedTry{}, err
	}
	return orderedTry{l: l, seq: seq, ch: ch, ctx: actx, cancel: cancel}, nil
}

// finishOrdered waits for the answer to t (or takes werr, the error of
// writing it) and retries until the send has its outcome: backoff with
// jitter between tries after an error, up to SendAttempts; none after a
// 3005, which only says the predecessor was not stored yet. Every retry
// waits until the sends before it have their outcomes.
func (c *Client) finishOrdered(ctx context.Context, req *pb.C2CSendRequest, msgtype uint32, lk *chainLink, t orderedTry, werr error) (*pb.C2CSendResponse, error) {
	backoff := c.opts.SendBackoffMin
	attempt, outOfOrder := 1, 0
	for {
		err := werr
		var resp pb.C2CSendResponse
		if t.l != nil {
			err = t.l.wait(t.ctx, schema.CmdC2CSend, t.seq, t.ch, &resp)
			t.cancel()
		}
		if err == nil {
			c.answered(resp.Msgid)
			return &resp, nil
		}
		if !IsRetryable(err) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
			if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
				return nil, fmt.Errorf("%w: %w (last error: %v)", ErrSendFailed, ctx.Err(), err)
			}
			return nil, err
		}
		var se *schema.Error
		if errors.As(err, &se) && se.Status == schema.StatusOutOfOrder {
			// The predecessor's outcome decides what comes next; a chain
			// of them is bounded by the window, so this is too.
			if outOfOrder++; outOfOrder > 4*cap(c.chain.slots)+c.opts.SendAttempts {
				return nil, fmt.Errorf("%w after %d out-of-order answers: %w", ErrSendFailed, outOfOrder, err)
			}
		} else {
			if err := c.backoffStep(ctx, attempt, &backoff, err); err != nil {
				return nil, err
			}
			attempt++
		}
		if err := c.chain.waitHead(ctx, lk, c.stop); err != nil {
			if errors.Is(err, ErrClosed) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %w", ErrSendFailed, err)
		}
		c.chain.wmu.Lock()
		t, werr = c.writeOrdered(ctx, req, msgtype, lk)
		c.chain.wmu.Unlock()
	}
}
