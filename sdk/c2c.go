package sdk

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// ErrSendFailed wraps the last error of a SendC2C that used up its attempts.
var ErrSendFailed = errors.New("sdk: send failed")

// NewClientMsgID returns a random client message id. An app that keeps its
// own outbox across restarts stores it with the message and passes it to
// SendC2CWithID on every retry, so the platform stores the message once.
func NewClientMsgID() string {
	var b [16]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// SendC2C sends content to user `to` and returns once the platform has
// stored it (the response means "stored", not "delivered"; OnReceipt says
// when a terminal of the recipient acknowledged it). Connection failures,
// timeouts and retryable statuses are retried with exponential backoff and
// jitter, with the same client message id, up to Options.SendAttempts; then
// the last error is returned wrapped in ErrSendFailed. Statuses that no
// retry can cure (bad recipient, empty content, ...) return at once.
//
// Per-sender order: a message sent after SendC2C returned for an earlier
// one reaches every terminal of its recipient after the earlier one.
func (c *Client) SendC2C(ctx context.Context, to *pb.User, msgtype uint32, content []byte) (*pb.C2CSendResponse, error) {
	return c.SendC2CWithID(ctx, to, msgtype, NewClientMsgID(), content)
}

// SendC2CWithID is SendC2C with a client message id chosen by the app.
func (c *Client) SendC2CWithID(ctx context.Context, to *pb.User, msgtype uint32, clientMsgID string, content []byte) (*pb.C2CSendResponse, error) {
	req := &pb.C2CSendRequest{To: to, ClientMsgId: clientMsgID, Content: content}
	backoff := c.opts.SendBackoffMin
	var err error
	for attempt := 1; ; attempt++ {
		var resp pb.C2CSendResponse
		actx, cancel := context.WithTimeout(ctx, c.opts.RequestTimeout)
		err = c.Request(actx, schema.CmdC2CSend, msgtype, req, &resp)
		cancel()
		if err == nil {
			return &resp, nil
		}
		if !IsRetryable(err) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
			return nil, err
		}
		if attempt >= c.opts.SendAttempts {
			return nil, fmt.Errorf("%w after %d attempts: %w", ErrSendFailed, attempt, err)
		}
		d := backoff/2 + time.Duration(rand.Int64N(int64(backoff/2)+1))
		c.log.Debug("sdk: c2c send failed; retrying", "attempt", attempt, "in", d, "err", err)
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %w (last error: %v)", ErrSendFailed, ctx.Err(), err)
		case <-c.stop:
			return nil, ErrClosed
		}
		backoff = min(2*backoff, c.opts.SendBackoffMax)
	}
}

// SyncHistory returns up to limit messages of this user's history (both
// sides of every conversation, or of the one with peer when peer is not
// nil) with msgid > since, oldest first, from any device. An app that
// stores the last msgid it synced calls it with that msgid after a restart.
func (c *Client) SyncHistory(ctx context.Context, peer *pb.User, since uint64, limit uint32) (*pb.HistorySyncResponse, error) {
	var resp pb.HistorySyncResponse
	err := c.Request(ctx, schema.CmdHistorySync, 0, &pb.HistorySyncRequest{Peer: peer, SinceMsgid: since, Limit: limit}, &resp)
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// OfflineCount returns how many messages wait in this terminal's inbox.
func (c *Client) OfflineCount(ctx context.Context) (*pb.OfflineCountResponse, error) {
	var resp pb.OfflineCountResponse
	if err := c.Request(ctx, schema.CmdOfflineCount, 0, &pb.OfflineCountRequest{}, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// ---- receiving ----

// inbox orders, deduplicates and acknowledges the c2c messages the client
// receives. After every login it pulls the terminal's offline inbox page by
// page while live notifies wait in a buffer, then hands the buffer over, so
// the app sees offline messages first and no message twice.
type inbox struct {
	c *Client

	mu       sync.Mutex
	gen      uint64 // login generation: a sync of an older one stops
	syncing  bool
	buffered []*pb.C2CMessage
	queue    []qitem
	wake     chan struct{}

	// dedup: the last DedupSize msgids delivered
	seen map[uint64]struct{}
	ring []uint64
	next int

	ackMu   sync.Mutex
	pending []uint64 // delivered, not yet acknowledged
}

type qitem struct {
	m       *pb.C2CMessage
	barrier chan struct{}
}

func newInbox(c *Client) *inbox {
	return &inbox{c: c, wake: make(chan struct{}, 1), seen: make(map[uint64]struct{}, c.opts.DedupSize), ring: make([]uint64, c.opts.DedupSize)}
}

func (in *inbox) push(items ...qitem) {
	in.queue = append(in.queue, items...)
	select {
	case in.wake <- struct{}{}:
	default:
	}
}

// notified takes a C2CNotify from the connection.
func (in *inbox) notified(body []byte) {
	var n pb.C2CNotify
	if err := proto.Unmarshal(body, &n); err != nil {
		in.c.log.Warn("sdk: bad c2c notify", "err", err)
		return
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.syncing {
		in.buffered = append(in.buffered, n.Messages...)
		return
	}
	for _, m := range n.Messages {
		in.push(qitem{m: m})
	}
}

// loop delivers queued messages to OnC2C one at a time and acknowledges them.
func (in *inbox) loop() {
	defer in.c.wg.Done()
	tick := time.NewTicker(in.c.opts.AckDelay)
	defer tick.Stop()
	for {
		in.mu.Lock()
		items := in.queue
		in.queue = nil
		in.mu.Unlock()
		for _, it := range items {
			if it.barrier != nil {
				close(it.barrier)
				continue
			}
			if in.firstTime(it.m.Msgid) {
				in.c.opts.OnC2C(it.m)
			}
			// Ack duplicates too: a message shown before and delivered
			// again is still in the inbox because its ack was lost.
			in.ackMu.Lock()
			in.pending = append(in.pending, it.m.Msgid)
			n := len(in.pending)
			in.ackMu.Unlock()
			if n >= 200 {
				in.flushAcks()
			}
		}
		select {
		case <-in.wake:
		case <-tick.C:
			in.flushAcks()
		case <-in.c.stop:
			return
		}
	}
}

func (in *inbox) firstTime(id uint64) bool {
	if _, ok := in.seen[id]; ok {
		return false
	}
	if old := in.ring[in.next]; old != 0 {
		delete(in.seen, old)
	}
	in.ring[in.next] = id
	in.next = (in.next + 1) % len(in.ring)
	in.seen[id] = struct{}{}
	return true
}

// flushAcks sends the pending acks on the current connection. Acks that
// cannot be sent now wait for the next flush (acks are idempotent); if the
// client closes first, the messages stay in the inbox, come back at the next
// login, are recognised as duplicates (within DedupSize) and acked then.
func (in *inbox) flushAcks() {
	in.ackMu.Lock()
	ids := in.pending
	in.pending = nil
	in.ackMu.Unlock()
	if len(ids) == 0 {
		return
	}
	c := in.c
	c.mu.Lock()
	l, up := c.link, c.up
	c.mu.Unlock()
	sent := 0
	select {
	case <-up:
		for sent < len(ids) {
			n := min(len(ids)-sent, 500)
			ctx, cancel := context.WithTimeout(context.Background(), c.opts.RequestTimeout)
			err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdC2CAck}, &pb.C2CAckRequest{Msgids: ids[sent : sent+n]}, nil)
			cancel()
			if err != nil {
				c.log.Debug("sdk: ack failed; will retry", "n", len(ids)-sent, "err", err)
				break
			}
			sent += n
		}
	default:
	}
	if sent < len(ids) {
		in.ackMu.Lock()
		in.pending = append(ids[sent:], in.pending...)
		in.ackMu.Unlock()
	}
}

// deliverAndWait queues msgs and waits until OnC2C has returned for each.
func (in *inbox) deliverAndWait(msgs []*pb.C2CMessage) bool {
	b := make(chan struct{})
	in.mu.Lock()
	for _, m := range msgs {
		in.push(qitem{m: m})
	}
	in.push(qitem{barrier: b})
	in.mu.Unlock()
	select {
	case <-b:
		return true
	case <-in.c.stop:
		return false
	}
}

// beginLogin is called before a login request is sent: from then on live
// notifies wait in the buffer, because the server may push one as soon as
// the session is registered, before the login response arrives, and that
// message must not overtake older ones still in the inbox.
func (in *inbox) beginLogin() {
	in.mu.Lock()
	in.gen++
	in.syncing = true
	in.mu.Unlock()
}

// startSync begins pulling the offline inbox on link l after a login.
func (in *inbox) startSync(l *link) {
	in.mu.Lock()
	gen := in.gen
	in.mu.Unlock()
	in.c.wg.Add(1)
	go in.sync(l, gen)
}

func (in *inbox) sync(l *link, gen uint64) {
	c := in.c
	defer c.wg.Done()
	var after uint64
	var ack []uint64
	for {
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.RequestTimeout)
		var resp pb.OfflinePullResponse
		err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdOfflinePull}, &pb.OfflinePullRequest{PageSize: c.opts.PageSize, AfterMsgid: after, AckMsgids: ack}, &resp)
		cancel()
		if err != nil {
			// The link is lost (the next login syncs again) or the store
			// is unavailable: try again shortly on this link.
			if l.dead() != nil {
				return
			}
			c.log.Warn("sdk: offline pull failed; retrying", "err", err)
			select {
			case <-time.After(c.opts.SendBackoffMin):
				continue
			case <-c.stop:
				return
			case <-l.done:
				return
			}
		}
		if !in.deliverAndWait(resp.Messages) {
			return
		}
		ack = ack[:0]
		for _, m := range resp.Messages {
			ack = append(ack, m.Msgid)
			after = max(after, m.Msgid)
		}
		if !resp.More {
			break
		}
	}
	if len(ack) > 0 {
		in.ackMu.Lock()
		in.pending = append(in.pending, ack...)
		in.ackMu.Unlock()
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.gen != gen {
		return // a newer login owns the sync now
	}
	slices.SortFunc(in.buffered, func(a, b *pb.C2CMessage) int {
		switch {
		case a.Msgid < b.Msgid:
			return -1
		case a.Msgid > b.Msgid:
			return 1
		}
		return 0
	})
	for _, m := range in.buffered {
		in.push(qitem{m: m})
	}
	in.buffered = nil
	in.syncing = false
}
