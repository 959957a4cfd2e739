package logic

// msgids (and s2c push ids, and c2s record ids) are snowflake ids, minted
// here: 41 bits of milliseconds since das.SnowflakeEpoch, 10 bits of node
// id, 12 bits of sequence (das/msgid.go decodes them). A msgid is a
// Cassandra clustering key, so two equal ids silently overwrite a message:
// the generator below never issues an id twice on one node, and the node
// id keeps nodes apart.
//
// What holds, and what happens when things go wrong:
//
//   - Node ids. Without Redis there is one logic node (`imd all`, or one
//     `imd logic` whose gateways dial it by address): its --node-id (0 by
//     default) is unique by construction. With Redis every logic node
//     leases its id there (router.Redis.AcquireNodeID): a static --node-id
//     is taken only when no live node holds it (a holder that renews while
//     we wait is alive: start is refused); without one the node takes a
//     free id 1023, 1022, ... 0. The lease is renewed with each membership
//     heartbeat and released on a clean shutdown.
//
//   - Redis lost, or a lease that lapses. A lease renewed at local time t
//     is good until t + TTL on this node's monotonic clock, which ends no
//     later than the key's TTL in Redis. Past that the generator refuses
//     (callers answer StatusUnavailable) until a heartbeat holds a lease
//     again: an id whose holder may still be alive is never reused. A node
//     whose id was taken by another meanwhile leases another id.
//
//   - Clock steps. The generator never issues an id <= its previous one:
//     when the clock is behind the last id's time it keeps that time and
//     bumps the sequence, and a full sequence advances the logical
//     millisecond. Across a restart (or a hand-over of the id to another
//     node) the lease carries a ceiling in Redis: each renewal writes
//     max(clock, last) + TTL + max clock skew, the generator never goes
//     beyond the ceiling it wrote, and whoever takes the id next starts
//     above it. A clean release writes the exact last time instead, so a
//     restart after a crash starts up to TTL + skew ahead of the clock,
//     one after a clean stop does not. Without Redis nothing is kept: a
//     single node restarted with its clock set back by more than its
//     downtime could repeat ids of before the restart; run NTP (slewing,
//     not stepping) there, or run with Redis.
//
//   - Per-sender order (client floors). A c2c send carries the highest
//     msgid its terminal was answered; the id minted is above it (a hybrid
//     logical clock), so one sender's messages sort in send order across
//     nodes whose clocks differ. A floor more than the max clock skew
//     ahead of this node's clock is clamped (logged and counted), so a
//     client cannot push a node's ids into the far future.

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema"
	"github.com/prometheus/client_golang/prometheus"
)

const (
	idNodeBits  = 10
	idSeqBits   = 12
	idTimeShift = idNodeBits + idSeqBits // das: snowflakeTimeShift
	// MaxNodeID is the largest snowflake node id.
	MaxNodeID = 1<<idNodeBits - 1
	idMaxSeq  = 1<<idSeqBits - 1
	idMaxMS   = 1<<41 - 1
)

var (
	errNoNodeID  = errors.New("this logic node holds no node id lease")
	errLeaseOver = errors.New("this logic node's node id lease lapsed (membership unreachable)")
	errCeiling   = errors.New("msgid time is beyond this node's reserved ceiling")
)

// idGen mints snowflake ids that rise strictly on one node.
type idGen struct {
	clock   func() time.Time // wall clock of the ids; injectable
	maxSkew int64            // ms a floor may be ahead of the clock
	events  *prometheus.CounterVec

	mu    sync.Mutex
	node  int64 // -1: none held
	ms    int64 // logical ms (since the epoch) of the last id
	seq   int64 // sequence of the last id
	limit int64 // the largest ms that may be used; 0: no bound
	// until ends a lease, on the monotonic clock; zero: no lease (a
	// static node id without Redis).
	until time.Time
}

// newIDGen returns the generator of opts (NodeID, Clock, MaxClockSkew) and
// registers its metric.
func newIDGen(opts Options) (*idGen, error) {
	if opts.NodeID < -1 || opts.NodeID > MaxNodeID {
		return nil, fmt.Errorf("node id %d is outside 0-%d", opts.NodeID, MaxNodeID)
	}
	g := &idGen{clock: opts.Clock, maxSkew: opts.MaxClockSkew.Milliseconds(), node: opts.NodeID, seq: idMaxSeq}
	if g.clock == nil {
		g.clock = time.Now
	}
	if g.maxSkew <= 0 {
		g.maxSkew = time.Minute.Milliseconds()
	}
	g.events = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "imd", Subsystem: "logic", Name: "msgid_events_total",
		Help: "msgid generator events: floor_clamped (a sender's order floor beyond max_clock_skew ahead of this node's clock), refused (no valid node id lease, or the lease's ceiling reached).",
	}, []string{"event"})
	if opts.Registry != nil {
		if err := opts.Registry.Register(g.events); err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
	}
	return g, nil
}

func (g *idGen) nowMS() int64 { return g.clock().UnixMilli() - das.SnowflakeEpoch }

// next returns an id greater than every id issued before and greater than
// floor (0: none). A floor more than maxSkew ahead of the clock is
// clamped to it, and clamped reports it.
func (g *idGen) next(floor uint64) (id uint64, clamped bool, err error) {
	now := g.nowMS()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.node < 0 {
		return 0, false, errNoNodeID
	}
	if !g.until.IsZero() && !time.Now().Before(g.until) {
		return 0, false, errLeaseOver
	}
	// this clock's next: the clock's ms, or the last ms bumped
	ms, seq := now, int64(0)
	if ms <= g.ms {
		ms, seq = g.ms, g.seq+1
	}
	if floor != 0 {
		fms := int64(floor >> idTimeShift)
		if max := now + g.maxSkew; fms > max {
			fms, floor, clamped = max, uint64(max)<<idTimeShift, true
		}
		// the smallest id of this node above floor
		fnode, fseq := int64(floor>>idSeqBits)&MaxNodeID, int64(floor)&idMaxSeq
		tms, tseq := fms, int64(0)
		switch {
		case g.node == fnode:
			tseq = fseq + 1
		case g.node < fnode:
			tms++
		}
		if tms > ms || tms == ms && tseq > seq {
			ms, seq = tms, tseq
		}
	}
	if seq > idMaxSeq {
		ms, seq = ms+1, 0
	}
	if g.limit > 0 && ms > g.limit || ms > idMaxMS {
		return 0, clamped, errCeiling
	}
	g.ms, g.seq = ms, seq
	return uint64(ms)<<idTimeShift | uint64(g.node)<<idSeqBits | uint64(seq), clamped, nil
}

// hold lets the generator mint with node up to ceiling ms (0: no bound)
// until the monotonic deadline until (zero: no deadline), above every id
// of before and above after ms: the ceiling of the lease's previous
// holder, or -1 when the lease is this node's own, renewed.
func (g *idGen) hold(node, after, ceiling int64, until time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.node = node
	if after >= g.ms {
		g.ms, g.seq = after, idMaxSeq
	}
	g.limit, g.until = ceiling, until
}

// ceiling returns the ms up to which this node may mint for the next d:
// max(clock, last) + d + max skew.
func (g *idGen) ceiling(d time.Duration) int64 {
	now := g.nowMS()
	g.mu.Lock()
	defer g.mu.Unlock()
	return max(now, g.ms) + d.Milliseconds() + g.maxSkew
}

// release stops minting and returns the node id that was held (-1: none)
// and the ms of the last id.
func (g *idGen) release() (node, last int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	node, last = g.node, g.ms
	g.node = -1
	return node, last
}

func (g *idGen) current() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.node
}

// newID mints an id above floor (a sender's order floor; 0: none) for the
// request traced by logid. Without a valid node id lease it fails with
// StatusUnavailable: the client retries, on this node once it holds a
// lease again or on another.
func (s *Service) newID(floor, logid uint64) (uint64, error) {
	id, clamped, err := s.ids.next(floor)
	if clamped {
		s.ids.events.WithLabelValues("floor_clamped").Inc()
		s.log.Warn("msgid floor beyond the max clock skew ahead of this node's clock: clamped (a client's bad after_msgid, or a clock off by more than max_clock_skew)",
			"floor", floor, "floor_time", das.MsgTime(floor), "max_clock_skew", time.Duration(s.ids.maxSkew)*time.Millisecond, "logid", logid)
	}
	if err != nil {
		s.ids.events.WithLabelValues("refused").Inc()
		s.log.Warn("no msgid minted", "err", err, "logid", logid)
		return 0, schema.Errorf(schema.StatusUnavailable, "msgid: %v", err)
	}
	return id, nil
}

// NodeID returns the snowflake node id this node mints with, -1 while it
// holds none.
func (s *Service) NodeID() int64 { return s.ids.current() }

// HoldNodeID lets this node mint ids with node id node (leased through the
// membership) until the monotonic deadline until, never with a time above
// ceilingMS (ms since das.SnowflakeEpoch, the ceiling written with the
// lease) and always above afterMS (the ceiling the lease's previous holder
// left; -1 on a renewal of this node's own lease).
func (s *Service) HoldNodeID(node, afterMS, ceilingMS int64, until time.Time) {
	s.ids.hold(node, afterMS, ceilingMS, until)
}

// IDCeiling is the ceiling to write with a lease that lasts d: this node
// mints nothing above it for that long (ms since das.SnowflakeEpoch).
func (s *Service) IDCeiling(d time.Duration) int64 { return s.ids.ceiling(d) }

// ReleaseNodeID stops minting and returns the node id that was held (-1:
// none) and the time of the last id minted (ms since das.SnowflakeEpoch):
// what the next holder of the id must start above.
func (s *Service) ReleaseNodeID() (node, lastMS int64) { return s.ids.release() }

// MaxClockSkew is how far ahead of this node's clock a sender's order
// floor is followed: with a lease's TTL, what its ceiling reaches beyond
// the clock.
func (s *Service) MaxClockSkew() time.Duration {
	return time.Duration(s.ids.maxSkew) * time.Millisecond
}
