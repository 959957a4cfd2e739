package logic

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// fakeRooms is the other DCs as logic sees them: it records what logic
// tells them and answers with fixed homes.
type fakeRooms struct {
	mu       sync.Mutex
	dc       string
	home     string // HomeDC of every group
	changes  []router.Session
	ons      []bool
	purged   []string
	gates    map[string]*kickGate // "dc/gate"
	forwards []string             // DCs a request went to
	acked    map[string][]uint64
}

// kickGate records kicks.
type kickGate struct {
	recGate
	kicked []uint64
}

func (g *kickGate) Kick(_ context.Context, conn uint64, _ *pb.Kickout, _ uint64) error {
	g.mu.Lock()
	g.kicked = append(g.kicked, conn)
	g.mu.Unlock()
	return nil
}

func (r *fakeRooms) DC() string { return r.dc }
func (r *fakeRooms) SessionChanged(s router.Session, on bool) {
	r.mu.Lock()
	r.changes, r.ons = append(r.changes, s), append(r.ons, on)
	r.mu.Unlock()
}
func (r *fakeRooms) GatePurged(gate string) {
	r.mu.Lock()
	r.purged = append(r.purged, gate)
	r.mu.Unlock()
}
func (r *fakeRooms) Gate(dc, gate string) Gate {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gates == nil {
		r.gates = map[string]*kickGate{}
	}
	k := dc + "/" + gate
	if r.gates[k] == nil {
		r.gates[k] = &kickGate{}
	}
	return r.gates[k]
}
func (r *fakeRooms) HomeDC(uint64) string { return r.home }
func (r *fakeRooms) DCs() []string        { return []string{"dc1", "dc2"} }
func (r *fakeRooms) MsgDC(msgid uint64) string {
	if (msgid>>12)&1023 >= 512 {
		return "dc2"
	}
	return "dc1"
}
func (r *fakeRooms) Forward(_ context.Context, dc string, _ router.Session, _ *schema.Header, _ []byte) ([]byte, error) {
	r.mu.Lock()
	r.forwards = append(r.forwards, dc)
	r.mu.Unlock()
	return []byte{}, nil
}
func (r *fakeRooms) Acked(dc string, _ router.Session, msgids []uint64, _ uint64) {
	r.mu.Lock()
	if r.acked == nil {
		r.acked = map[string][]uint64{}
	}
	r.acked[dc] = append(r.acked[dc], msgids...)
	r.mu.Unlock()
}

func roomsFixture(t *testing.T) (*groupFixture, *fakeRooms) {
	f := newGroupFixture(t)
	r := &fakeRooms{dc: "dc1", home: "dc1"}
	f.s.SetRooms(r)
	return f, r
}

// TestMirrorLoginCompetesByEpoch: a login mirrored from another DC that
// is newer than this DC's login of the same terminal evicts it, and this
// DC kicks its own; an older one loses and is not kept; neither kicks a
// mirrored session (its DC does).
func TestMirrorLoginCompetesByEpoch(t *testing.T) {
	f, r := roomsFixture(t)
	ctx := context.Background()
	kg := &kickGate{}
	f.s.AttachGate("gate-k", kg)
	local := router.Session{Account: 1, AppCode: 101, UID: 5, Gate: "gate-k", Conn: 1, Epoch: 1000}
	if _, err := f.s.router.Register(ctx, local, 1); err != nil {
		t.Fatal(err)
	}
	older := router.Session{Account: 1, AppCode: 101, UID: 5, Gate: "gw-x", Conn: 9, Epoch: 500}
	if err := f.s.ApplyMirror(ctx, "dc2", []MirrorOp{{Session: older, On: true}}); err != nil {
		t.Fatal(err)
	}
	ss, _ := f.s.router.Lookup(ctx, router.User{Account: 1, UID: 5})
	if len(ss) != 1 || !ss[0].Same(&local) || len(kg.kicked) != 0 {
		t.Fatalf("an older login of another DC changed this DC's: %+v, kicked %v", ss, kg.kicked)
	}
	newer := older
	newer.Epoch, newer.Conn = 2000, 10
	if err := f.s.ApplyMirror(ctx, "dc2", []MirrorOp{{Session: newer, On: true}}); err != nil {
		t.Fatal(err)
	}
	ss, _ = f.s.router.Lookup(ctx, router.User{Account: 1, UID: 5})
	if len(ss) != 1 || ss[0].Gate != MirrorGate("dc2", "gw-x") || ss[0].Conn != 10 {
		t.Fatalf("after a newer login in dc2 the router holds %+v", ss)
	}
	if len(kg.kicked) != 1 || kg.kicked[0] != 1 {
		t.Fatalf("this DC's login was kicked %v times, want once", kg.kicked)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.changes) != 1 || r.ons[0] || !r.changes[0].Same(&local) {
		t.Fatalf("the other DCs were told %+v %v; want only the end of this DC's evicted login", r.changes, r.ons)
	}
	for k, g := range r.gates {
		if len(g.kicked) > 0 {
			t.Fatalf("a mirrored session was kicked through %s: its own DC kicks it", k)
		}
	}
	// The end of the mirrored login and a stopped gateway of dc2.
	if err := f.s.ApplyMirror(ctx, "dc2", []MirrorOp{{Session: newer, On: false}, {Purge: "gw-y"}}); err != nil {
		t.Fatal(err)
	}
	if ss, _ = f.s.router.Lookup(ctx, router.User{Account: 1, UID: 5}); len(ss) != 0 {
		t.Fatalf("after its end the mirror still holds %+v", ss)
	}
	if len(r.purged) != 0 {
		t.Fatalf("a mirrored gate's purge was sent back to the other DCs: %v", r.purged)
	}
}

// TestRoomsSeeThisDCsChanges: logins, logouts and purged gateways of this
// DC are told to the other DCs; a notify to a mirrored session goes to
// its DC's gate.
func TestRoomsSeeThisDCsChanges(t *testing.T) {
	f, r := roomsFixture(t)
	ctx := context.Background()
	a := f.online("gate-a", 1, 101, 7) // registered directly: not told
	_ = a
	res, err := f.s.Login(ctx, LoginInput{AppCode: 101, UID: 8, Gate: "gate-b", Conn: 99, Token: MintToken("0123456789abcdef0123", 101, 8, time.Now().Add(time.Hour))})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.s.Logout(ctx, res.Session); err != nil {
		t.Fatal(err)
	}
	f.s.DetachGate(ctx, "gate-a")
	r.mu.Lock()
	if len(r.changes) != 2 || !r.ons[0] || r.ons[1] || r.changes[0].UID != 8 || len(r.purged) != 1 || r.purged[0] != "gate-a" {
		t.Fatalf("told the other DCs %+v %v, purged %v", r.changes, r.ons, r.purged)
	}
	r.mu.Unlock()
	m := router.Session{Account: 1, AppCode: 101, UID: 9, Gate: "gw-z", Conn: 4, Epoch: 1}
	if err := f.s.ApplyMirror(ctx, "dc2", []MirrorOp{{Session: m, On: true}}); err != nil {
		t.Fatal(err)
	}
	if n := f.s.pushUser(ctx, das.User{Account: m.Account, UID: m.UID}, nil, schema.CmdS2C, 0, []byte{}, 1); n != 1 {
		t.Fatalf("a push to a user online in dc2 reached %d sessions", n)
	}
	if g := r.gates["dc2/gw-z"]; g == nil || g.calls != 1 {
		t.Fatalf("the push did not go to dc2's gate gw-z: %+v", r.gates)
	}
}

// TestGroupsOrderedByTheirHome: a group send of a group another DC
// orders is forwarded there; its changes through this DC's API are
// refused with 4012.
func TestGroupsOrderedByTheirHome(t *testing.T) {
	f, r := roomsFixture(t)
	r.home = "dc2"
	sess := f.online("gate-a", 1, 101, 1)
	if _, err := f.send(sess, 42, "hello"); err != nil {
		t.Fatal(err)
	}
	if len(r.forwards) != 1 || r.forwards[0] != "dc2" {
		t.Fatalf("forwards %v, want one to dc2", r.forwards)
	}
	_, err := f.s.CreateGroup(context.Background(), f.app, 42, []GroupMember{{Account: 1, UID: 1}}, 0)
	if statusOf(err) != schema.StatusOtherDC {
		t.Fatalf("create a group dc2 orders: %v, want 4012", err)
	}
}

// TestAcksOfOtherDCsMessagesForwarded: acks of msgids this DC's store does
// not hold go to the DC whose node minted them.
func TestAcksOfOtherDCsMessagesForwarded(t *testing.T) {
	f, r := roomsFixture(t)
	f.s.store = emptyStore{}
	sess := f.online("gate-a", 1, 101, 1)
	dc2 := uint64(600) << 12 // node id 600: dc2's range
	dc1 := uint64(7) << 12
	if _, err := f.s.ack(context.Background(), sess, []uint64{dc2 | 1<<22, dc1 | 1<<22}, 3); err != nil {
		t.Fatal(err)
	}
	if len(r.acked) != 1 || len(r.acked["dc2"]) != 1 {
		t.Fatalf("acks forwarded %v, want the dc2 msgid to dc2", r.acked)
	}
}

// emptyStore holds nothing: every ack is of a msgid it does not have.
type emptyStore struct{ das.Store }

func (emptyStore) Ack(_ context.Context, _ das.Terminal, msgids []uint64) ([]*pb.C2CMessage, []uint64, error) {
	return nil, msgids, nil
}

// TestGroupPullAsksHomeWhenBehind: in a DC that does not order the
// group, a pull this DC's store has nothing for is answered by the home
// DC (replication may not have brought it yet); one it can answer is not.
func TestGroupPullAsksHomeWhenBehind(t *testing.T) {
	f, r := roomsFixture(t)
	r.home = "dc2"
	sess := f.online("gate-a", 1, 101, 1)
	ev := &pb.C2CMessage{Msgid: 1 << 22, From: &pb.User{}, To: &pb.User{}, GroupId: 9, Event: &pb.GroupEvent{}}
	if _, err := f.gs.CreateGroup(context.Background(), 9, []das.User{{Account: 1, UID: 1}}, 5, ev); err != nil {
		t.Fatal(err)
	}
	var resp pb.GroupPullResponse
	if err := f.request(sess, schema.CmdGroupPull, &pb.GroupPullRequest{GroupId: 9, AfterSeq: 0}, &resp); err != nil || len(resp.Messages) != 1 {
		t.Fatalf("pull from the start: %v, %d messages", err, len(resp.Messages))
	}
	if len(r.forwards) != 0 {
		t.Fatalf("a pull this DC could answer went to %v", r.forwards)
	}
	if err := f.request(sess, schema.CmdGroupPull, &pb.GroupPullRequest{GroupId: 9, AfterSeq: 1}, &resp); err != nil {
		t.Fatal(err)
	}
	if len(r.forwards) != 1 || r.forwards[0] != "dc2" {
		t.Fatalf("a pull beyond this DC's head went to %v, want dc2", r.forwards)
	}
}
