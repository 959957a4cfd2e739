package embedded

import (
	"fmt"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

func TestIdemFilter(t *testing.T) {
	f := newIdemFilter(time.Hour)
	f.ready.Store(true)
	const n = 4 * minIdemGen // three generations: 64Ki, 128Ki, and a quarter of 256Ki
	for i := range n {
		f.add(fmt.Appendf(nil, "key-%d", i), uint64(1000+i))
	}
	for i := range n {
		if !f.mayHold(fmt.Appendf(nil, "key-%d", i)) {
			t.Fatalf("key-%d was added but is reported absent", i)
		}
	}
	if len(f.gens) != 3 || f.gens[0].cap != minIdemGen || f.gens[1].cap != 2*minIdemGen || f.gens[2].cap != 4*minIdemGen {
		t.Fatalf("generations: %d", len(f.gens))
	}
	fp := 0
	const probes = 100000
	for i := range probes {
		if f.mayHold(fmt.Appendf(nil, "other-%d", i)) {
			fp++
		}
	}
	// Three generations at 1% each: about 3% of absent keys need a read.
	if rate := float64(fp) / probes; rate > 0.04 {
		t.Fatalf("%.2f%% of absent keys reported present", 100*rate)
	}
	t.Logf("%d keys in %d bytes; %.2f%% false positives", n, f.bytes(), 100*float64(fp)/probes)

	// Once every key of the first generation is past the TTL, it goes;
	// the newest generation always stays.
	last0 := f.gens[0].newest
	f.expire(last0 + uint64(time.Hour.Milliseconds()))
	if len(f.gens) != 2 || f.mayHold([]byte("key-0")) && f.mayHold([]byte("key-1")) && f.mayHold([]byte("key-2")) {
		t.Fatalf("after expiry: %d generations; key-0..2 still held", len(f.gens))
	}
	f.expire(1 << 62)
	if len(f.gens) != 1 {
		t.Fatalf("the newest generation must stay: %d left", len(f.gens))
	}

	notReady := newIdemFilter(time.Hour)
	if !notReady.mayHold([]byte("anything")) {
		t.Fatal("a filter that has not read the store must answer maybe")
	}
}

// TestIdemFilterAfterReopen stores messages and a group message with client
// ids, reopens the store, and retries them once the filter was rebuilt from
// the expiry queue: each retry is a duplicate of the first msgid, and a new
// client id is stored.
func TestIdemFilterAfterReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{JanitorInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	a, b := user(1), user(2)
	for i := range 100 {
		mustPut(t, s, msgAt(uint64(100+i), a, b, fmt.Sprint("c", i)), 101)
	}
	members := []das.User{a, b}
	ev := &pb.C2CMessage{Msgid: 400, From: &pb.User{}, To: &pb.User{}, GroupId: 7,
		Event: &pb.GroupEvent{Kind: pb.GroupEventKind_GROUP_EVENT_CREATED, Users: []*pb.User{{Account: 1, Uid: 1}, {Account: 1, Uid: 2}}}}
	if _, err := s.CreateGroup(ctx, 7, members, 10, ev); err != nil {
		t.Fatal(err)
	}
	gm := msgAt(500, a, b, "g1")
	gm.To, gm.GroupId = &pb.User{}, 7
	first, err := s.AppendGroup(ctx, gm)
	if err != nil || first.Dup {
		t.Fatalf("AppendGroup: %+v, %v", first, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(dir, Options{JanitorInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for deadline := time.Now().Add(10 * time.Second); !s.idem.ready.Load(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the idempotency filter was not built in 10s")
		}
	}
	for i := range 100 {
		id, dup, err := s.PutC2C(ctx, msgAt(uint64(1000+i), a, b, fmt.Sprint("c", i)), []uint32{101}, nil)
		if err != nil || !dup || id != uint64(100+i) {
			t.Fatalf("retry of c%d after reopen = %d, dup %v, %v; want %d, dup", i, id, dup, err, 100+i)
		}
	}
	if id, dup, err := s.PutC2C(ctx, msgAt(2000, a, b, "new"), []uint32{101}, nil); err != nil || dup || id != 2000 {
		t.Fatalf("new client id = %d, dup %v, %v", id, dup, err)
	}
	gm2 := msgAt(600, a, b, "g1")
	gm2.To, gm2.GroupId = &pb.User{}, 7
	again, err := s.AppendGroup(ctx, gm2)
	if err != nil || !again.Dup || again.Msgid != 500 || again.Seq != first.Seq {
		t.Fatalf("group retry after reopen = %+v, %v; want msgid 500 seq %d, dup", again, err, first.Seq)
	}
}
