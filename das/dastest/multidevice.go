package dastest

import (
	"testing"

	"github.com/imd-dev/imd/schema/pb"
)

// testSenderTerminals: a message is also kept in the inbox of each of the
// sender's other terminals (multi-device), exactly once, removed only by
// that terminal's ack; a retry of the send (same client id) adds nothing;
// a note to oneself lists each terminal once.
func testSenderTerminals(t *testing.T, f *fixture) {
	a, b := f.user(), f.user()
	m := newMsg(a, 101, b, "cm-1", "from the phone")
	id, dup, err := f.s.PutC2C(f.ctx, m, []uint32{101, 102}, []uint32{102, 103, 102})
	if err != nil || dup {
		t.Fatalf("PutC2C: %v dup=%v", err, dup)
	}
	if id != m.Msgid {
		t.Fatalf("msgid %d, want %d", id, m.Msgid)
	}
	for _, tm := range []struct {
		name string
		u    uint32
		n    int
	}{{"sender 101 (the sending terminal)", 101, 0}, {"sender 102", 102, 1}, {"sender 103", 103, 1}} {
		if n, _ := f.count(term(a, tm.u)); n != tm.n {
			t.Fatalf("%s: %d in the inbox, want %d", tm.name, n, tm.n)
		}
	}
	f.wantCount(term(b, 101), 1)
	f.wantCount(term(b, 102), 1)
	wantMsgs(t, "sender 102 inbox", f.inbox(term(a, 102), 10), []*pb.C2CMessage{m})

	// A retry with the same client id: the same msgid, nothing twice.
	retry := newMsg(a, 101, b, "cm-1", "from the phone")
	retry.Msgid = NewMsgid()
	id2, dup, err := f.s.PutC2C(f.ctx, retry, []uint32{101, 102}, []uint32{102, 103})
	if err != nil || !dup || id2 != m.Msgid {
		t.Fatalf("retry: id %d dup %v err %v, want %d dup", id2, dup, err, m.Msgid)
	}
	f.wantCount(term(a, 102), 1)
	f.wantCount(term(a, 103), 1)

	acked, missing := f.ack(term(a, 102), m.Msgid)
	if len(missing) != 0 {
		t.Fatalf("ack on sender 102: missing %v", missing)
	}
	wantMsgs(t, "acked on sender 102", acked, []*pb.C2CMessage{m})
	f.wantCount(term(a, 102), 0)
	f.wantCount(term(a, 103), 1)
	if acked, missing := f.ack(term(a, 101), m.Msgid); len(acked) != 0 || len(missing) != 1 {
		t.Fatalf("the sending terminal had no copy: acked %v missing %v", ids(acked), missing)
	}
	// Every terminal acks: the message stays on both timelines.
	f.ack(term(a, 103), m.Msgid)
	f.ack(term(b, 101), m.Msgid)
	f.ack(term(b, 102), m.Msgid)
	wantMsgs(t, "sender timeline", f.timeline(a, nil, 10), []*pb.C2CMessage{m})
	wantMsgs(t, "recipient timeline", f.timeline(b, nil, 10), []*pb.C2CMessage{m})

	// A note to oneself: each terminal of the user once.
	self := newMsg(a, 101, a, "", "note")
	if _, _, err := f.s.PutC2C(f.ctx, self, []uint32{101, 102, 103}, []uint32{102, 103}); err != nil {
		t.Fatalf("PutC2C to oneself: %v", err)
	}
	wantMsgs(t, "self 102", f.inbox(term(a, 102), 10), []*pb.C2CMessage{self})
	wantMsgs(t, "self 103", f.inbox(term(a, 103), 10), []*pb.C2CMessage{self})
}
