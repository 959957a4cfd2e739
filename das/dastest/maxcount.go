package dastest

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

// MaxCount is the Retention.MaxCount that RunMaxCount's open must give
// the store.
const MaxCount = 3

// RunMaxCount checks that an engine enforces Retention.MaxCount: after a
// retention pass (trim, which runs the engine's janitor once) each user's
// timeline holds its newest MaxCount messages, in History with and
// without a peer (pages end where they should, with no holes from
// messages trimmed from one index but not the other), across the
// engine's time buckets, while inboxes keep every message. open returns a
// store with Retention.MaxCount = MaxCount and no background pass, closed
// at the end of t.
func RunMaxCount(t *testing.T, open func(t *testing.T) das.Store, trim func(t *testing.T, s das.Store)) {
	f := newFixture(t, open)
	a, b, c := f.user(), f.user(), f.user()
	var ab, ca []*pb.C2CMessage
	for i := range 5 {
		ab = append(ab, f.send(a, b, fmt.Sprint("ab", i), 102))
	}
	for i := range 2 {
		ca = append(ca, f.send(c, a, fmt.Sprint("ca", i), 101))
	}
	// d and e talk over three weeks: messages in several time buckets.
	d, e := f.user(), f.user()
	var de []*pb.C2CMessage
	for _, ago := range []time.Duration{20 * 24 * time.Hour, 20*24*time.Hour - time.Minute, 10 * 24 * time.Hour, 10*24*time.Hour - time.Minute} {
		m := newMsg(d, 101, e, fmt.Sprintf("cm-de-%d", ago), "old")
		m.Msgid = msgidAgo(ago)
		m.SentAtMs = das.MsgTime(m.Msgid).UnixMilli()
		de = append(de, f.put(m, 102))
	}
	for i := range 2 {
		de = append(de, f.send(d, e, fmt.Sprint("de", i), 102))
	}
	trim(t, f.s)

	want := func(what string, u das.User, peer *das.User, msgs ...*pb.C2CMessage) {
		t.Helper()
		for _, limit := range []int{1, 2, 10} {
			wantMsgs(t, fmt.Sprintf("%s, pages of %d", what, limit), f.timeline(u, peer, limit), msgs)
		}
	}
	check := func() {
		t.Helper()
		want("a", a, nil, ab[4], ca[0], ca[1])
		want("a with b", a, &b, ab[4])
		want("a with c", a, &c, ca...)
		want("b", b, nil, ab[2:]...)
		want("b with a", b, &a, ab[2:]...)
		want("c", c, nil, ca...)
		want("c with a", c, &a, ca...)
		want("d", d, nil, de[3:]...)
		want("d with e", d, &e, de[3:]...)
		want("e with d", e, &d, de[3:]...)
		// Retention never touches an inbox.
		f.wantCount(term(b, 102), 5)
		f.wantCount(term(a, 101), 2)
		f.wantCount(term(e, 102), 6)
	}
	check()
	trim(t, f.s) // nothing new: nothing changes
	check()

	// New messages push the oldest out at the next pass.
	ab = append(ab, f.send(a, b, "ab5", 102))
	trim(t, f.s)
	want("a after one more", a, nil, ca[0], ca[1], ab[5])
	want("a with b after one more", a, &b, ab[5])
	want("b after one more", b, nil, ab[3:]...)
}

var agoSeq atomic.Uint64

// msgidAgo returns a msgid made ago before now, distinct from the others.
func msgidAgo(ago time.Duration) uint64 {
	return das.MsgidAt(time.Now().Add(-ago)) + agoSeq.Add(1)%(1<<22)
}
