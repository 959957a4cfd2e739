package rpc

import (
	"context"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
)

// roomPair links DC dc1 (a) and DC dc2 (b), each a logic service with its
// own in-memory router, with the given secrets.
func roomPair(t *testing.T, secretA, secretB string) (a, b *Rooms, svcA, svcB *logic.Service, rtB *router.Memory) {
	t.Helper()
	lnA, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lnB, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rooms := []Room{{DC: "dc1", Peers: []string{lnA.Addr().String()}, NodeLo: 0, NodeHi: 511}, {DC: "dc2", Peers: []string{lnB.Addr().String()}, NodeLo: 512, NodeHi: 1023}}
	svcA, _ = testService(t)
	svcB, rtB = testService(t)
	a, err = NewRooms(RoomsOptions{DC: "dc1", Node: "a", Rooms: rooms, Svc: svcA, Secret: secretA})
	if err != nil {
		t.Fatal(err)
	}
	b, err = NewRooms(RoomsOptions{DC: "dc2", Node: "b", Rooms: rooms, Svc: svcB, Secret: secretB})
	if err != nil {
		t.Fatal(err)
	}
	svcA.SetRooms(a)
	svcB.SetRooms(b)
	go func() { _ = a.Serve(lnA) }()
	go func() { _ = b.Serve(lnB) }()
	t.Cleanup(func() { a.Close(context.Background()); b.Close(context.Background()) })
	return a, b, svcA, svcB, rtB
}

func waitTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRoomsMirrorAndPush: a login in DC1 shows in DC2's router as a
// mirrored session, and DC2's push to it reaches DC1's gateway.
func TestRoomsMirrorAndPush(t *testing.T) {
	a, b, svcA, svcB, rtB := roomPair(t, "same-secret-0123456789", "same-secret-0123456789")
	waitTrue(t, "linked both ways", func() bool { return a.Links()["dc2"] && b.Links()["dc1"] })
	g := &fakeGate{pushed: map[uint64][][]byte{77: nil}} // connection 77 is open
	svcA.AttachGate("gw-1", g)
	ctx := context.Background()
	res, err := svcA.Login(ctx, logic.LoginInput{AppCode: 101, UID: 5, Gate: "gw-1", Conn: 77, Token: logic.MintToken("0123456789abcdef0123", 101, 5, time.Now().Add(time.Hour))})
	if err != nil {
		t.Fatal(err)
	}
	waitTrue(t, "DC2 mirrors the login", func() bool {
		ss, _ := rtB.Lookup(ctx, router.User{Account: 1, UID: 5})
		return len(ss) == 1 && ss[0].Gate == logic.MirrorGate("dc1", "gw-1") && ss[0].Conn == 77 && ss[0].Epoch == res.Session.Epoch
	})
	ss, _ := rtB.Lookup(ctx, router.User{Account: 1, UID: 5})
	q := []bool{false}
	if err := svcB.LocalGate("nope"); err != nil {
		t.Fatal("an unknown local gate resolved")
	}
	gate := b.Gate("dc1", "gw-1")
	if err := gate.Push(ctx, []uint64{ss[0].Conn}, schema.CmdS2C, 3, 42, []byte("order"), q); err != nil || !q[0] {
		t.Fatalf("push across: %v %v", err, q)
	}
	g.mu.Lock()
	got := g.pushed[77]
	g.mu.Unlock()
	if len(got) != 1 || string(got[0]) != "order" || !slices.Contains(g.logids, 42) {
		t.Fatalf("DC1's gateway got %q, trace ids %v", got, g.logids)
	}
	if err := svcA.Logout(ctx, res.Session); err != nil {
		t.Fatal(err)
	}
	waitTrue(t, "DC2 drops the ended login", func() bool {
		ss, _ := rtB.Lookup(ctx, router.User{Account: 1, UID: 5})
		return len(ss) == 0
	})
}

// TestRoomsRefuseAnotherSecret: a DC link signed with another cluster
// secret never opens.
func TestRoomsRefuseAnotherSecret(t *testing.T) {
	a, b, _, _, _ := roomPair(t, "one-secret-0123456789", "another-secret-0123456789")
	time.Sleep(500 * time.Millisecond)
	if a.Links()["dc2"] || b.Links()["dc1"] {
		t.Fatalf("linked with different secrets: %v %v", a.Links(), b.Links())
	}
}

// TestRoomsConfig: overlapping node id ranges, a DC not among the rooms
// and a room without peers are refused.
func TestRoomsConfig(t *testing.T) {
	svc, _ := testService(t)
	cases := []struct {
		dc    string
		rooms []Room
	}{
		{"dc1", []Room{{DC: "dc1", NodeHi: 600}, {DC: "dc2", Peers: []string{"x:1"}, NodeLo: 500, NodeHi: 1023}}},
		{"dc3", []Room{{DC: "dc1", NodeHi: 511}, {DC: "dc2", Peers: []string{"x:1"}, NodeLo: 512, NodeHi: 1023}}},
		{"dc1", []Room{{DC: "dc1", NodeHi: 511}, {DC: "dc2", NodeLo: 512, NodeHi: 1023}}},
		{"dc1", []Room{{DC: "dc1", NodeHi: 511}, {DC: "dc1", Peers: []string{"x:1"}, NodeLo: 512, NodeHi: 1023}}},
	}
	for i, c := range cases {
		if r, err := NewRooms(RoomsOptions{DC: c.dc, Node: "n", Rooms: c.rooms, Svc: svc}); err == nil {
			r.Close(context.Background())
			t.Errorf("case %d: accepted", i)
		}
	}
}
