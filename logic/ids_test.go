package logic

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// stepClock is a wall clock a test sets and steps.
type stepClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *stepClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *stepClock) step(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTestGen(t *testing.T, node int64, clock *stepClock) *idGen {
	t.Helper()
	g, err := newIDGen(Options{NodeID: node, Clock: clock.now, MaxClockSkew: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func mustNext(t *testing.T, g *idGen, floor uint64) uint64 {
	t.Helper()
	id, _, err := g.next(floor)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func idParts(id uint64) (ms, node, seq int64) {
	return int64(id >> idTimeShift), int64(id>>idSeqBits) & MaxNodeID, int64(id) & idMaxSeq
}

var t0 = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

// TestIDLayout: the bit layout das decodes (41-bit ms since the snowflake
// epoch, 10-bit node, 12-bit sequence), as bwmarrin/snowflake made it.
func TestIDLayout(t *testing.T) {
	c := &stepClock{t: t0}
	g := newTestGen(t, 5, c)
	id := mustNext(t, g, 0)
	if got := das.MsgTime(id); !got.Equal(t0) {
		t.Fatalf("MsgTime %v, want %v", got, t0)
	}
	if _, node, seq := idParts(id); node != 5 || seq != 0 {
		t.Fatalf("node %d seq %d", node, seq)
	}
	if want := uint64(t0.UnixMilli()-das.SnowflakeEpoch)<<22 | 5<<12; id != want {
		t.Fatalf("id %d, want %d", id, want)
	}
	if id2 := mustNext(t, g, 0); id2 != id+1 {
		t.Fatalf("second id in the same ms %d, want %d", id2, id+1)
	}
	if _, err := newIDGen(Options{NodeID: 1024}); err == nil {
		t.Fatal("node id 1024 accepted")
	}
}

// TestIDClockBackwards: a clock that steps back never yields a smaller or
// repeated id; the generator keeps the last time and counts on.
func TestIDClockBackwards(t *testing.T) {
	c := &stepClock{t: t0}
	g := newTestGen(t, 1, c)
	first := mustNext(t, g, 0)
	c.step(5 * time.Millisecond)
	last := mustNext(t, g, 0)
	if last <= first {
		t.Fatalf("id %d after the clock moved forward is not above %d", last, first)
	}
	c.step(-10 * time.Second)
	for i := range 100 {
		id := mustNext(t, g, 0)
		if id <= last {
			t.Fatalf("id %d after the clock stepped back: %d <= %d", i, id, last)
		}
		if ms, _, _ := idParts(id); ms != int64(last>>22) {
			t.Fatalf("id %d left the last time while the clock is behind", i)
		}
		last = id
		if i == 50 {
			c.step(3 * time.Second) // still behind
		}
	}
	c.step(20 * time.Second) // ahead of the last id again
	id := mustNext(t, g, 0)
	if id <= last || !das.MsgTime(id).Equal(t0.Add(13*time.Second+5*time.Millisecond)) {
		t.Fatalf("once the clock is ahead again: %d (%v), last %d", id, das.MsgTime(id), last)
	}
}

// TestIDSequenceOverflow: more than 4096 ids in one clock millisecond
// advance the logical millisecond instead of wrapping or waiting.
func TestIDSequenceOverflow(t *testing.T) {
	c := &stepClock{t: t0}
	g := newTestGen(t, 1023, c)
	var last uint64
	for i := range 3*4096 + 10 {
		id := mustNext(t, g, 0)
		if id <= last {
			t.Fatalf("id %d: %d <= %d", i, id, last)
		}
		ms, node, seq := idParts(id)
		if node != 1023 || seq != int64(i%4096) || ms != t0.UnixMilli()-das.SnowflakeEpoch+int64(i/4096) {
			t.Fatalf("id %d: ms %d node %d seq %d", i, ms, node, seq)
		}
		last = id
	}
	// the clock behind the logical time: it stays ahead
	c.step(time.Millisecond)
	if id := mustNext(t, g, 0); id <= last {
		t.Fatalf("%d <= %d", id, last)
	}
}

// TestIDFloor: an id is above the sender's floor, whatever the node ids,
// and the floor moves the generator on, so a later id with no floor is
// above it too (a hybrid logical clock).
func TestIDFloor(t *testing.T) {
	c := &stepClock{t: t0}
	ahead := uint64(t0.Add(5*time.Second).UnixMilli()-das.SnowflakeEpoch) << 22
	for _, tc := range []struct {
		name  string
		node  int64
		floor uint64
	}{
		{"floor of a higher node", 3, ahead | 7<<12 | 9},
		{"floor of a lower node", 3, ahead | 1<<12 | 4095},
		{"floor of this node", 3, ahead | 3<<12 | 9},
		{"floor of this node, sequence full", 3, ahead | 3<<12 | 4095},
		{"floor behind the clock", 3, uint64(t0.Add(-time.Hour).UnixMilli()-das.SnowflakeEpoch) << 22},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newTestGen(t, tc.node, c)
			before := mustNext(t, g, 0)
			id := mustNext(t, g, tc.floor)
			if id <= tc.floor || id <= before {
				t.Fatalf("id %d, floor %d, before %d", id, tc.floor, before)
			}
			if _, node, _ := idParts(id); node != tc.node {
				t.Fatalf("node %d", node)
			}
			if tc.floor > before {
				// the smallest id of this node above the floor: nothing
				// fits between
				for x := tc.floor + 1; x < id; x++ {
					if _, node, _ := idParts(x); node == tc.node {
						t.Fatalf("id %d skips %d", id, x)
					}
				}
			}
			if next := mustNext(t, g, 0); next <= id {
				t.Fatalf("next id without a floor %d <= %d", next, id)
			}
		})
	}
}

// TestIDFloorClamped: a floor beyond the max clock skew ahead of the
// clock (a client's bad value) is clamped to it, logged with the logid and
// counted.
func TestIDFloorClamped(t *testing.T) {
	c := &stepClock{t: t0}
	reg := prometheus.NewRegistry()
	s, err := New(Options{Router: router.NewMemory(), NodeID: 2, Clock: c.now, MaxClockSkew: 30 * time.Second, Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	far := uint64(t0.Add(2*time.Hour).UnixMilli()-das.SnowflakeEpoch) << 22
	id, err := s.newID(far, 77)
	if err != nil {
		t.Fatal(err)
	}
	if got, max := das.MsgTime(id), t0.Add(30*time.Second); got.After(max) {
		t.Fatalf("id time %v, beyond the clock + skew %v", got, max)
	}
	if got := das.MsgTime(id); got.Before(t0.Add(30 * time.Second)) {
		t.Fatalf("id time %v: the floor was not followed up to the skew", got)
	}
	if n := counterValue(t, s.ids.events.WithLabelValues("floor_clamped")); n != 1 {
		t.Fatalf("floor_clamped %v", n)
	}
	// within the skew: followed, not counted
	near := uint64(t0.Add(40*time.Second).UnixMilli()-das.SnowflakeEpoch) << 22
	c.step(20 * time.Second)
	if id2, err := s.newID(near, 78); err != nil || id2 <= near {
		t.Fatalf("floor within the skew: %d %v", id2, err)
	}
	if n := counterValue(t, s.ids.events.WithLabelValues("floor_clamped")); n != 1 {
		t.Fatalf("floor_clamped %v after a floor within the skew", n)
	}
}

// TestIDLease: a node that leases its id mints nothing before it holds a
// lease, after the lease lapsed, or above the ceiling written with it; a
// lease taken over from another holder starts above that holder's ceiling.
func TestIDLease(t *testing.T) {
	c := &stepClock{t: t0}
	s, err := New(Options{Router: router.NewMemory(), NodeID: -1, Clock: c.now, MaxClockSkew: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	unavailable := func(what string) {
		t.Helper()
		var se *schema.Error
		if _, err := s.newID(0, 1); err == nil || !asSchema(err, &se) || se.Status != schema.StatusUnavailable {
			t.Fatalf("%s: %v, want unavailable", what, err)
		}
	}
	unavailable("no lease yet")
	if s.NodeID() != -1 {
		t.Fatal(s.NodeID())
	}
	nowMS := t0.UnixMilli() - das.SnowflakeEpoch
	prev := nowMS + 8000 // the previous holder's ceiling: its clock was ahead
	s.HoldNodeID(9, prev, prev+11000, time.Now().Add(time.Hour))
	id, err := s.newID(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	if ms, node, _ := idParts(id); ms <= prev || node != 9 {
		t.Fatalf("first id at ms %d node %d, want above %d on node 9", ms, node, prev)
	}
	if c := s.IDCeiling(10 * time.Second); c != prev+1+10000+1000 {
		t.Fatalf("ceiling %d, want last + ttl + skew = %d", c, prev+1+11000)
	}
	// the ceiling: a clock that jumps past it stops minting
	c.step(time.Minute)
	unavailable("beyond the ceiling")
	s.HoldNodeID(9, -1, s.IDCeiling(10*time.Second), time.Now().Add(time.Hour))
	if _, err := s.newID(0, 1); err != nil {
		t.Fatalf("after a renewal: %v", err)
	}
	// a lapsed lease
	s.HoldNodeID(9, -1, s.IDCeiling(10*time.Second), time.Now().Add(-time.Millisecond))
	unavailable("lease lapsed")
	s.HoldNodeID(9, -1, s.IDCeiling(10*time.Second), time.Now().Add(time.Hour))
	last, _ := s.newID(0, 1)
	node, lastMS := s.ReleaseNodeID()
	if node != 9 || lastMS != int64(last>>22) {
		t.Fatalf("release: node %d last %d, want 9 and %d", node, lastMS, last>>22)
	}
	unavailable("released")
}

func asSchema(err error, se **schema.Error) bool {
	e, ok := err.(*schema.Error)
	*se = e
	return ok && strings.Contains(e.Error(), "msgid")
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
