package platform

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// gtRec records what OnGroup showed one terminal, in order.
type gtRec struct {
	name string
	mu   sync.Mutex
	msgs []*pb.C2CMessage
}

func (r *gtRec) on(m *pb.C2CMessage) {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
}

// of returns what was shown of group id, in order.
func (r *gtRec) of(id uint64) []*pb.C2CMessage {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*pb.C2CMessage
	for _, m := range r.msgs {
		if m.GroupId == id {
			out = append(out, m)
		}
	}
	return out
}

type gtMember struct {
	Account uint32 `json:"account"`
	UID     uint64 `json:"uid"`
	JoinSeq uint64 `json:"join_seq,omitempty"`
}

type gtChange struct {
	GroupID string     `json:"group_id"`
	Seq     uint64     `json:"seq"`
	Members []gtMember `json:"members"`
}

// gtCall calls the group HTTP API with account 1's key and fails the test
// unless the answer is 200.
func gtCall(t *testing.T, p *Platform, method, path string, members []gtMember) gtChange {
	t.Helper()
	var body any
	if members != nil {
		body = map[string]any{"members": members}
	}
	var out gtChange
	if code := api(t, p, method, path, testAPIKey, body, &out); code != http.StatusOK {
		t.Fatalf("%s %s: HTTP %d", method, path, code)
	}
	return out
}

// gtCreate creates a group of members and returns its id.
func gtCreate(t *testing.T, p *Platform, members ...gtMember) uint64 {
	t.Helper()
	var out gtChange
	if code := api(t, p, "POST", "/v1/groups", testAPIKey, map[string]any{"members": members}, &out); code != http.StatusOK {
		t.Fatalf("create group: HTTP %d", code)
	}
	id, err := strconv.ParseUint(out.GroupID, 10, 64)
	if err != nil || id == 0 || out.Seq != 1 || len(out.Members) != len(members) {
		t.Fatalf("create group answered %+v", out)
	}
	return id
}

func gtUser(account uint32, uid uint64) gtMember { return gtMember{Account: account, UID: uid} }

// gtWait waits until every recorder shows n messages of group id.
func gtWait(t *testing.T, id uint64, n int, d time.Duration, recs ...*gtRec) {
	t.Helper()
	deadline := time.Now().Add(d)
	for _, r := range recs {
		for len(r.of(id)) < n && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := len(r.of(id)); got < n {
			t.Fatalf("%s: %d of %d messages of group %d shown", r.name, got, n, id)
		}
	}
}

// gtCheck checks that every recorder shows group id as exactly the seqs
// from..to, each once, in order, and that all show the same message at
// each seq. It returns the messages by seq.
func gtCheck(t *testing.T, id, from, to uint64, recs ...*gtRec) map[uint64]*pb.C2CMessage {
	t.Helper()
	time.Sleep(100 * time.Millisecond) // duplicates, if any, show up
	bySeq := map[uint64]*pb.C2CMessage{}
	for _, r := range recs {
		got := r.of(id)
		if uint64(len(got)) != to-from+1 {
			t.Fatalf("%s: %d messages of group %d shown, want %d (seqs %d..%d)", r.name, len(got), id, to-from+1, from, to)
		}
		msgids := map[uint64]bool{}
		for i, m := range got {
			if want := from + uint64(i); m.Seq != want {
				t.Fatalf("%s: message %d of group %d has seq %d, want %d (a gap, a duplicate or disorder)", r.name, i, id, m.Seq, want)
			}
			if msgids[m.Msgid] {
				t.Fatalf("%s: msgid %d shown twice", r.name, m.Msgid)
			}
			msgids[m.Msgid] = true
			if o := bySeq[m.Seq]; o == nil {
				bySeq[m.Seq] = m
			} else if o.Msgid != m.Msgid || string(o.Content) != string(m.Content) {
				t.Fatalf("%s: seq %d is msgid %d %q, another terminal shows msgid %d %q", r.name, m.Seq, m.Msgid, m.Content, o.Msgid, o.Content)
			}
		}
	}
	return bySeq
}

// gtCursorAt waits until c's cursor of group id (group-sync's acked_seq)
// is seq.
func gtCursorAt(t *testing.T, c *sdk.Client, id, seq uint64) {
	t.Helper()
	eventually(t, 10*time.Second, fmt.Sprintf("cursor of group %d at %d", id, seq), func() bool {
		var resp pb.GroupSyncResponse
		if err := c.Request(context.Background(), schema.CmdGroupSync, 0, &pb.GroupSyncRequest{}, &resp); err != nil {
			return false
		}
		for _, g := range resp.Groups {
			if g.GroupId == id {
				return g.AckedSeq == seq && g.HeadSeq == seq
			}
		}
		return false
	})
}

// gtSettled waits until group id left c's group-sync, which it does once
// c acked up to last, its removal or the dissolve (PROTOCOL.md, "Groups",
// rule 5).
func gtSettled(t *testing.T, c *sdk.Client, id, last uint64) {
	t.Helper()
	var got *pb.GroupState
	deadline := time.Now().Add(5 * time.Second)
	for {
		var resp pb.GroupSyncResponse
		err := c.Request(context.Background(), schema.CmdGroupSync, 0, &pb.GroupSyncRequest{}, &resp)
		got = nil
		for _, g := range resp.Groups {
			if g.GroupId == id {
				got = g
			}
		}
		if got != nil && (got.AckedSeq > last || got.HeadSeq != last) {
			t.Fatalf("group-sync shows group %d as %v, want head %d", id, got, last)
		}
		if err == nil && got == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group-sync still shows group %d as %v (err %v), want it gone once acked to %d", id, got, err, last)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// gtOpts sets OnGroup and fast retries.
func gtOpts(r *gtRec, more func(*sdk.Options)) func(*sdk.Options) {
	return func(o *sdk.Options) {
		o.OnGroup = r.on
		o.PageSize = 20
		o.SendBackoffMin, o.SendBackoffMax = 5*time.Millisecond, 100*time.Millisecond
		o.SendAttempts = 50
		if more != nil {
			more(o)
		}
	}
}

// TestGroupChatAllTerminals: three members (two of account 1 on terminals
// 101 and 102, one of account 2 on 201) send many messages at once from
// three terminals; every terminal, the senders' own and the senders'
// other terminals included, shows every message exactly once, in the same
// seq order, starting with the group's creation; each send's answer gives
// the seq the message is shown at. GET /v1/groups and the user's groups
// list agree.
func TestGroupChatAllTerminals(t *testing.T) {
	p := start(t, nil)
	id := gtCreate(t, p, gtUser(1, 1), gtUser(1, 2), gtUser(2, 3))
	type term struct {
		c   *sdk.Client
		rec *gtRec
	}
	var terms []term
	for _, tt := range []struct {
		app uint32
		uid uint64
	}{{101, 1}, {102, 1}, {101, 2}, {102, 2}, {201, 3}} {
		r := &gtRec{name: fmt.Sprintf("%d/%d", tt.app, tt.uid)}
		terms = append(terms, term{c: login(t, p, tt.app, tt.uid, gtOpts(r, nil)), rec: r})
	}
	recs := make([]*gtRec, len(terms))
	for i, tm := range terms {
		recs[i] = tm.rec
	}
	gtWait(t, id, 1, 5*time.Second, recs...) // the CREATED event

	const per = 60
	senders := []int{0, 2, 4} // 101/1, 101/2, 201/3
	answered := make([]map[uint64]string, len(senders))
	var wg sync.WaitGroup
	for i, si := range senders {
		answered[i] = map[uint64]string{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range per {
				content := fmt.Sprintf("%s-%03d", terms[si].rec.name, k)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				resp, err := terms[si].c.SendGroup(ctx, id, 0, []byte(content))
				cancel()
				if err != nil {
					t.Errorf("send %s: %v", content, err)
					return
				}
				answered[i][resp.Seq] = content
			}
		}()
	}
	wg.Wait()
	head := uint64(1 + per*len(senders))
	gtWait(t, id, int(head), 20*time.Second, recs...)
	bySeq := gtCheck(t, id, 1, head, recs...)
	for _, tm := range terms {
		gtCursorAt(t, tm.c, id, head)
	}
	if ev := bySeq[1].GetEvent(); ev.GetKind() != pb.GroupEventKind_GROUP_EVENT_CREATED || len(ev.GetUsers()) != 3 {
		t.Fatalf("seq 1 is %v, want the CREATED event of 3 users", bySeq[1])
	}
	for i := range senders {
		for seq, content := range answered[i] {
			if got := string(bySeq[seq].GetContent()); got != content {
				t.Fatalf("seq %d shown as %q, its send was answered for %q", seq, got, content)
			}
		}
	}

	var info struct {
		GroupID string     `json:"group_id"`
		Head    uint64     `json:"head"`
		Members []gtMember `json:"members"`
	}
	if code := api(t, p, "GET", fmt.Sprintf("/v1/groups/%d", id), testAPIKey, nil, &info); code != http.StatusOK || info.Head != head || len(info.Members) != 3 {
		t.Fatalf("GET group: HTTP %d %+v, want head %d and 3 members", code, info, head)
	}
	var mine struct {
		Groups []struct {
			GroupID string `json:"group_id"`
			JoinSeq uint64 `json:"join_seq"`
		} `json:"groups"`
	}
	if code := api(t, p, "GET", "/v1/users/2/3/groups", testAPIKey, nil, &mine); code != http.StatusOK || len(mine.Groups) != 1 || mine.Groups[0].GroupID != strconv.FormatUint(id, 10) || mine.Groups[0].JoinSeq != 1 {
		t.Fatalf("GET user groups: HTTP %d %+v", code, mine)
	}
}

// TestGroupOfflineCatchUp: a terminal that was offline while messages came
// catches up from its cursor after its next login, showing each message
// once (a new client on the same kept state); a terminal that never
// logged in shows the group from the start.
func TestGroupOfflineCatchUp(t *testing.T) {
	p := start(t, nil)
	id := gtCreate(t, p, gtUser(1, 1), gtUser(1, 2))
	sender := login(t, p, 101, 1, gtOpts(&gtRec{name: "sender"}, nil))
	statePath := filepath.Join(t.TempDir(), "state")
	open := func(r *gtRec) *sdk.Client {
		st, err := sdk.FileState(statePath, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = st.Close() })
		return login(t, p, 101, 2, gtOpts(r, func(o *sdk.Options) { o.State = st; o.DeviceID = "phone-2" }))
	}
	send := func(n int) {
		for k := range n {
			if _, err := sender.SendGroup(context.Background(), id, 0, []byte(fmt.Sprintf("m%d", k))); err != nil {
				t.Fatal(err)
			}
		}
	}
	first := &gtRec{name: "first run"}
	c := open(first)
	send(10)
	gtWait(t, id, 11, 5*time.Second, first)
	_ = c.Close()
	send(25) // seqs 12..36, stored while the terminal is offline
	again := &gtRec{name: "second run"}
	open(again)
	gtWait(t, id, 25, 10*time.Second, again)
	gtCheck(t, id, 12, 36, again)

	fresh := &gtRec{name: "102/2, first login"}
	login(t, p, 102, 2, gtOpts(fresh, nil))
	gtWait(t, id, 36, 10*time.Second, fresh)
	gtCheck(t, id, 1, 36, fresh)
}

// TestGroupMembershipWindow: a member added mid-stream sees nothing before
// its JOINED event; one removed sees its LEFT event and nothing after it,
// and its sends get 4008; after a dissolve, members see the DISSOLVED event
// last and sends get 4007. Sends to a group that never existed get 4007.
func TestGroupMembershipWindow(t *testing.T) {
	p := start(t, nil)
	id := gtCreate(t, p, gtUser(1, 1), gtUser(1, 2))
	r1, r2, r3 := &gtRec{name: "101/1"}, &gtRec{name: "101/2"}, &gtRec{name: "201/3"}
	c1 := login(t, p, 101, 1, gtOpts(r1, nil))
	c2 := login(t, p, 101, 2, gtOpts(r2, nil))
	c3 := login(t, p, 201, 3, gtOpts(r3, nil))
	send := func(c *sdk.Client, n int) {
		t.Helper()
		for k := range n {
			if _, err := c.SendGroup(context.Background(), id, 0, []byte(fmt.Sprintf("x%d", k))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := c3.SendGroup(context.Background(), id, 0, []byte("not yet")); statusOf(err) != schema.StatusNotMember {
		t.Fatalf("send before joining: %v, want 4008", err)
	}
	send(c1, 5) // 2..6
	join := gtCall(t, p, "POST", fmt.Sprintf("/v1/groups/%d/members", id), []gtMember{gtUser(2, 3)})
	if join.Seq != 7 || len(join.Members) != 1 {
		t.Fatalf("add member answered %+v, want seq 7", join)
	}
	var info7 struct {
		Members []gtMember `json:"members"`
	}
	if code := api(t, p, "GET", fmt.Sprintf("/v1/groups/%d", id), testAPIKey, nil, &info7); code != http.StatusOK || len(info7.Members) != 3 {
		t.Fatalf("GET group after the join: HTTP %d %+v", code, info7)
	}
	for _, m := range info7.Members {
		if want := map[uint64]uint64{1: 1, 2: 1, 3: 7}[m.UID]; m.JoinSeq != want {
			t.Fatalf("member %+v, want join_seq %d", m, want)
		}
	}
	send(c3, 3) // 8..10
	send(c1, 2) // 11, 12
	leave := gtCall(t, p, "DELETE", fmt.Sprintf("/v1/groups/%d/members", id), []gtMember{gtUser(1, 2)})
	if leave.Seq != 13 {
		t.Fatalf("remove member answered %+v, want seq 13", leave)
	}
	if _, err := c2.SendGroup(context.Background(), id, 0, []byte("gone")); statusOf(err) != schema.StatusNotMember {
		t.Fatalf("send after removal: %v, want 4008", err)
	}
	send(c1, 3) // 14..16
	dissolve := gtCall(t, p, "DELETE", fmt.Sprintf("/v1/groups/%d", id), nil)
	if dissolve.Seq != 17 {
		t.Fatalf("dissolve answered %+v, want seq 17", dissolve)
	}
	if _, err := c1.SendGroup(context.Background(), id, 0, []byte("late")); statusOf(err) != schema.StatusUnknownGroup {
		t.Fatalf("send after dissolve: %v, want 4007", err)
	}
	if _, err := c1.SendGroup(context.Background(), id+12345, 0, []byte("nowhere")); statusOf(err) != schema.StatusUnknownGroup {
		t.Fatalf("send to an unknown group: %v, want 4007", err)
	}

	gtWait(t, id, 17, 10*time.Second, r1)
	gtWait(t, id, 13, 10*time.Second, r2)
	gtWait(t, id, 11, 10*time.Second, r3)
	all := gtCheck(t, id, 1, 17, r1)
	gtCheck(t, id, 1, 13, r2)
	gtCheck(t, id, 7, 17, r3)
	for seq, kind := range map[uint64]pb.GroupEventKind{1: pb.GroupEventKind_GROUP_EVENT_CREATED, 7: pb.GroupEventKind_GROUP_EVENT_JOINED, 13: pb.GroupEventKind_GROUP_EVENT_LEFT, 17: pb.GroupEventKind_GROUP_EVENT_DISSOLVED} {
		if got := all[seq].GetEvent().GetKind(); got != kind {
			t.Fatalf("seq %d is %v, want event %v", seq, all[seq], kind)
		}
	}
	if ev := all[13].GetEvent(); len(ev.GetUsers()) != 1 || ev.GetUsers()[0].GetUid() != 2 {
		t.Fatalf("LEFT event %v, want user 2", ev)
	}
	// The removed member and the members of the dissolved group ack up
	// to their last seq, and the group leaves their group-sync.
	for _, x := range []struct {
		c    *sdk.Client
		last uint64
	}{{c1, 17}, {c2, 13}, {c3, 17}} {
		gtSettled(t, x.c, id, x.last)
	}
	var info map[string]any
	if code := api(t, p, "GET", fmt.Sprintf("/v1/groups/%d", id), testAPIKey, nil, &info); code != http.StatusBadRequest && code != http.StatusNotFound {
		t.Fatalf("GET a dissolved group: HTTP %d %v", code, info)
	}
}

// TestGroupConnectionCuts: three senders on a group of three members on
// five terminals while connections are cut at random through a proxy.
// Counting: every terminal shows every message whose send was answered,
// and the group's events, exactly once in seq order, the same message at
// each seq; every cursor ends at the head.
func TestGroupConnectionCuts(t *testing.T) {
	per := 400
	if raceEnabled || testing.Short() {
		per = 100
	}
	p := start(t, nil)
	px := newProxy(t, p.GatewayAddr())
	id := gtCreate(t, p, gtUser(1, 1), gtUser(1, 2), gtUser(2, 3))
	type term struct {
		c   *sdk.Client
		rec *gtRec
	}
	var terms []term
	for _, tt := range []struct {
		app uint32
		uid uint64
	}{{101, 1}, {102, 1}, {101, 2}, {102, 2}, {201, 3}} {
		r := &gtRec{name: fmt.Sprintf("%d/%d", tt.app, tt.uid)}
		c := login(t, p, tt.app, tt.uid, gtOpts(r, func(o *sdk.Options) {
			o.Addrs = []string{px.addr()}
			o.BackoffMin, o.BackoffMax = 5*time.Millisecond, 50*time.Millisecond
			o.RequestTimeout = 3 * time.Second
		}))
		terms = append(terms, term{c: c, rec: r})
	}
	recs := make([]*gtRec, len(terms))
	for i, tm := range terms {
		recs[i] = tm.rec
	}

	stop := make(chan struct{})
	var cuts atomic.Int64
	var chaos sync.WaitGroup
	chaos.Add(1)
	go func() {
		defer chaos.Done()
		r := rand.New(rand.NewPCG(3, 4))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(1+r.IntN(5)) * time.Millisecond):
				if px.cutOne(r) {
					cuts.Add(1)
				}
			}
		}
	}()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for _, si := range []int{0, 2, 4} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range per {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := terms[si].c.SendGroup(ctx, id, 0, []byte(fmt.Sprintf("%s-%04d", terms[si].rec.name, k)))
				cancel()
				if err != nil {
					failed.Add(1)
					t.Errorf("send: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	chaos.Wait()
	if failed.Load() > 0 {
		t.FailNow()
	}
	if cuts.Load() < 10 {
		t.Fatalf("only %d connections cut: the test proves little", cuts.Load())
	}
	head := uint64(1 + 3*per)
	gtWait(t, id, int(head), 60*time.Second, recs...)
	gtCheck(t, id, 1, head, recs...)
	for _, tm := range terms {
		gtCursorAt(t, tm.c, id, head)
	}
	t.Logf("%d messages on %d terminals, %d connections cut", head, len(terms), cuts.Load())
}

// gtErr is the error body of the HTTP API.
type gtErr struct {
	Error struct {
		Code uint16 `json:"code"`
	} `json:"error"`
}

// TestGroupHTTPErrors: a group created with an id of the app's choosing
// keeps it; the same id again is 4010 (HTTP 409); an unknown group is 4007
// (HTTP 404) to read, change or dissolve.
func TestGroupHTTPErrors(t *testing.T) {
	p := start(t, nil)
	var out gtChange
	body := map[string]any{"group_id": "777", "members": []gtMember{gtUser(1, 1)}}
	if code := api(t, p, "POST", "/v1/groups", testAPIKey, body, &out); code != http.StatusOK || out.GroupID != "777" || out.Seq != 1 {
		t.Fatalf("create group 777: HTTP %d %+v", code, out)
	}
	var e gtErr
	if code := api(t, p, "POST", "/v1/groups", testAPIKey, body, &e); code != http.StatusConflict || e.Error.Code != uint16(schema.StatusGroupExists) {
		t.Fatalf("create group 777 again: HTTP %d %+v, want 409 and 4010", code, e)
	}
	for _, c := range []struct {
		method, path string
		body         any
	}{
		{"GET", "/v1/groups/778", nil},
		{"POST", "/v1/groups/778/members", map[string]any{"members": []gtMember{gtUser(1, 2)}}},
		{"DELETE", "/v1/groups/778/members", map[string]any{"members": []gtMember{gtUser(1, 2)}}},
		{"DELETE", "/v1/groups/778", nil},
	} {
		e = gtErr{}
		if code := api(t, p, c.method, c.path, testAPIKey, c.body, &e); code != http.StatusNotFound || e.Error.Code != uint16(schema.StatusUnknownGroup) {
			t.Fatalf("%s %s: HTTP %d %+v, want 404 and 4007", c.method, c.path, code, e)
		}
	}
}

// TestGroupLeavesSyncAfterAck: PROTOCOL.md, "Groups", rule 5: after its
// removal (or a dissolve) a group leaves the terminal's group-sync once the
// terminal acked up to it.
func TestGroupLeavesSyncAfterAck(t *testing.T) {
	p := start(t, nil)
	id := gtCreate(t, p, gtUser(1, 1), gtUser(1, 2))
	r := &gtRec{name: "101/2"}
	c := login(t, p, 101, 2, gtOpts(r, nil))
	gtCall(t, p, "DELETE", fmt.Sprintf("/v1/groups/%d/members", id), []gtMember{gtUser(1, 2)})
	gtWait(t, id, 2, 5*time.Second, r)
	eventually(t, 5*time.Second, "the group gone from group-sync", func() bool {
		var resp pb.GroupSyncResponse
		if err := c.Request(context.Background(), schema.CmdGroupSync, 0, &pb.GroupSyncRequest{}, &resp); err != nil {
			return false
		}
		return len(resp.Groups) == 0
	})
}
