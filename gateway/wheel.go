package gateway

import "time"

// wheelLinks is what an item embeds to be scheduled on a wheel: an
// intrusive list node, so scheduling never allocates and an idle connection
// pays 24 bytes for all its timeouts instead of a runtime timer each.
type wheelLinks[T any] struct {
	prev, next *T
	at         int64 // tick the item fires at; 0 when not scheduled
}

// wheelItem is a pointer to a T that embeds wheelLinks[T].
type wheelItem[T any] interface {
	*T
	links() *wheelLinks[T]
}

// wheel is a hashed timing wheel with a coarse tick. Times are int64
// nanoseconds on the owner's monotonic clock. Items are checked, not
// trusted: when an item's slot comes round, the owner looks at its real
// deadlines and schedules it again if none has passed. So a deadline that
// moves later (a frame arrived, so the idle timeout restarts) costs nothing
// until the item's old slot comes round, and only a deadline that moves
// earlier has to reschedule. Deadlines further out than one revolution stay
// in their slot and are skipped until their round comes.
//
// A wheel is not safe for concurrent use; the event loop guards it with its
// lock.
type wheel[T any, P wheelItem[T]] struct {
	tick  int64 // nanoseconds
	mask  int64
	slots []P
	cur   int64 // the next tick to process
	n     int   // items scheduled
}

// newWheel returns a wheel of the given tick with enough slots that a
// deadline span away fits in one revolution (at most 4096 slots; beyond
// that items wait for their round). Ticks count from now.
func newWheel[T any, P wheelItem[T]](tick, span time.Duration, now int64) *wheel[T, P] {
	if tick <= 0 {
		tick = time.Millisecond
	}
	n := int64(16)
	for n < int64(span/tick)+2 && n < 4096 {
		n <<= 1
	}
	return &wheel[T, P]{tick: int64(tick), mask: n - 1, slots: make([]P, n), cur: now/int64(tick) + 1}
}

// Len returns the number of items scheduled.
func (w *wheel[T, P]) Len() int { return w.n }

// next returns the time at which advance will next find a tick to process.
func (w *wheel[T, P]) next() int64 { return w.cur * w.tick }

// scheduleBy makes x fire no later than when, rounded up to the tick. An item already due earlier keeps its slot.
func (w *wheel[T, P]) scheduleBy(x P, when int64) {
	at := (when + w.tick - 1) / w.tick
	at = max(at, w.cur)
	l := x.links()
	if l.at != 0 {
		if l.at <= at {
			return
		}
		w.remove(x)
	}
	l.at = at
	s := &w.slots[at&w.mask]
	l.prev, l.next = nil, *s
	if *s != nil {
		P(*s).links().prev = x
	}
	*s = x
	w.n++
}

// remove unschedules x; it does nothing if x is not scheduled.
func (w *wheel[T, P]) remove(x P) {
	l := x.links()
	if l.at == 0 {
		return
	}
	if l.prev != nil {
		P(l.prev).links().next = l.next
	} else {
		w.slots[l.at&w.mask] = l.next
	}
	if l.next != nil {
		P(l.next).links().prev = l.prev
	}
	l.prev, l.next, l.at = nil, nil, 0
	w.n--
}

// advance unschedules every item due by now and appends it to due.
func (w *wheel[T, P]) advance(now int64, due []P) []P {
	nowTick := now / w.tick
	if nowTick < w.cur {
		return due
	}
	steps := min(nowTick-w.cur+1, w.mask+1)
	for i := range steps {
		s := &w.slots[(w.cur+i)&w.mask]
		for x := *s; x != nil; {
			nx := x.links().next
			if x.links().at <= nowTick {
				w.remove(x)
				due = append(due, x)
			}
			x = nx
		}
	}
	w.cur = nowTick + 1
	return due
}
