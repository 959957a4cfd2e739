package sdk

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
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
// one reaches every terminal of its recipient after the earlier one. To
// keep that order whatever the clocks of the logic nodes, every try carries
// the highest msgid this client has been answered for (after_msgid), and
// the platform gives the new message a greater one; Options.State keeps
// that floor across restarts. Calls from several goroutines at once have
// no order among them and run side by side; to send the next message
// before this one is answered and keep their order, use SendC2CAsync
// (while sends of it are in flight, SendC2C queues behind them too).
func (c *Client) SendC2C(ctx context.Context, to *pb.User, msgtype uint32, content []byte) (*pb.C2CSendResponse, error) {
	return c.SendC2CWithID(ctx, to, msgtype, NewClientMsgID(), content)
}

// SendC2CWithID is SendC2C with a client message id chosen by the app.
func (c *Client) SendC2CWithID(ctx context.Context, to *pb.User, msgtype uint32, clientMsgID string, content []byte) (*pb.C2CSendResponse, error) {
	req := &pb.C2CSendRequest{To: to, ClientMsgId: clientMsgID, Content: content}
	if c.chain.empty() {
		return c.send(ctx, req, msgtype)
	}
	a := c.sendOrdered(ctx, req, msgtype)
	<-a.done
	return a.resp, a.err
}

// send is the code path of group sends and of one-to-one sends that need
// not queue behind ordered ones (ordered.go): tries with backoff, the same
// client message id on every try, and the send floor.
func (c *Client) send(ctx context.Context, req *pb.C2CSendRequest, msgtype uint32) (*pb.C2CSendResponse, error) {
	var resp pb.C2CSendResponse
	if err := c.retry(ctx, func(actx context.Context) error {
		// Every try carries the current floor: an answer to a concurrent
		// send may have raised it since the last try.
		req.AfterMsgid = c.sentMsgid.Load()
		return c.Request(actx, schema.CmdC2CSend, msgtype, req, &resp)
	}); err != nil {
		return nil, err
	}
	c.answered(resp.Msgid)
	return &resp, nil
}

// answered raises the send floor to msgid, the answer to a send, and
// records it in Options.State.
func (c *Client) answered(msgid uint64) {
	for {
		cur := c.sentMsgid.Load()
		if msgid <= cur {
			return
		}
		if c.sentMsgid.CompareAndSwap(cur, msgid) {
			break
		}
	}
	if c.opts.State == nil {
		return
	}
	c.sentSaveMu.Lock()
	defer c.sentSaveMu.Unlock()
	// Save the current floor, not msgid: a concurrent send may have
	// raised it further, and the store only ever sees it grow.
	if v := c.sentMsgid.Load(); v > c.sentSaved {
		if err := c.opts.State.SaveSent(v); err != nil {
			c.log.Warn("sdk: could not record the send floor", "msgid", v, "err", err)
			return
		}
		c.sentSaved = v
	}
}

// retry calls try until it succeeds, fails for good, or SendAttempts are
// used up, with exponential backoff and jitter between tries. Each try gets
// RequestTimeout.
func (c *Client) retry(ctx context.Context, try func(context.Context) error) error {
	backoff := c.opts.SendBackoffMin
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, c.opts.RequestTimeout)
		err := try(actx)
		cancel()
		if err == nil {
			return nil
		}
		if !IsRetryable(err) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
			return err
		}
		if err := c.backoffStep(ctx, attempt, &backoff, err); err != nil {
			return err
		}
	}
}

// backoffStep follows try number attempt, which failed with the retryable
// err: it gives up once SendAttempts are used, else waits backoff with
// jitter (ctx or Close end the wait) and doubles it up to SendBackoffMax.
func (c *Client) backoffStep(ctx context.Context, attempt int, backoff *time.Duration, err error) error {
	if attempt >= c.opts.SendAttempts {
		return fmt.Errorf("%w after %d attempts: %w", ErrSendFailed, attempt, err)
	}
	d := *backoff/2 + time.Duration(rand.Int64N(int64(*backoff/2)+1))
	c.log.Debug("sdk: send failed; retrying", "attempt", attempt, "in", d, "err", err)
	select {
	case <-time.After(d):
	case <-ctx.Done():
		return fmt.Errorf("%w: %w (last error: %v)", ErrSendFailed, ctx.Err(), err)
	case <-c.stop:
		return ErrClosed
	}
	*backoff = min(2**backoff, c.opts.SendBackoffMax)
	return nil
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

// inbox orders, deduplicates and acknowledges what the client receives:
// chat messages (c2c) and app-server pushes (s2c), live or kept in the
// terminal's offline inbox. After every login it pulls the inbox page by
// page while live notifies wait in a buffer, then hands the buffer over, so
// the app sees offline messages first and no message twice.
//
// A message of a kind the app has no callback for (OnC2C or OnS2C nil) is
// neither delivered nor acknowledged: it stays in the inbox.
type inbox struct {
	c *Client

	mu       sync.Mutex
	gen      uint64 // login generation: a sync of an older one stops
	syncing  bool
	again    bool // a pull was asked for while one ran: run it once more
	buffered []qitem
	queue    []qitem
	wake     chan struct{}

	// dedup: the last DedupSize msgids (and push ids) delivered; only
	// loop uses them once it runs
	seen map[uint64]struct{}
	ring []uint64
	next int

	// stepMu orders finish against loop. loop checks closing under it
	// before each callback and, after the callback, records the id and
	// queues its ack under it; busy is open while a callback runs. So
	// finish, having set closing and waited for busy (unless a callback
	// itself called Close), finds every item whose callback returned in
	// pending or pulled, and no callback starts after it.
	stepMu   sync.Mutex
	closing  bool
	busy     chan struct{} // closed when the running callback's item is queued
	loopGoid atomic.Uint64 // the goroutine running loop and the callbacks

	groups  map[uint64]*groupState // per group: what was queued, what is held (under mu)
	gsync   bool                   // the groups are being caught up after a login (under mu)
	gbuffer []*pb.C2CMessage       // live group messages held back meanwhile (under mu)

	ackMu      sync.Mutex
	gdone      map[uint64]uint64 // per group, the last seq delivered
	gpending   map[uint64]uint64 // per group, the cursor to acknowledge with the next batch
	gAckedAt   time.Time         // when group cursors last went out (GroupAckDelay)
	sAckedAt   time.Time         // when push acks last went out (PushAckDelay)
	gpulled    map[uint64]uint64 // per group, the last seq delivered from a catch-up page; its next pull acknowledges it
	pending    []uint64          // delivered from a c2c notify or the last page, not yet acknowledged
	pendingS2C []uint64          // live pushes delivered, not yet acknowledged
	pulled     []uint64          // delivered from an offline page; the next pull acknowledges them

	flushMu chan struct{} // a token held while acks are sent
}

type qitem struct {
	m        *pb.C2CMessage // an s2c push has a zero From (see isPush)
	group    bool           // a group message, for OnGroup (see group.go)
	live     bool           // a live s2c notify: acked with S2CAck, not from the inbox
	fromPull bool           // an offline page: the next pull acks it
	barrier  chan struct{}
}

// isPush reports whether m is an app-server push (stored with no sender).
func isPush(m *pb.C2CMessage) bool {
	return m.GetFrom().GetAccount() == 0 && m.GetFrom().GetUid() == 0
}

// handles reports whether the app has a callback for the kind of it.
func (in *inbox) handles(it qitem) bool {
	if it.group {
		return in.c.opts.OnGroup != nil
	}
	m := it.m
	if isPush(m) {
		return in.c.opts.OnS2C != nil
	}
	return in.c.opts.OnC2C != nil
}

func newInbox(c *Client) *inbox {
	// The dedup set grows with use up to DedupSize: an idle client (most
	// of a fleet) does not pay for 16k slots.
	return &inbox{
		c: c, wake: make(chan struct{}, 1), seen: make(map[uint64]struct{}), flushMu: make(chan struct{}, 1),
		groups: make(map[uint64]*groupState), gdone: make(map[uint64]uint64),
		gpending: make(map[uint64]uint64), gpulled: make(map[uint64]uint64),
	}
}

// remember fills the dedup window with ids shown by an earlier client of
// the terminal (Options.State), oldest first.
func (in *inbox) remember(ids []uint64) {
	if len(ids) > in.c.opts.DedupSize {
		ids = ids[len(ids)-in.c.opts.DedupSize:]
	}
	for _, id := range ids {
		in.firstTime(id)
	}
}

func (in *inbox) push(items ...qitem) {
	in.queue = append(in.queue, items...)
	select {
	case in.wake <- struct{}{}:
	default:
	}
}

// take queues live items, or buffers them while the inbox is pulled.
func (in *inbox) take(items ...qitem) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.syncing {
		in.buffered = append(in.buffered, items...)
		return
	}
	in.push(items...)
}

// notified takes a C2CNotify from the connection.
func (in *inbox) notified(body []byte) {
	var n pb.C2CNotify
	if err := proto.Unmarshal(body, &n); err != nil {
		in.c.log.Warn("sdk: bad c2c notify", "err", err)
		return
	}
	if len(n.Messages) == 0 {
		// The server asks for a pull (PROTOCOL.md, c2c-notify): messages
		// were stored while it did not know this session. Pull as after a
		// login, live notifies held back meanwhile, so order holds.
		in.resync()
		return
	}
	items := make([]qitem, len(n.Messages))
	for i, m := range n.Messages {
		items[i] = qitem{m: m}
	}
	in.take(items...)
}

// resync pulls the inbox on the current link as after a login, or has the
// pull under way run once more.
func (in *inbox) resync() {
	c := in.c
	c.mu.Lock()
	l := c.link
	c.mu.Unlock()
	if l == nil {
		return // the next login pulls
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.syncing {
		in.again = true
		return
	}
	in.syncing = true
	c.wg.Add(1)
	go in.sync(l, in.gen)
}

// pushed takes an S2CNotify from the connection.
func (in *inbox) pushed(body []byte) {
	var n pb.S2CNotify
	if err := proto.Unmarshal(body, &n); err != nil || n.PushId == 0 {
		in.c.log.Warn("sdk: bad s2c notify", "err", err)
		return
	}
	m := &pb.C2CMessage{Msgid: n.PushId, From: &pb.User{}, To: &pb.User{}, Msgtype: n.Msgtype, Content: n.Content, SentAtMs: n.SentAtMs}
	in.take(qitem{m: m, live: n.NeedAck})
}

// loop delivers queued messages to the app one at a time and acknowledges
// them.
func (in *inbox) loop() {
	defer in.c.wg.Done()
	in.loopGoid.Store(goid())
	tick := time.NewTicker(in.c.opts.AckDelay)
	defer tick.Stop()
	for {
		in.mu.Lock()
		items := in.queue
		in.queue = nil
		in.mu.Unlock()
		for _, it := range items {
			if it.barrier != nil {
				// The page is acknowledged by the next pull, which the
				// barrier lets go: what it showed is made durable first.
				in.syncState()
				close(it.barrier)
				continue
			}
			if !in.handles(it) {
				continue
			}
			if it.group {
				if in.deliverGroup(it) {
					in.flushAcks(true)
				}
				continue
			}
			in.stepMu.Lock()
			if in.closing {
				in.stepMu.Unlock()
				continue // Close or Logout: nothing more is shown or acknowledged
			}
			first := in.firstTime(it.m.Msgid)
			var busy chan struct{}
			if first {
				busy = make(chan struct{})
				in.busy = busy
			}
			in.stepMu.Unlock()
			if first {
				if isPush(it.m) {
					in.c.opts.OnS2C(&pb.S2CNotify{PushId: it.m.Msgid, Msgtype: it.m.Msgtype, Content: it.m.Content, SentAtMs: it.m.SentAtMs})
				} else {
					in.c.opts.OnC2C(it.m)
				}
			}
			in.stepMu.Lock()
			if first && in.c.opts.State != nil {
				// Recorded after the app showed it and before its ack can
				// go: a process killed in between drops the copy the next
				// one pulls.
				if err := in.c.opts.State.SaveShown([]uint64{it.m.Msgid}); err != nil {
					in.c.log.Warn("sdk: could not record a shown message", "msgid", it.m.Msgid, "err", err)
				}
			}
			// Ack duplicates too: a message shown before and delivered
			// again is still in the inbox because its ack was lost.
			in.ackMu.Lock()
			switch {
			case it.fromPull:
				in.pulled = append(in.pulled, it.m.Msgid)
			case it.live:
				in.pendingS2C = append(in.pendingS2C, it.m.Msgid)
			case !isPush(it.m):
				in.pending = append(in.pending, it.m.Msgid)
			}
			n := len(in.pending) + len(in.pendingS2C)
			in.ackMu.Unlock()
			if busy != nil {
				in.busy = nil
				close(busy)
			}
			closing := in.closing
			in.stepMu.Unlock()
			if closing {
				// Close was called from the callback: the ack cannot go
				// out any more, but the record lets the next client drop
				// the copy.
				in.syncState()
			} else if n >= 200 {
				in.flushAcks(false)
			}
		}
		select {
		case <-in.wake:
		case <-tick.C:
			in.flushAcks(false)
		case <-in.c.stop:
			return
		}
	}
}

func (in *inbox) firstTime(id uint64) bool {
	if _, ok := in.seen[id]; ok {
		return false
	}
	if len(in.ring) < in.c.opts.DedupSize {
		in.ring = append(in.ring, id)
	} else {
		delete(in.seen, in.ring[in.next])
		in.ring[in.next] = id
		in.next = (in.next + 1) % len(in.ring)
	}
	in.seen[id] = struct{}{}
	return true
}

// syncState makes the shown ids recorded so far durable, when
// Options.State has a Sync method: before acks go, and before a pull
// acknowledges the page shown. A failure is logged and the acks go anyway:
// the records survive a kill of the process already, and holding the acks
// back would not make them durable.
func (in *inbox) syncState() {
	s, ok := in.c.opts.State.(interface{ Sync() error })
	if !ok {
		return
	}
	if err := s.Sync(); err != nil {
		in.c.log.Warn("sdk: could not sync the state", "err", err)
	}
}

// finish stops the delivery of messages and sends the acks of those
// shown, waiting for a connection until ctx ends: Close and Logout call it
// so the next client of the terminal does not get them again.
func (in *inbox) finish(ctx context.Context) {
	in.stepMu.Lock()
	in.closing = true
	busy := in.busy
	in.stepMu.Unlock()
	// A callback still running when Close is called has not shown its
	// message yet, but the one that has just returned has: wait for the
	// loop to queue its ack. Not when the callback is the caller.
	if busy != nil && goid() != in.loopGoid.Load() {
		select {
		case <-busy:
		case <-ctx.Done():
		}
	}
	select {
	case in.flushMu <- struct{}{}: // an ack flush in flight is done
		defer func() { <-in.flushMu }()
	case <-ctx.Done():
	}
	in.ackMu.Lock()
	ids := append(append([]uint64(nil), in.pending...), in.pulled...)
	pushes := in.pendingS2C
	in.pending, in.pulled, in.pendingS2C = nil, nil, nil
	for g, seq := range in.gpulled {
		in.gpending[g] = max(in.gpending[g], seq)
		delete(in.gpulled, g)
	}
	cursors := in.takeCursors()
	in.ackMu.Unlock()
	in.syncState()
	if len(ids) == 0 && len(pushes) == 0 && len(cursors) == 0 {
		return
	}
	c := in.c
	l, err := c.current(ctx)
	if err != nil {
		c.log.Info("sdk: acks not sent before closing", "n", len(ids), "err", err)
		return
	}
	if len(pushes) > 0 {
		_ = l.send(schema.Header{Cmd: schema.CmdS2CAck}, &pb.S2CAck{PushIds: pushes})
	}
	if left := in.sendCursors(ctx, l, cursors); len(left) > 0 {
		c.log.Info("sdk: group acks not sent before closing", "n", len(left))
	}
	for sent := 0; sent < len(ids); {
		n := min(len(ids)-sent, 500)
		if err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdC2CAck}, &pb.C2CAckRequest{Msgids: ids[sent : sent+n]}, nil); err != nil {
			c.log.Info("sdk: acks not sent before closing", "n", len(ids)-sent, "err", err)
			return
		}
		sent += n
	}
}

// flushAcks sends the pending acks on the current connection. Acks that
// cannot be sent now wait for the next flush (acks are idempotent); if the
// client closes first (Close sends them too, if it can), the messages stay
// in the inbox, come back at the next login, are recognised as duplicates
// (within DedupSize, or through Options.State) and acked then.
//
// Group cursors go out every GroupAckDelay (or at once when many groups
// wait, allCursors): a cursor covers every seq below it, so waiting longer
// costs nothing but a few messages pulled again after a crash, which the
// dedup drops, while each cursor the server moves is a store write per
// member terminal. Push acks go out every PushAckDelay (or when 200 wait):
// they only count statistics. allCursors sends everything now.
func (in *inbox) flushAcks(allCursors bool) {
	in.flushMu <- struct{}{}
	defer func() { <-in.flushMu }()
	in.ackMu.Lock()
	ids := in.pending
	in.pending = nil
	var pushes []uint64
	if allCursors || len(in.pendingS2C) >= 200 || time.Since(in.sAckedAt) >= in.c.opts.PushAckDelay {
		pushes, in.pendingS2C = in.pendingS2C, nil
		if len(pushes) > 0 {
			in.sAckedAt = time.Now()
		}
	}
	var cursors []*pb.GroupCursor
	if allCursors || time.Since(in.gAckedAt) >= in.c.opts.GroupAckDelay {
		if cursors = in.takeCursors(); len(cursors) > 0 {
			in.gAckedAt = time.Now()
		}
	}
	in.ackMu.Unlock()
	in.syncState() // the ids taken were recorded before they were queued
	if len(ids) == 0 && len(pushes) == 0 && len(cursors) == 0 {
		return
	}
	c := in.c
	c.mu.Lock()
	l, up := c.link, c.up
	c.mu.Unlock()
	sent := 0
	select {
	case <-up:
		// Push acks are statistics: one notify, no retry.
		if len(pushes) > 0 {
			_ = l.send(schema.Header{Cmd: schema.CmdS2CAck}, &pb.S2CAck{PushIds: pushes})
		}
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.RequestTimeout)
		cursors = in.sendCursors(ctx, l, cursors)
		cancel()
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
	if sent < len(ids) || len(cursors) > 0 {
		in.ackMu.Lock()
		in.pending = append(ids[sent:], in.pending...)
		in.putCursors(cursors)
		in.ackMu.Unlock()
	}
}

// deliverAndWait queues msgs and waits until OnC2C has returned for each.
func (in *inbox) deliverAndWait(msgs []*pb.C2CMessage) bool {
	b := make(chan struct{})
	in.mu.Lock()
	for _, m := range msgs {
		in.push(qitem{m: m, fromPull: true})
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
	in.syncing = in.c.opts.OnC2C != nil || in.c.opts.OnS2C != nil
	in.gsync = in.c.opts.OnGroup != nil
	in.mu.Unlock()
}

// startSync begins pulling the offline inbox on link l after a login.
func (in *inbox) startSync(l *link) {
	in.mu.Lock()
	gen := in.gen
	in.mu.Unlock()
	if in.c.opts.OnC2C != nil || in.c.opts.OnS2C != nil {
		in.c.wg.Add(1)
		go in.sync(l, gen)
	}
	if in.c.opts.OnGroup != nil {
		in.c.wg.Add(1)
		go in.groupSync(l, gen)
	}
}

func (in *inbox) sync(l *link, gen uint64) {
	c := in.c
	defer c.wg.Done()
	var after uint64
	for {
		// The pull acknowledges what the previous page showed (loop puts
		// into pulled only the items it handed to the app, duplicates
		// included, never those it skipped because the client is closing).
		in.ackMu.Lock()
		ack := in.pulled
		in.pulled = nil
		in.ackMu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.RequestTimeout)
		var resp pb.OfflinePullResponse
		err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdOfflinePull}, &pb.OfflinePullRequest{PageSize: c.opts.PageSize, AfterMsgid: after, AckMsgids: ack}, &resp)
		cancel()
		if err != nil {
			in.ackMu.Lock()
			in.pulled = append(ack, in.pulled...)
			in.ackMu.Unlock()
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
		for _, m := range resp.Messages {
			after = max(after, m.Msgid)
		}
		if !resp.More {
			break
		}
	}
	// The last page is acknowledged with the batched acks.
	in.ackMu.Lock()
	in.pending = append(in.pending, in.pulled...)
	in.pulled = nil
	in.ackMu.Unlock()
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.gen != gen {
		return // a newer login owns the sync now
	}
	if in.again {
		in.again = false
		c.wg.Add(1)
		go in.sync(l, gen)
		return
	}
	slices.SortStableFunc(in.buffered, func(a, b qitem) int {
		switch {
		case a.m.Msgid < b.m.Msgid:
			return -1
		case a.m.Msgid > b.m.Msgid:
			return 1
		}
		return 0
	})
	in.push(in.buffered...)
	in.buffered = nil
	in.syncing = false
}

// SendC2S sends content to the app-servers of msgtype (the platform maps
// (appcode, msgtype) to a Kafka topic) and returns once the bus stored it.
// Failures are retried like SendC2C's, with the same client message id in
// the record headers (imd-client-msg-id): a retry after a lost response can
// store the record twice, and consumers drop the copy by that id.
func (c *Client) SendC2S(ctx context.Context, msgtype uint32, content []byte) (*pb.C2SResponse, error) {
	req := &pb.C2SRequest{Content: content, ClientMsgId: NewClientMsgID()}
	var resp pb.C2SResponse
	if err := c.retry(ctx, func(actx context.Context) error {
		return c.Request(actx, schema.CmdC2S, msgtype, req, &resp)
	}); err != nil {
		return nil, err
	}
	return &resp, nil
}

// goid returns the id of the calling goroutine, read from the header of its
// stack trace ("goroutine 18 [running]:"). Close uses it only to tell
// whether it was called from a callback, which it must not wait for.
func goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	id, _ := strconv.ParseUint(string(b), 10, 64)
	return id
}
