package gateway

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

type wheelTestItem struct {
	id int
	tl wheelLinks[wheelTestItem]
}

func (x *wheelTestItem) links() *wheelLinks[wheelTestItem] { return &x.tl }

func ids(xs []*wheelTestItem) []int {
	out := make([]int, 0, len(xs))
	for _, x := range xs {
		out = append(out, x.id)
	}
	slices.Sort(out)
	return out
}

const ms = int64(time.Millisecond)

func TestWheelFiresAtItsTick(t *testing.T) {
	const start = 1_000_000 * ms
	w := newWheel[wheelTestItem](10*time.Millisecond, time.Second, start)
	a, b, c := &wheelTestItem{id: 1}, &wheelTestItem{id: 2}, &wheelTestItem{id: 3}
	w.scheduleBy(a, start+25*ms) // rounds up to the tick at +30ms
	w.scheduleBy(b, start+30*ms)
	w.scheduleBy(c, start+500*ms)
	if w.Len() != 3 {
		t.Fatalf("Len %d, want 3", w.Len())
	}
	if due := w.advance(start+29*ms, nil); len(due) != 0 {
		t.Fatalf("fired early: %v", ids(due))
	}
	if due := w.advance(start+30*ms, nil); !slices.Equal(ids(due), []int{1, 2}) {
		t.Fatalf("at +30ms fired %v, want [1 2]", ids(due))
	}
	if a.tl.at != 0 || a.tl.next != nil || a.tl.prev != nil {
		t.Fatal("a fired item is still linked")
	}
	if due := w.advance(start+499*ms, nil); len(due) != 0 {
		t.Fatalf("fired early: %v", ids(due))
	}
	if due := w.advance(start+505*ms, nil); !slices.Equal(ids(due), []int{3}) {
		t.Fatalf("at +505ms fired %v, want [3]", ids(due))
	}
	if w.Len() != 0 {
		t.Fatalf("Len %d after everything fired", w.Len())
	}
}

func TestWheelScheduleByKeepsTheEarlier(t *testing.T) {
	const start = 0
	w := newWheel[wheelTestItem](10*time.Millisecond, time.Second, start)
	x := &wheelTestItem{id: 1}
	w.scheduleBy(x, 500*ms)
	w.scheduleBy(x, 800*ms) // later: ignored, the item is looked at by 500ms
	w.scheduleBy(x, 100*ms) // earlier: moves
	if w.Len() != 1 {
		t.Fatalf("Len %d, want 1", w.Len())
	}
	if due := w.advance(100*ms, nil); !slices.Equal(ids(due), []int{1}) {
		t.Fatalf("at 100ms fired %v, want [1]", ids(due))
	}
	if due := w.advance(600*ms, nil); len(due) != 0 {
		t.Fatalf("fired twice: %v", ids(due))
	}
}

func TestWheelRemove(t *testing.T) {
	w := newWheel[wheelTestItem](10*time.Millisecond, time.Second, 0)
	xs := make([]*wheelTestItem, 5)
	for i := range xs {
		xs[i] = &wheelTestItem{id: i}
		w.scheduleBy(xs[i], 50*ms) // all in one slot: remove from head, middle and tail
	}
	w.remove(xs[4])
	w.remove(xs[2])
	w.remove(xs[0])
	w.remove(xs[0]) // twice: no-op
	if due := w.advance(50*ms, nil); !slices.Equal(ids(due), []int{1, 3}) {
		t.Fatalf("fired %v, want [1 3]", ids(due))
	}
}

// TestWheelBeyondOneRevolution: a deadline further out than the wheel spans
// shares a slot with nearer ones and waits for its round.
func TestWheelBeyondOneRevolution(t *testing.T) {
	w := newWheel[wheelTestItem](10*time.Millisecond, 100*time.Millisecond, 0) // 16 slots = 160ms
	near, far := &wheelTestItem{id: 1}, &wheelTestItem{id: 2}
	w.scheduleBy(near, 50*ms)
	w.scheduleBy(far, 50*ms+16*10*ms*3) // the same slot, three rounds later
	if due := w.advance(50*ms, nil); !slices.Equal(ids(due), []int{1}) {
		t.Fatalf("first round fired %v, want [1]", ids(due))
	}
	for now := 60 * ms; now < 530*ms; now += 10 * ms {
		if due := w.advance(now, nil); len(due) != 0 {
			t.Fatalf("at %dms fired %v early", now/ms, ids(due))
		}
	}
	if due := w.advance(530*ms, nil); !slices.Equal(ids(due), []int{2}) {
		t.Fatalf("third round fired %v, want [2]", ids(due))
	}
}

// TestWheelLongPause: a loop that was busy for longer than a revolution
// catches up in one advance, firing everything due and nothing else.
func TestWheelLongPause(t *testing.T) {
	w := newWheel[wheelTestItem](10*time.Millisecond, 100*time.Millisecond, 0)
	var want []int
	for i := range 40 {
		x := &wheelTestItem{id: i}
		when := int64(i) * 25 * ms
		w.scheduleBy(x, when)
		if when <= 700*ms {
			want = append(want, i)
		}
	}
	if due := w.advance(700*ms, nil); !slices.Equal(ids(due), want) {
		t.Fatalf("fired %v, want %v", ids(due), want)
	}
	if w.Len() != 40-len(want) {
		t.Fatalf("Len %d, want %d", w.Len(), 40-len(want))
	}
	if w.next() != 710*ms {
		t.Fatalf("next tick at %dms, want 710", w.next()/ms)
	}
}

// TestWheelRandom checks, against a plain list, that every item fires at
// the first advance at or after its deadline and no sooner, however
// deadlines move and items leave.
func TestWheelRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const tick = 7 * ms
	w := newWheel[wheelTestItem](time.Duration(tick), 300*time.Millisecond, 0)
	items := make([]*wheelTestItem, 200)
	deadline := make([]int64, len(items)) // 0: not scheduled
	for i := range items {
		items[i] = &wheelTestItem{id: i}
	}
	now := int64(0)
	for step := 0; step < 3000; step++ {
		i := rng.IntN(len(items))
		switch op := rng.IntN(10); {
		case op < 5: // schedule no later than a random time up to 2 revolutions ahead
			when := now + rng.Int64N(2*int64(len(w.slots))*tick)
			fires := max(roundUp(when, tick), w.next())
			w.scheduleBy(items[i], when)
			if deadline[i] == 0 || fires < deadline[i] {
				deadline[i] = fires
			}
		case op < 6:
			w.remove(items[i])
			deadline[i] = 0
		default:
			now += rng.Int64N(3 * tick)
			due := w.advance(now, nil)
			var want []int
			for j, d := range deadline {
				if d != 0 && d <= now {
					want = append(want, j)
					deadline[j] = 0
				}
			}
			if got := ids(due); !slices.Equal(got, want) {
				t.Fatalf("step %d at %d: fired %v, want %v", step, now, got, want)
			}
		}
	}
	n := 0
	for _, d := range deadline {
		if d != 0 {
			n++
		}
	}
	if w.Len() != n {
		t.Fatalf("Len %d, want %d", w.Len(), n)
	}
}

// roundUp is the tick boundary at or after when; the wheel fires a
// deadline there, or at its next tick if that boundary has been processed.
func roundUp(when, tick int64) int64 { return (when + tick - 1) / tick * tick }
