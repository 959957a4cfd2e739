package sdk

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// SendGroup sends content to group groupID and returns once the platform
// has stored it; the response carries the message's seq in the group. It
// retries like SendC2C (same client message id on every try, backoff,
// the send floor), and a status no retry can cure returns at once: 4007
// (the group does not exist or was dissolved) and 4008 (this user is not a
// member) among them. With OnGroup set, the message is delivered to
// OnGroup too, in its place in the group's order: the platform does not
// notify the sending terminal of its own message.
func (c *Client) SendGroup(ctx context.Context, groupID uint64, msgtype uint32, content []byte) (*pb.C2CSendResponse, error) {
	return c.SendGroupWithID(ctx, groupID, msgtype, NewClientMsgID(), content)
}

// SendGroupWithID is SendGroup with a client message id chosen by the app.
func (c *Client) SendGroupWithID(ctx context.Context, groupID uint64, msgtype uint32, clientMsgID string, content []byte) (*pb.C2CSendResponse, error) {
	resp, err := c.send(ctx, &pb.C2CSendRequest{GroupId: groupID, ClientMsgId: clientMsgID, Content: content}, msgtype)
	if err != nil {
		return nil, err
	}
	if c.inbox != nil && c.opts.OnGroup != nil && resp.Seq != 0 {
		c.mu.Lock()
		var from *pb.User
		var appcode uint32
		if c.cred != nil && c.login != nil {
			from, appcode = &pb.User{Account: c.login.Account, Uid: c.cred.UID}, c.cred.AppCode
		}
		c.mu.Unlock()
		if from != nil {
			// The stored message as far as the answer tells it (its logid
			// excepted); a pull that brings it first wins.
			c.inbox.takeGroup([]*pb.C2CMessage{{
				Msgid: resp.Msgid, From: from, FromAppcode: appcode, To: &pb.User{}, Msgtype: msgtype,
				Content: content, SentAtMs: resp.StoredAtMs, ClientMsgId: clientMsgID, GroupId: groupID, Seq: resp.Seq,
			}})
		}
	}
	return resp, nil
}

// ---- receiving group messages ----
//
// Each group has its own position: queued, the last seq handed to the
// delivery loop. A live message whose seq is queued+1 is queued; one at or
// below queued is a copy and dropped; one beyond is held, and the group is
// pulled from queued until the gap is filled (a notify was lost in a
// connection cut). Pulled pages are the store's word: their messages are
// queued from the first seq above queued, whatever it is (a member's first
// page starts at its join). The loop delivers in queue order, so OnGroup
// sees every group in seq order, and records per group the last seq
// delivered, which it acknowledges (group-ack, batched) and keeps in
// Options.State.
//
// After every login live group messages wait in gbuffer while groupSync
// catches every group up from max(this terminal's cursor, queued); then
// they go through the live path, which drops what the pages brought.

// groupState is what the client knows of one group.
type groupState struct {
	queued  uint64           // the last seq queued for delivery
	held    []*pb.C2CMessage // live messages beyond a gap, by seq
	pulling uint64           // login generation of the gap pull in flight; 0 none
}

// GroupStateStore is a StateStore that also keeps, per group, the last
// seq the app was shown (OnGroup), so that a restarted client neither
// shows a group message again nor skips one: its Load returns them in
// SavedState.GroupSeqs. FileStore is one. With a StateStore that is not a
// GroupStateStore, a restarted client starts from the cursors the
// platform holds for the terminal, which lag what was shown by the
// acknowledgements not sent before the process ended.
type GroupStateStore interface {
	StateStore
	// SaveGroupSeq records seq as the last seq of group groupID shown to
	// the app. The client calls it after OnGroup returned and before it
	// queues the acknowledgement, with increasing seqs per group; like
	// SaveShown, once it returns nil the record must survive a kill of the
	// process.
	SaveGroupSeq(groupID, seq uint64) error
}

// rememberGroups sets the positions of the groups from Options.State.
func (in *inbox) rememberGroups(seqs map[uint64]uint64) {
	for g, seq := range seqs {
		in.groups[g] = &groupState{queued: seq}
		in.gdone[g] = seq
	}
}

// group returns the state of group id, creating it. Called under in.mu.
func (in *inbox) group(id uint64) *groupState {
	gs := in.groups[id]
	if gs == nil {
		gs = &groupState{}
		in.groups[id] = gs
	}
	return gs
}

// groupNotified takes a GroupNotify from the connection.
func (in *inbox) groupNotified(body []byte) {
	var n pb.GroupNotify
	if err := proto.Unmarshal(body, &n); err != nil {
		in.c.log.Warn("sdk: bad group notify", "err", err)
		return
	}
	for _, m := range n.Messages {
		if m.GroupId == 0 {
			m.GroupId = n.GroupId
		}
	}
	in.takeGroup(n.Messages)
}

// takeGroup takes live group messages: held back while the groups are
// caught up after a login, else put in their groups' order.
func (in *inbox) takeGroup(msgs []*pb.C2CMessage) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.gsync {
		in.gbuffer = append(in.gbuffer, msgs...)
		return
	}
	in.liveLocked(msgs)
}

func bySeq(a, b *pb.C2CMessage) int {
	switch {
	case a.GroupId != b.GroupId:
		if a.GroupId < b.GroupId {
			return -1
		}
		return 1
	case a.Seq < b.Seq:
		return -1
	case a.Seq > b.Seq:
		return 1
	}
	return 0
}

// liveLocked puts live messages in their groups' order: the next seq is
// queued (with the held ones it lets through), a copy is dropped, a seq
// beyond a gap is held and its group pulled. Called under in.mu.
func (in *inbox) liveLocked(msgs []*pb.C2CMessage) {
	slices.SortStableFunc(msgs, bySeq)
	var gaps []uint64
	for _, m := range msgs {
		if m.GroupId == 0 || m.Seq == 0 {
			in.c.log.Warn("sdk: group message without group or seq", "group", m.GroupId, "seq", m.Seq, "msgid", m.Msgid)
			continue
		}
		gs := in.group(m.GroupId)
		switch {
		case m.Seq <= gs.queued:
			// a copy (a retry, a pull that overtook the notify)
		case m.Seq == gs.queued+1:
			in.queueLocked(gs, m, false)
			in.drainLocked(gs)
		default:
			i, found := slices.BinarySearchFunc(gs.held, m, bySeq)
			if !found {
				gs.held = slices.Insert(gs.held, i, m)
			}
			if len(gaps) == 0 || gaps[len(gaps)-1] != m.GroupId {
				gaps = append(gaps, m.GroupId)
			}
		}
	}
	in.pullGapsLocked(gaps)
}

// pulledLocked queues a message of a pulled page unless it is at or below
// the group's position. Called under in.mu.
func (in *inbox) pulledLocked(gs *groupState, m *pb.C2CMessage, fromPull bool) {
	if m.Seq <= gs.queued {
		return
	}
	in.queueLocked(gs, m, fromPull)
	in.drainLocked(gs)
}

func (in *inbox) queueLocked(gs *groupState, m *pb.C2CMessage, fromPull bool) {
	gs.queued = m.Seq
	in.push(qitem{m: m, group: true, fromPull: fromPull})
}

// drainLocked queues the held messages that follow the position and drops
// those at or below it. Called under in.mu.
func (in *inbox) drainLocked(gs *groupState) {
	for len(gs.held) > 0 {
		h := gs.held[0]
		switch {
		case h.Seq <= gs.queued:
		case h.Seq == gs.queued+1:
			in.queueLocked(gs, h, false)
		default:
			return
		}
		gs.held = gs.held[1:]
	}
}

// pullGapsLocked starts a pull for each group of ids that holds messages
// beyond a gap and has none running. Called under in.mu; nothing is
// pulled while catching up, which pulls every group anyway.
func (in *inbox) pullGapsLocked(ids []uint64) {
	if in.gsync {
		return
	}
	for _, id := range ids {
		if gs := in.groups[id]; len(gs.held) > 0 && gs.pulling != in.gen {
			gs.pulling = in.gen
			in.c.wg.Add(1)
			go in.gapPull(in.gen, id)
		}
	}
}

// gapPullEmpty is how many pulls that bring nothing a gap pull makes
// (with doubling backoff from SendBackoffMin: about 6 s with the
// defaults) before its held messages wait for the group's next notify. In
// a DC that does not order the group the gap may be in the store only
// after replication from the group's home DC, which takes milliseconds
// but can take seconds after a Cassandra node came back.
const gapPullEmpty = 7

// gapPull pulls group id from its position until the messages it holds
// follow on, so they can be delivered. A later login stops it (its
// catch-up pulls the group instead).
func (in *inbox) gapPull(gen, id uint64) {
	c := in.c
	defer c.wg.Done()
	backoff := c.opts.SendBackoffMin
	empty := 0
	done := func() {
		if gs := in.groups[id]; gs.pulling == gen {
			gs.pulling = 0
		}
	}
	for {
		in.mu.Lock()
		gs := in.groups[id]
		if in.gen != gen || len(gs.held) == 0 || empty >= gapPullEmpty {
			// After pages that brought nothing the held messages wait for
			// the next notify of the group or the next login.
			done()
			in.mu.Unlock()
			return
		}
		after := gs.queued
		in.mu.Unlock()
		var resp pb.GroupPullResponse
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.RequestTimeout)
		err := c.Request(ctx, schema.CmdGroupPull, 0, &pb.GroupPullRequest{GroupId: id, AfterSeq: after, PageSize: c.opts.PageSize}, &resp)
		cancel()
		if err != nil && (errors.Is(err, ErrClosed) || !IsRetryable(err)) {
			in.mu.Lock()
			if in.gen == gen && !errors.Is(err, ErrClosed) {
				// The group is gone for this user (4007, 4008): what it
				// holds will never follow on.
				c.log.Info("sdk: group pull refused; dropping the held messages", "group", id, "n", len(in.groups[id].held), "err", err)
				in.groups[id].held = nil
			}
			done()
			in.mu.Unlock()
			return
		}
		if err == nil {
			in.mu.Lock()
			if in.gen != gen {
				done()
				in.mu.Unlock()
				return
			}
			before := gs.queued
			slices.SortStableFunc(resp.Messages, bySeq)
			for _, m := range resp.Messages {
				m.GroupId = id
				in.pulledLocked(gs, m, false)
			}
			progress := gs.queued > before
			in.mu.Unlock()
			if progress {
				empty, backoff = 0, c.opts.SendBackoffMin
				continue
			}
			empty++
		} else {
			c.log.Debug("sdk: group pull failed; retrying", "group", id, "err", err)
		}
		select {
		case <-time.After(backoff):
		case <-c.stop:
			in.mu.Lock()
			done()
			in.mu.Unlock()
			return
		}
		backoff = min(2*backoff, c.opts.SendBackoffMax)
	}
}

// errStop: the link of a catch-up died or the client closed; the next
// login catches up again.
var errStop = errors.New("sdk: catch-up stopped")

// request sends a request of the catch-up on l, retrying statuses and
// timeouts that may pass with backoff. It returns nil, errStop, or the
// error of a refusal no retry can cure.
func (in *inbox) request(l *link, cmd schema.Cmd, req, resp proto.Message) error {
	c := in.c
	backoff := c.opts.SendBackoffMin
	for try := 1; ; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.RequestTimeout)
		err := l.roundTrip(ctx, schema.Header{Cmd: cmd}, req, resp)
		cancel()
		if err == nil {
			return nil
		}
		if l.dead() != nil {
			return errStop
		}
		if !IsRetryable(err) {
			return err
		}
		// A server with no group store answers 5002 for as long as it
		// runs: one warning, then quieter.
		lvl := slog.LevelDebug
		if try == 1 {
			lvl = slog.LevelWarn
		}
		c.log.Log(context.Background(), lvl, "sdk: group catch-up failed; retrying", "cmd", cmd, "try", try, "err", err)
		select {
		case <-time.After(backoff):
		case <-c.stop:
			return errStop
		case <-l.done:
			return errStop
		}
		backoff = min(2*backoff, c.opts.SendBackoffMax)
	}
}

// groupSync catches the user's groups up after the login of generation
// gen on l (group-sync, then group-pull pages of every group behind), then
// lets the live messages held back meanwhile through.
func (in *inbox) groupSync(l *link, gen uint64) {
	c := in.c
	defer c.wg.Done()
	var resp pb.GroupSyncResponse
	switch err := in.request(l, schema.CmdGroupSync, &pb.GroupSyncRequest{}, &resp); {
	case errors.Is(err, errStop):
		return
	case err != nil:
		// A server without groups (or refusing): nothing to catch up;
		// the live messages still go through.
		c.log.Warn("sdk: group sync refused", "err", err)
	}
	for _, st := range resp.Groups {
		if !in.catchUp(l, gen, st) {
			return
		}
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.gen != gen {
		return // a newer login owns the catch-up now
	}
	in.gsync = false
	buf := in.gbuffer
	in.gbuffer = nil
	var gaps []uint64
	for id, gs := range in.groups {
		in.drainLocked(gs) // held across the login
		if len(gs.held) > 0 {
			gaps = append(gaps, id)
		}
	}
	in.pullGapsLocked(gaps)
	in.liveLocked(buf)
}

// catchUp pulls group st from max(this terminal's cursor, the client's
// position) to its head, waiting for each page to be delivered before the
// next pull acknowledges it; the batched acks take the last page. It
// reports false when the catch-up has to stop.
func (in *inbox) catchUp(l *link, gen uint64, st *pb.GroupState) bool {
	c := in.c
	id := st.GroupId
	in.mu.Lock()
	if in.gen != gen {
		in.mu.Unlock()
		return false
	}
	gs := in.group(id)
	if st.AckedSeq > gs.queued {
		// Acknowledged by this terminal before (by an earlier client
		// whose state is lost, say): not shown again.
		gs.queued = st.AckedSeq
		in.drainLocked(gs)
	}
	after := gs.queued
	in.mu.Unlock()
	in.ackMu.Lock()
	if d := in.gdone[id]; d > st.AckedSeq && d <= st.HeadSeq {
		// Shown, but the ack was lost (a cut, a kill before Close).
		in.gpending[id] = max(in.gpending[id], d)
	}
	in.ackMu.Unlock()
	if st.HeadSeq <= after {
		return true
	}
	var ack uint64
	putBack := func() {
		if ack > 0 {
			in.ackMu.Lock()
			in.gpending[id] = max(in.gpending[id], ack)
			in.ackMu.Unlock()
		}
	}
	for {
		var resp pb.GroupPullResponse
		err := in.request(l, schema.CmdGroupPull, &pb.GroupPullRequest{GroupId: id, AfterSeq: after, PageSize: c.opts.PageSize, AckSeq: ack}, &resp)
		if errors.Is(err, errStop) {
			putBack()
			return false
		}
		if err != nil {
			// 4007 or 4008: the group went away since the sync.
			c.log.Info("sdk: group pull refused", "group", id, "err", err)
			putBack()
			return true
		}
		ack = 0
		b := make(chan struct{})
		in.mu.Lock()
		if in.gen != gen {
			in.mu.Unlock()
			return false
		}
		slices.SortStableFunc(resp.Messages, bySeq)
		for _, m := range resp.Messages {
			m.GroupId = id
			in.pulledLocked(gs, m, true)
			after = max(after, m.Seq)
		}
		in.push(qitem{barrier: b})
		in.mu.Unlock()
		select {
		case <-b:
		case <-c.stop:
			return false
		}
		in.ackMu.Lock()
		ack = in.gpulled[id]
		delete(in.gpulled, id)
		in.ackMu.Unlock()
		if !resp.More || len(resp.Messages) == 0 {
			break
		}
	}
	putBack() // the last page goes with the batched acks
	return true
}

// deliverGroup hands a group message to OnGroup on the loop goroutine,
// records it in Options.State and queues its cursor. It reports whether
// enough cursors wait to flush them now.
func (in *inbox) deliverGroup(it qitem) bool {
	m := it.m
	in.stepMu.Lock()
	if in.closing {
		in.stepMu.Unlock()
		return false // Close or Logout: nothing more is shown or acknowledged
	}
	in.ackMu.Lock()
	dup := m.Seq <= in.gdone[m.GroupId]
	in.ackMu.Unlock()
	if dup {
		in.stepMu.Unlock()
		return false
	}
	busy := make(chan struct{})
	in.busy = busy
	in.stepMu.Unlock()
	in.c.opts.OnGroup(m)
	in.stepMu.Lock()
	if gs, ok := in.c.opts.State.(GroupStateStore); ok {
		if err := gs.SaveGroupSeq(m.GroupId, m.Seq); err != nil {
			in.c.log.Warn("sdk: could not record a shown group message", "group", m.GroupId, "seq", m.Seq, "err", err)
		}
	}
	in.ackMu.Lock()
	in.gdone[m.GroupId] = m.Seq
	if it.fromPull {
		in.gpulled[m.GroupId] = m.Seq
	} else {
		in.gpending[m.GroupId] = max(in.gpending[m.GroupId], m.Seq)
	}
	n := len(in.gpending)
	in.ackMu.Unlock()
	in.busy = nil
	close(busy)
	closing := in.closing
	in.stepMu.Unlock()
	if closing {
		in.syncState() // Close from the callback: the record must hold
		return false
	}
	return n >= 200
}

// takeCursors empties the pending group cursors. Called under ackMu.
func (in *inbox) takeCursors() []*pb.GroupCursor {
	if len(in.gpending) == 0 {
		return nil
	}
	out := make([]*pb.GroupCursor, 0, len(in.gpending))
	for g, seq := range in.gpending {
		out = append(out, &pb.GroupCursor{GroupId: g, Seq: seq})
		delete(in.gpending, g)
	}
	return out
}

// putCursors gives back cursors that could not be sent. Called under ackMu.
func (in *inbox) putCursors(cs []*pb.GroupCursor) {
	for _, cur := range cs {
		in.gpending[cur.GroupId] = max(in.gpending[cur.GroupId], cur.Seq)
	}
}

// maxCursors bounds the cursors of one group-ack request.
const maxCursors = 100

// sendCursors acknowledges cursors on l and returns those to try again
// later. A cursor the server refuses for good (the group went away, 4007
// or 4008) is dropped; when a request of many is refused, they go again
// one by one so that one such group does not hold the others back.
func (in *inbox) sendCursors(ctx context.Context, l *link, cs []*pb.GroupCursor) []*pb.GroupCursor {
	var left []*pb.GroupCursor
	for len(cs) > 0 {
		n := min(len(cs), maxCursors)
		batch := cs[:n]
		cs = cs[n:]
		err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdGroupAck}, &pb.GroupAckRequest{Cursors: batch}, nil)
		switch {
		case err == nil:
		case IsRetryable(err) || ctx.Err() != nil:
			in.c.log.Debug("sdk: group ack failed; will retry", "n", len(batch), "err", err)
			left = append(left, batch...)
		case len(batch) > 1:
			for _, cur := range batch {
				left = append(left, in.sendCursors(ctx, l, []*pb.GroupCursor{cur})...)
			}
		default:
			in.c.log.Info("sdk: group ack refused; dropped", "group", batch[0].GroupId, "seq", batch[0].Seq, "err", err)
		}
	}
	return left
}
