package scenario

import (
	"bytes"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/imd-dev/imd/schema/pb"
)

// TestS2CSlots checks that every (push, recipient) pair maps to a slot of
// its own in every shape and that a client a push did not name is not
// counted.
func TestS2CSlots(t *testing.T) {
	for _, shape := range []string{ShapeRotate, ShapeDispatch, ShapeBroadcast} {
		t.Run(shape, func(t *testing.T) {
			o := &S2C{Load: DefaultLoadOptions(1, 100, 1), Clients: 7, Pushers: 1, Fanout: 3, Shape: shape, Client: ClientSDK, Seed: 9}
			if shape == ShapeBroadcast {
				o.Fanout = 0
			}
			if err := o.Validate(); err != nil {
				t.Fatal(err)
			}
			s := &s2cRun{o: o, n: o.Clients, k: o.Fanout}
			rs := newRunState(1, 10, int64(o.Fanout), false)
			s.begin(rs)
			c := s.cur.Load()
			content := newContent(MsgHeader)
			recipients := func(g int64) []int {
				var out []int
				for i := range o.Clients {
					if _, ok := s.slot(c, g, i); ok {
						out = append(out, i)
					}
				}
				return out
			}
			for g := range int64(10) {
				rc := recipients(g)
				if len(rc) != o.Fanout {
					t.Fatalf("push %d goes to %v, want %d clients", g, rc, o.Fanout)
				}
				for _, i := range rc {
					putHeader(content, rs.id, g, 0, 0)
					s.received(i, i, content)
				}
			}
			want := int64(10 * o.Fanout)
			if rs.delivered.Load() != want || rs.dups.Load() != 0 || rs.stray.Load() != 0 {
				t.Fatalf("delivered %d dups %d stray %d, want %d distinct", rs.delivered.Load(), rs.dups.Load(), rs.stray.Load(), want)
			}
			if shape != ShapeBroadcast {
				rc := recipients(0)
				other := 0
				for slices.Contains(rc, other) {
					other++
				}
				putHeader(content, rs.id, 0, 0, 0)
				s.received(other, 0, content) // a client push 0 did not name
				if rs.stray.Load() != 1 {
					t.Fatalf("stray %d after a delivery to a client the push did not name", rs.stray.Load())
				}
			}
			putHeader(content, rs.id+1, 0, 0, 0)
			s.received(0, 0, content) // another run's push
			if rs.delivered.Load() != want {
				t.Fatalf("delivered %d", rs.delivered.Load())
			}
		})
	}
}

// TestDispatchDraws checks that dispatch pushes go to distinct clients,
// spread over all of them.
func TestDispatchDraws(t *testing.T) {
	o := &S2C{Load: DefaultLoadOptions(1, 100, 1), Clients: 5000, Pushers: 1, Shape: ShapeDispatch, Client: ClientRaw, Seed: 1}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	s := &s2cRun{o: o, n: o.Clients, k: o.Fanout}
	rs := newRunState(1, 400, int64(o.Fanout), false)
	s.begin(rs)
	hits := make([]int, o.Clients)
	for _, l := range s.cur.Load().lists {
		if len(l) != 50 || !slices.IsSorted(l) {
			t.Fatalf("list %v", l)
		}
		for i := 1; i < len(l); i++ {
			if l[i] == l[i-1] {
				t.Fatalf("client %d twice in %v", l[i], l)
			}
		}
		for _, i := range l {
			hits[i]++
		}
	}
	// 400 x 50 = 20,000 draws over 5,000 clients: 4 each on average.
	zero := 0
	for _, h := range hits {
		if h == 0 {
			zero++
		}
	}
	if zero > 250 { // e^-4 of 5,000 is ~92
		t.Errorf("%d clients never drawn", zero)
	}
}

// TestGroupSlots checks that each (message, online member) pair counts
// once, that the last-member bookkeeping follows, and that events and
// other runs' messages are ignored.
func TestGroupSlots(t *testing.T) {
	g := &groupBench{online: 3}
	rs := newRunState(1e6, 4, 3, false) // message i was due at i ns
	g.cur.Store(&groupRun{rs: rs, got: make([]atomic.Int32, 4), last: make([]atomic.Int64, 4)})
	content := newContent(MsgHeader)
	for idx := range int64(4) {
		for i := range 3 {
			if idx == 3 && i == 2 {
				continue // member 2 misses message 3
			}
			putHeader(content, rs.id, idx, 0, 0)
			g.received(i, &pb.C2CMessage{Content: bytes.Clone(content)})
		}
	}
	putHeader(content, rs.id, 1, 0, 0)
	g.received(0, &pb.C2CMessage{Content: content}) // a copy
	g.received(0, &pb.C2CMessage{Content: content, Event: &pb.GroupEvent{}})
	putHeader(content, rs.id+1, 0, 0, 0)
	g.received(1, &pb.C2CMessage{Content: content}) // another run's
	r := g.cur.Load()
	if rs.delivered.Load() != 11 || rs.dups.Load() != 1 || rs.stray.Load() != 0 {
		t.Fatalf("delivered %d dups %d stray %d, want 11, 1, 0", rs.delivered.Load(), rs.dups.Load(), rs.stray.Load())
	}
	for idx, want := range []int32{3, 3, 3, 2} {
		if got := r.got[idx].Load(); got != want || r.last[idx].Load() == 0 {
			t.Errorf("message %d: %d deliveries (last at %d), want %d", idx, got, r.last[idx].Load(), want)
		}
	}
	g.end(r, nil)
	if len(g.runs) != 1 || g.runs[0].Incomplete != 1 || g.runs[0].LastMember.Count != 3 {
		t.Errorf("stats %+v: want 3 complete messages and 1 incomplete", g.runs)
	}
}
