package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/schema"
	"google.golang.org/protobuf/encoding/protowire"
)

// The lean client receives fan-outs (s2c pushes, group messages) on many
// logged-in connections for little CPU, so that a benchmark measures the
// server rather than its own clients. Each connection logs in like the
// raw client of the conns scenario; then a few loops (epoll on Linux, a
// goroutine per connection elsewhere) read whatever arrived, decode of
// each notify only what counting needs (the push id, or a group message's
// seq and whether it is an event, and the content, where imbench put its
// timestamps), and acknowledge in batches as the SDK does: an s2c-ack
// carrying every push id that came in the last PushAckDelay (or at each
// read when it is 0), and a group cursor at most every GroupAckDelay, with
// the highest seq seen.
// It never pulls, syncs or keeps state beyond that.

// LeanOptions configure a LeanFleet.
type LeanOptions struct {
	// Addrs are the gateways; connection i dials Addrs[i % len(Addrs)].
	Addrs   []string
	AppCode uint32
	Secret  string   // mints the login tokens
	UIDs    []uint64 // connection i logs in as UIDs[i]
	// LoginConc is the logins in flight while connecting (default 100).
	LoginConc    int
	DialTimeout  time.Duration // default 10 s
	LoginTimeout time.Duration // default 10 s
	// SrcIPs > 0 binds connection i to 127.0.0.(1 + i%SrcIPs).
	SrcIPs int
	// Loops is how many goroutines read the connections (default: the
	// usable CPUs, at most 4). Elsewhere than on Linux each connection has
	// its own goroutine.
	Loops int
	// OnS2C gets every s2c notify: the connection's index, the reading
	// loop's number (for sharding), the push id and the content, which is
	// valid during the call only.
	OnS2C func(conn, loop int, pushID uint64, content []byte)
	// OnGroup gets every group message the same way, with its group, seq,
	// and whether it is a system message (an event).
	OnGroup func(conn, loop int, groupID, seq uint64, content []byte, event bool)
	// GroupAckDelay is how long a group cursor waits to be acknowledged
	// (0: at the read that moved it). The SDK's default is 250 ms.
	GroupAckDelay time.Duration
	// PushAckDelay is how long push ids wait to be acknowledged in one
	// s2c-ack (0: at the read that brought them). The SDK's default is
	// 250 ms.
	PushAckDelay time.Duration
	// NoAcks leaves s2c pushes unacknowledged (a client that never acks:
	// what acks cost the server is the difference).
	NoAcks bool
	// Log gets login progress lines; nil discards them.
	Log io.Writer
}

// LeanStats count what a LeanFleet read and wrote.
type LeanStats struct {
	Conns      int    `json:"connections"`
	Loops      int    `json:"read_loops"`       // goroutines reading (epoll loops, or one per connection)
	Reads      int64  `json:"reads"`            // reads that returned data
	Frames     int64  `json:"frames"`           // frames read
	Notifies   int64  `json:"notifies"`         // s2c and group notifies
	Messages   int64  `json:"messages"`         // pushes and group messages in them
	AckFrames  int64  `json:"ack_frames"`       // s2c-ack frames written
	AckedIDs   int64  `json:"acked_push_ids"`   // push ids in them
	GroupAcks  int64  `json:"group_ack_frames"` // group-ack requests written
	Keepalives int64  `json:"keepalives"`       // keepalive requests written
	WriteWaits int64  `json:"write_waits"`      // writes the socket could not take at once
	ErrorResps int64  `json:"error_responses"`  // responses with a non-zero status
	Kickouts   int64  `json:"kickouts_goaways"` // kickout or goaway notifies
	Dropped    int64  `json:"dropped"`          // connections closed by the server or an error
	BadFrames  int64  `json:"undecodable_frames"`
	LastError  string `json:"last_error,omitempty"`
}

// FramesPerRead is how many frames one read brought on average: above 1
// when the server coalesced several into one write (or the client fell
// behind).
func (s LeanStats) FramesPerRead() float64 {
	if s.Reads == 0 {
		return 0
	}
	return float64(s.Frames) / float64(s.Reads)
}

// leanCounters are the atomic form of LeanStats, one set per fleet.
type leanCounters struct {
	reads, frames, notifies, messages       atomic.Int64
	ackFrames, ackedIDs, groupAcks, kas     atomic.Int64
	writeWaits, errorResps, kickouts, drops atomic.Int64
	badFrames                               atomic.Int64
	mu                                      sync.Mutex
	lastErr                                 string
}

func (c *leanCounters) setErr(msg string) {
	c.mu.Lock()
	c.lastErr = msg
	c.mu.Unlock()
}

// leanConn is one logged-in connection of a LeanFleet. Once logged in it
// belongs to one reading loop, which alone touches its buffers.
type leanConn struct {
	idx  int
	seq  uint32   // last request seq used
	in   []byte   // bytes of an incomplete frame, carried to the next read
	out  []byte   // bytes the socket did not take yet
	conn leanSock // the OS-specific socket

	gid         uint64 // the group whose cursor is tracked (one group per run)
	maxSeq      uint64 // highest group seq seen
	ackedSeq    uint64 // highest group seq acknowledged
	lastGroupAk time.Time
	pushAcks    []uint64 // push ids waiting for PushAckDelay
	lastPushAk  time.Time
	ackPending  bool // on its loop's pending list
	dead        bool
}

// leanLoop is the per-loop scratch space: one read buffer and one write
// buffer shared by its connections.
type leanLoop struct {
	n       int
	f       *LeanFleet
	buf     []byte
	wbuf    []byte
	pending []*leanConn // connections with a group cursor or push ids to acknowledge later
	blocked []*leanConn // connections with bytes the socket did not take
}

// handle digests the bytes one read brought to c, then writes the acks
// they call for.
func (lp *leanLoop) handle(c *leanConn, data []byte, now time.Time) {
	st := &lp.f.stats
	st.reads.Add(1)
	if len(c.in) > 0 {
		c.in = append(c.in, data...)
		data = c.in
	}
	off := 0
	for len(data)-off >= schema.HeaderLen {
		h, err := schema.ParseHeader(data[off:], 1<<24)
		if err != nil {
			lp.fail(c, fmt.Errorf("bad frame from the server: %w", err))
			return
		}
		end := off + schema.HeaderLen + int(h.BodyLen)
		if end > len(data) {
			break
		}
		lp.frame(c, &h, data[off+schema.HeaderLen:end])
		off = end
	}
	rest := data[off:]
	switch {
	case len(rest) == 0:
		c.in = c.in[:0]
		if cap(c.in) > 64<<10 {
			c.in = nil // do not keep a big frame's buffer on an idle connection
		}
	case len(c.in) > 0:
		c.in = c.in[:copy(c.in, rest)]
	default:
		c.in = append(c.in[:0], rest...)
	}
	later := false
	if len(c.pushAcks) > 0 {
		if d := lp.f.o.PushAckDelay; d <= 0 || len(c.pushAcks) >= 200 || now.Sub(c.lastPushAk) >= d || lp.f.ackNow.Load() {
			lp.writeS2CAck(c, now)
		} else {
			later = true
		}
	}
	if c.maxSeq > c.ackedSeq {
		if lp.f.o.GroupAckDelay <= 0 || now.Sub(c.lastGroupAk) >= lp.f.o.GroupAckDelay {
			lp.writeGroupAck(c, now)
		} else {
			later = true
		}
	}
	if later && !c.ackPending {
		c.ackPending = true
		lp.pending = append(lp.pending, c)
	}
}

// tick acknowledges the group cursors and push ids whose delay has passed
// and retries unsent bytes.
func (lp *leanLoop) tick(now time.Time) {
	if len(lp.blocked) > 0 {
		still := lp.blocked[:0]
		for _, c := range lp.blocked {
			lp.flush(c)
			if len(c.out) > 0 && !c.dead {
				still = append(still, c)
			}
		}
		clear(lp.blocked[len(still):])
		lp.blocked = still
	}
	force := lp.f.ackNow.Load()
	keep := lp.pending[:0]
	for _, c := range lp.pending {
		if c.dead {
			c.ackPending = false
			continue
		}
		if c.maxSeq > c.ackedSeq && (force || now.Sub(c.lastGroupAk) >= lp.f.o.GroupAckDelay) {
			lp.writeGroupAck(c, now)
		}
		if len(c.pushAcks) > 0 && (force || now.Sub(c.lastPushAk) >= lp.f.o.PushAckDelay) {
			lp.writeS2CAck(c, now)
		}
		if c.maxSeq > c.ackedSeq || len(c.pushAcks) > 0 {
			keep = append(keep, c)
			continue
		}
		c.ackPending = false
	}
	clear(lp.pending[len(keep):])
	lp.pending = keep
}

func (lp *leanLoop) frame(c *leanConn, h *schema.Header, body []byte) {
	st := &lp.f.stats
	st.frames.Add(1)
	if h.Flags&schema.FlagCompressed != 0 {
		st.badFrames.Add(1) // never negotiated
		return
	}
	switch h.Kind() {
	case schema.KindResponse:
		if h.Status != schema.StatusOK {
			st.errorResps.Add(1)
			lp.f.stats.setErr(fmt.Sprintf("%s response: status %d", h.Cmd, h.Status))
		}
		return
	case schema.KindNotify:
	default:
		return
	}
	switch h.Cmd {
	case schema.CmdS2C:
		st.notifies.Add(1)
		id, content, needAck, ok := parseS2CNotify(body)
		if !ok {
			st.badFrames.Add(1)
			return
		}
		st.messages.Add(1)
		if lp.f.o.OnS2C != nil {
			lp.f.o.OnS2C(c.idx, lp.n, id, content)
		}
		if needAck && !lp.f.o.NoAcks {
			c.pushAcks = append(c.pushAcks, id)
		}
	case schema.CmdGroupNotify:
		st.notifies.Add(1)
		ok := parseGroupNotify(body, func(gid, seq uint64, content []byte, event bool) {
			st.messages.Add(1)
			if c.gid == 0 || c.gid == gid {
				c.gid = gid
				c.maxSeq = max(c.maxSeq, seq)
			}
			if lp.f.o.OnGroup != nil {
				lp.f.o.OnGroup(c.idx, lp.n, gid, seq, content, event)
			}
		})
		if !ok {
			st.badFrames.Add(1)
		}
	case schema.CmdKickout, schema.CmdGoAway:
		st.kickouts.Add(1)
		lp.f.stats.setErr("the server sent " + h.Cmd.String())
	}
}

// writeS2CAck acknowledges every push id c holds in one frame.
func (lp *leanLoop) writeS2CAck(c *leanConn, now time.Time) {
	size := 0
	for _, id := range c.pushAcks {
		size += protowire.SizeVarint(id)
	}
	b := lp.frameStart(schema.CmdS2CAck, schema.KindNotify, 0)
	b = protowire.AppendTag(b, 1, protowire.BytesType) // S2CAck.push_ids, packed
	b = protowire.AppendVarint(b, uint64(size))
	for _, id := range c.pushAcks {
		b = protowire.AppendVarint(b, id)
	}
	lp.f.stats.ackFrames.Add(1)
	lp.f.stats.ackedIDs.Add(int64(len(c.pushAcks)))
	c.pushAcks = c.pushAcks[:0]
	if cap(c.pushAcks) > 256 {
		c.pushAcks = nil
	}
	c.lastPushAk = now
	lp.send(c, b)
}

// writeGroupAck moves c's cursor to the highest seq it saw.
func (lp *leanLoop) writeGroupAck(c *leanConn, now time.Time) {
	var cur []byte
	cur = protowire.AppendTag(cur, 1, protowire.VarintType)
	cur = protowire.AppendVarint(cur, c.gid)
	cur = protowire.AppendTag(cur, 2, protowire.VarintType)
	cur = protowire.AppendVarint(cur, c.maxSeq)
	c.seq++
	b := lp.frameStart(schema.CmdGroupAck, schema.KindRequest, c.seq)
	b = protowire.AppendTag(b, 1, protowire.BytesType) // GroupAckRequest.cursors
	b = protowire.AppendBytes(b, cur)
	c.ackedSeq, c.lastGroupAk = c.maxSeq, now
	lp.f.stats.groupAcks.Add(1)
	lp.send(c, b)
}

// writeKeepalive sends a keepalive request (an empty body).
func (lp *leanLoop) writeKeepalive(c *leanConn) {
	c.seq++
	lp.f.stats.kas.Add(1)
	lp.send(c, lp.frameStart(schema.CmdKeepalive, schema.KindRequest, c.seq))
}

// frameStart starts a frame in the loop's write buffer; send fills in the
// body length.
func (lp *leanLoop) frameStart(cmd schema.Cmd, kind schema.Kind, seq uint32) []byte {
	h := schema.Header{Cmd: cmd, Seq: seq}
	h.SetKind(kind)
	b := lp.wbuf[:schema.HeaderLen]
	h.Put(b)
	return b
}

// send writes frame b (header and body) to c, keeping what the socket does
// not take for later.
func (lp *leanLoop) send(c *leanConn, b []byte) {
	putBodyLen(b)
	lp.wbuf = b[:0] // keep a grown buffer
	if c.dead {
		return
	}
	if len(c.out) > 0 {
		c.out = append(c.out, b...) // on the blocked list already
		lp.flush(c)
		return
	}
	n, err := c.conn.write(b)
	if err != nil {
		lp.fail(c, err)
		return
	}
	if n < len(b) {
		lp.f.stats.writeWaits.Add(1)
		c.out = append(c.out, b[n:]...)
		lp.blocked = append(lp.blocked, c)
	}
}

// flush retries c's unsent bytes.
func (lp *leanLoop) flush(c *leanConn) {
	if len(c.out) == 0 || c.dead {
		return
	}
	n, err := c.conn.write(c.out)
	if err != nil {
		lp.fail(c, err)
		return
	}
	c.out = c.out[:copy(c.out, c.out[n:])]
	if len(c.out) == 0 && cap(c.out) > 64<<10 {
		c.out = nil
	}
}

func (lp *leanLoop) fail(c *leanConn, err error) {
	if c.dead {
		return
	}
	c.dead = true
	if !lp.f.closing.Load() {
		lp.f.stats.drops.Add(1)
		lp.f.stats.setErr(err.Error())
	}
	c.conn.close()
}

func putBodyLen(b []byte) {
	n := uint32(len(b) - schema.HeaderLen)
	b[36], b[37], b[38], b[39] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
}

// parseS2CNotify reads push_id (1), content (3) and need_ack (5) of an
// S2CNotify body and skips the rest.
func parseS2CNotify(b []byte) (pushID uint64, content []byte, needAck, ok bool) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, nil, false, false
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			pushID, n = protowire.ConsumeVarint(b)
		case num == 3 && typ == protowire.BytesType:
			content, n = protowire.ConsumeBytes(b)
		case num == 5 && typ == protowire.VarintType:
			var v uint64
			v, n = protowire.ConsumeVarint(b)
			needAck = v != 0
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return 0, nil, false, false
		}
		b = b[n:]
	}
	return pushID, content, needAck, true
}

// parseGroupNotify calls each for every message (field 2) of a
// GroupNotify body with its group (field 1), seq (11), content (6) and
// whether it has an event (12).
func parseGroupNotify(b []byte, each func(gid, seq uint64, content []byte, event bool)) bool {
	var gid uint64
	var msgs [][]byte
	var one [8][]byte
	msgs = one[:0]
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			gid, n = protowire.ConsumeVarint(b)
		case num == 2 && typ == protowire.BytesType:
			var m []byte
			m, n = protowire.ConsumeBytes(b)
			msgs = append(msgs, m)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return false
		}
		b = b[n:]
	}
	for _, m := range msgs {
		var seq, mgid uint64
		var content []byte
		event := false
		for len(m) > 0 {
			num, typ, n := protowire.ConsumeTag(m)
			if n < 0 {
				return false
			}
			m = m[n:]
			switch {
			case num == 6 && typ == protowire.BytesType:
				content, n = protowire.ConsumeBytes(m)
			case num == 9 && typ == protowire.VarintType:
				mgid, n = protowire.ConsumeVarint(m)
			case num == 11 && typ == protowire.VarintType:
				seq, n = protowire.ConsumeVarint(m)
			case num == 12:
				event = true
				n = protowire.ConsumeFieldValue(num, typ, m)
			default:
				n = protowire.ConsumeFieldValue(num, typ, m)
			}
			if n < 0 {
				return false
			}
			m = m[n:]
		}
		if mgid == 0 {
			mgid = gid
		}
		each(mgid, seq, content, event)
	}
	return true
}

// LeanFleet is a set of lean client connections.
type LeanFleet struct {
	o       LeanOptions
	conns   []atomic.Pointer[leanConn]
	stats   leanCounters
	closing atomic.Bool
	ackNow  atomic.Bool  // FlushAcks: acknowledge without waiting any more
	kaIv    atomic.Int64 // keepalive interval the server advertised, ns
	loops   int
	engine  leanEngine
	once    sync.Once
}

// DialLean logs in one lean connection per uid and starts reading them. It
// fails (closing what it opened) if any login fails.
func DialLean(ctx context.Context, o LeanOptions) (*LeanFleet, error) {
	if len(o.Addrs) == 0 || len(o.UIDs) == 0 {
		return nil, errors.New("lean client: no gateway or no uids")
	}
	if o.LoginConc <= 0 {
		o.LoginConc = 100
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.LoginTimeout <= 0 {
		o.LoginTimeout = 10 * time.Second
	}
	if o.Loops <= 0 {
		o.Loops = min(4, runtime.GOMAXPROCS(0))
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	f := &LeanFleet{o: o, conns: make([]atomic.Pointer[leanConn], len(o.UIDs))}
	eng, err := leanEngineFor(f, o.Loops)
	if err != nil {
		return nil, err
	}
	f.engine, f.loops = eng, eng.loops()

	err = loginEach(ctx, len(o.UIDs), o.LoginConc, o.Log, "lean clients", func(ctx context.Context, i int) error {
		if err := f.open(ctx, i); err != nil {
			return fmt.Errorf("lean client: log in uid %d: %w", o.UIDs[i], err)
		}
		return nil
	})
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// open dials and logs in connection i and hands it to a loop.
func (f *LeanFleet) open(ctx context.Context, i int) error {
	uid := f.o.UIDs[i]
	d := &net.Dialer{Timeout: f.o.DialTimeout}
	if f.o.SrcIPs > 0 {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%f.o.SrcIPs))}
		d.Control = bindNoPort
	}
	nc, err := d.DialContext(ctx, "tcp", f.o.Addrs[i%len(f.o.Addrs)])
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	rc := &rawConn{nc: nc}
	tok := MintToken(f.o.Secret, f.o.AppCode, uid, time.Now().Add(24*time.Hour))
	resp, err := rc.login(ctx, f.o.LoginTimeout, f.o.AppCode, uid, tok)
	if err != nil {
		_ = nc.Close()
		return err
	}
	if iv := int64(resp.KeepaliveMs) * int64(time.Millisecond); iv > 0 {
		f.kaIv.CompareAndSwap(0, iv)
	}
	c := &leanConn{idx: i, seq: rc.seq}
	if err := f.engine.add(c, nc); err != nil {
		_ = nc.Close()
		return err
	}
	return nil
}

// keepalive is the interval of the keepalive requests.
func (f *LeanFleet) keepalive() time.Duration {
	if iv := time.Duration(f.kaIv.Load()); iv > 0 {
		return iv
	}
	return 30 * time.Second
}

// Len is the number of connections.
func (f *LeanFleet) Len() int { return len(f.conns) }

// Stats returns the counters so far.
func (f *LeanFleet) Stats() LeanStats {
	s := &f.stats
	s.mu.Lock()
	last := s.lastErr
	s.mu.Unlock()
	return LeanStats{Conns: len(f.conns), Loops: f.loops, Reads: s.reads.Load(), Frames: s.frames.Load(), Notifies: s.notifies.Load(),
		Messages: s.messages.Load(), AckFrames: s.ackFrames.Load(), AckedIDs: s.ackedIDs.Load(), GroupAcks: s.groupAcks.Load(),
		Keepalives: s.kas.Load(), WriteWaits: s.writeWaits.Load(), ErrorResps: s.errorResps.Load(), Kickouts: s.kickouts.Load(),
		Dropped: s.drops.Load(), BadFrames: s.badFrames.Load(), LastError: last}
}

// FlushAcks makes the loops acknowledge what waits for PushAckDelay or
// GroupAckDelay at their next tick, and from then on at each read, and
// gives them the time for a tick (a run's end: the statistics count every
// ack).
func (f *LeanFleet) FlushAcks() {
	f.ackNow.Store(true)
	time.Sleep(100 * time.Millisecond) // ticks are 10-30 ms apart
}

// Close closes every connection and stops the loops.
func (f *LeanFleet) Close() error {
	f.once.Do(func() {
		f.closing.Store(true)
		if f.engine != nil {
			f.engine.close()
		}
	})
	return nil
}

// leanEngineFor makes a fleet's engine (tests try the portable one too).
var leanEngineFor = newLeanEngine

// leanEngine reads the connections of a fleet.
type leanEngine interface {
	// add takes over logged-in connection c (its net.Conn is nc).
	add(c *leanConn, nc net.Conn) error
	loops() int
	close()
}

// leanSock is a connection's socket as a loop uses it.
type leanSock interface {
	// write writes what the socket takes now, without blocking.
	write(b []byte) (int, error)
	close()
}
