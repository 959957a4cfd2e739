package platform

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// received collects what OnC2C delivered to one terminal.
type received struct {
	mu   sync.Mutex
	msgs []*pb.C2CMessage
	slow time.Duration
}

func (r *received) on(m *pb.C2CMessage) {
	if r.slow > 0 {
		time.Sleep(r.slow)
	}
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
}

func (r *received) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.msgs)
}

func (r *received) contents() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, len(r.msgs))
	for i, m := range r.msgs {
		out[i] = string(m.Content)
	}
	return out
}

type receipts struct {
	mu sync.Mutex
	rs []*pb.C2CReceipt
}

func (r *receipts) on(x *pb.C2CReceipt) {
	r.mu.Lock()
	r.rs = append(r.rs, x)
	r.mu.Unlock()
}

func (r *receipts) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.rs)
}

// chatter logs in a client that receives c2c messages into rec.
func chatter(t *testing.T, p *Platform, appcode uint32, uid uint64, rec *received, rc *receipts, mod func(*sdk.Options)) *sdk.Client {
	t.Helper()
	return login(t, p, appcode, uid, func(o *sdk.Options) {
		o.OnC2C = rec.on
		if rc != nil {
			o.OnReceipt = rc.on
		}
		if mod != nil {
			mod(o)
		}
	})
}

func inboxCount(t *testing.T, c *sdk.Client) uint64 {
	t.Helper()
	r, err := c.OfflineCount(context.Background())
	if err != nil {
		t.Fatalf("offline count: %v", err)
	}
	return r.Count
}

var (
	acct1 = func(uid uint64) *pb.User { return &pb.User{Account: 1, Uid: uid} }
	ctxb  = context.Background()
)

// TestC2COnlineBothTerminals: a message reaches every online terminal of
// the recipient, each acks, the inboxes empty and the sender gets one
// delivered receipt per terminal.
func TestC2COnlineBothTerminals(t *testing.T) {
	p := start(t, nil)
	var aliceRc receipts
	var phone, pc received
	alice := chatter(t, p, 101, 1, &received{}, &aliceRc, nil)
	bobPhone := chatter(t, p, 101, 2, &phone, nil, nil)
	bobPC := chatter(t, p, 102, 2, &pc, nil, nil)

	resp, err := alice.SendC2C(ctxb, acct1(2), 7, []byte("hello bob"))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msgid == 0 || resp.Duplicate || resp.StoredAtMs == 0 {
		t.Fatalf("send response %+v", resp)
	}
	for name, r := range map[string]*received{"phone": &phone, "pc": &pc} {
		eventually(t, 5*time.Second, name+" got the message", func() bool { return r.len() == 1 })
		m := r.msgs[0]
		if m.Msgid != resp.Msgid || string(m.Content) != "hello bob" || m.From.GetUid() != 1 || m.FromAppcode != 101 || m.Msgtype != 7 || m.To.GetUid() != 2 {
			t.Fatalf("%s got %+v", name, m)
		}
	}
	eventually(t, 5*time.Second, "two delivered receipts", func() bool { return aliceRc.len() == 2 })
	by := map[uint32]bool{}
	for _, r := range aliceRc.rs {
		if r.Msgid != resp.Msgid || r.By.GetUid() != 2 {
			t.Fatalf("receipt %+v", r)
		}
		by[r.ByAppcode] = true
	}
	if !by[101] || !by[102] {
		t.Fatalf("receipts from appcodes %v, want 101 and 102", by)
	}
	for _, c := range []*sdk.Client{bobPhone, bobPC} {
		if n := inboxCount(t, c); n != 0 {
			t.Fatalf("inbox holds %d after the ack", n)
		}
	}
}

// TestC2COfflinePaging: messages sent while the recipient is offline wait
// in each terminal's inbox and arrive in order, in pages, at the next login.
func TestC2COfflinePaging(t *testing.T) {
	p := start(t, nil)
	alice := chatter(t, p, 101, 1, &received{}, nil, nil)
	const n = 123
	for i := range n {
		if _, err := alice.SendC2C(ctxb, acct1(2), 0, fmt.Appendf(nil, "m%03d", i)); err != nil {
			t.Fatal(err)
		}
	}
	var phone received
	bob := chatter(t, p, 101, 2, &phone, nil, func(o *sdk.Options) { o.PageSize = 10 })
	eventually(t, 10*time.Second, "all offline messages", func() bool { return phone.len() >= n })
	got := phone.contents()
	for i := range n {
		if got[i] != fmt.Sprintf("m%03d", i) {
			t.Fatalf("message %d is %q: order broken", i, got[i])
		}
	}
	eventually(t, 5*time.Second, "inbox empty", func() bool { return inboxCount(t, bob) == 0 })
	// The other terminal has its own inbox, untouched by the phone's acks.
	var pc received
	chatter(t, p, 102, 2, &pc, nil, nil)
	eventually(t, 10*time.Second, "pc got them too", func() bool { return pc.len() == n })
	time.Sleep(100 * time.Millisecond)
	if phone.len() != n {
		t.Fatalf("phone got %d messages, want exactly %d", phone.len(), n)
	}
}

// TestC2CArrivalsWhilePaging: messages that arrive while a terminal pages
// through a long inbox are neither lost nor doubled, and each sender's
// order holds.
func TestC2CArrivalsWhilePaging(t *testing.T) {
	p := start(t, nil)
	alice := chatter(t, p, 101, 1, &received{}, nil, nil)
	carol := chatter(t, p, 101, 3, &received{}, nil, nil)
	for i := range 60 {
		if _, err := alice.SendC2C(ctxb, acct1(2), 0, fmt.Appendf(nil, "a%03d", i)); err != nil {
			t.Fatal(err)
		}
	}
	phone := received{slow: 2 * time.Millisecond}
	chatter(t, p, 101, 2, &phone, nil, func(o *sdk.Options) { o.PageSize = 7 })
	var wg sync.WaitGroup
	for _, s := range []struct {
		c      *sdk.Client
		prefix string
		from   int
	}{{alice, "a", 60}, {carol, "c", 0}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := s.from; i < s.from+60; i++ {
				if _, err := s.c.SendC2C(ctxb, acct1(2), 0, fmt.Appendf(nil, "%s%03d", s.prefix, i)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	eventually(t, 10*time.Second, "all 180 messages", func() bool { return phone.len() >= 180 })
	time.Sleep(100 * time.Millisecond)
	if testing.Verbose() {
		t.Logf("delivered: %v", phone.contents())
	}
	checkOnceInOrder(t, phone.contents(), map[string]int{"a": 120, "c": 60})
}

// checkOnceInOrder checks every message of each sender prefix arrived once
// and in the order sent (content is prefix + 3-digit sequence).
func checkOnceInOrder(t *testing.T, got []string, want map[string]int) {
	t.Helper()
	last := map[string]int{}
	seen := map[string]bool{}
	for _, c := range got {
		if seen[c] {
			t.Fatalf("%q delivered twice", c)
		}
		seen[c] = true
		prefix := strings.TrimRight(c, "0123456789")
		seq, err := strconv.Atoi(c[len(prefix):])
		if err != nil {
			t.Fatalf("content %q: %v", c, err)
		}
		if prev, ok := last[prefix]; ok && seq <= prev {
			t.Fatalf("sender %q: %d after %d", prefix, seq, prev)
		}
		last[prefix] = seq
	}
	total := 0
	for _, n := range want {
		total += n
	}
	if len(got) != total {
		t.Fatalf("got %d messages, want %d", len(got), total)
	}
}

// TestC2CIdempotentRetry: a retried send with the same client message id
// returns the first msgid and stores nothing new.
func TestC2CIdempotentRetry(t *testing.T) {
	p := start(t, nil)
	alice := chatter(t, p, 101, 1, &received{}, nil, nil)
	var phone received
	chatter(t, p, 101, 2, &phone, nil, nil)
	id := sdk.NewClientMsgID()
	first, err := alice.SendC2CWithID(ctxb, acct1(2), 0, id, []byte("once"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			again, err := alice.SendC2CWithID(ctxb, acct1(2), 0, id, []byte("once"))
			if err != nil || again.Msgid != first.Msgid || !again.Duplicate {
				t.Errorf("retry: %+v %v, want msgid %d duplicate", again, err, first.Msgid)
			}
		}()
	}
	wg.Wait()
	eventually(t, 5*time.Second, "delivered", func() bool { return phone.len() == 1 })
	h, err := alice.SyncHistory(ctxb, nil, 0, 100)
	if err != nil || len(h.Messages) != 1 {
		t.Fatalf("history after retries: %v %v", h, err)
	}
	time.Sleep(100 * time.Millisecond)
	if phone.len() != 1 {
		t.Fatalf("delivered %d times", phone.len())
	}
}

// TestHistorySync: both sides of a conversation from any device, filtered
// by peer, paged by since.
func TestHistorySync(t *testing.T) {
	p := start(t, nil)
	alice := chatter(t, p, 101, 1, &received{}, nil, nil)
	bob := chatter(t, p, 101, 2, &received{}, nil, nil)
	carol := chatter(t, p, 101, 3, &received{}, nil, nil)
	send := func(c *sdk.Client, to uint64, s string) uint64 {
		r, err := c.SendC2C(ctxb, acct1(to), 0, []byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return r.Msgid
	}
	send(alice, 2, "a->b 1")
	send(bob, 1, "b->a 1")
	send(carol, 1, "c->a 1")
	mid := send(alice, 2, "a->b 2")
	send(bob, 1, "b->a 2")

	// Alice's other device (the pc) sees everything.
	pc := chatter(t, p, 102, 1, &received{}, nil, nil)
	all, err := pc.SyncHistory(ctxb, nil, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range all.Messages {
		got = append(got, string(m.Content))
	}
	if strings.Join(got, ",") != "a->b 1,b->a 1,c->a 1,a->b 2,b->a 2" || all.More {
		t.Fatalf("alice's history %q more=%v", got, all.More)
	}
	withBob, err := pc.SyncHistory(ctxb, acct1(2), 0, 100)
	if err != nil || len(withBob.Messages) != 4 {
		t.Fatalf("history with bob: %v %v", withBob, err)
	}
	since, err := pc.SyncHistory(ctxb, acct1(2), mid, 100)
	if err != nil || len(since.Messages) != 1 || string(since.Messages[0].Content) != "b->a 2" {
		t.Fatalf("history since %d: %v %v", mid, since, err)
	}
	page, err := pc.SyncHistory(ctxb, nil, 0, 2)
	if err != nil || len(page.Messages) != 2 || !page.More {
		t.Fatalf("first page of 2: %v %v", page, err)
	}
	// Carol sees only her own conversation.
	ch, err := carol.SyncHistory(ctxb, nil, 0, 100)
	if err != nil || len(ch.Messages) != 1 {
		t.Fatalf("carol's history: %v %v", ch, err)
	}
}

// TestC2CBadInput: each bad request gets its status, nothing is stored and
// the connection stays usable.
func TestC2CBadInput(t *testing.T) {
	p := start(t, nil)
	alice := chatter(t, p, 101, 1, &received{}, nil, nil)
	var phone received
	bob := chatter(t, p, 101, 2, &phone, nil, nil)
	big := make([]byte, 16<<10+1)
	cases := []struct {
		name string
		cmd  schema.Cmd
		req  *pb.C2CSendRequest
		want schema.Status
	}{
		{"no recipient", schema.CmdC2CSend, &pb.C2CSendRequest{Content: []byte("x")}, schema.StatusBadRecipient},
		{"uid 0", schema.CmdC2CSend, &pb.C2CSendRequest{To: acct1(0), Content: []byte("x")}, schema.StatusBadRecipient},
		{"unknown account", schema.CmdC2CSend, &pb.C2CSendRequest{To: &pb.User{Account: 99, Uid: 2}, Content: []byte("x")}, schema.StatusBadRecipient},
		{"empty content", schema.CmdC2CSend, &pb.C2CSendRequest{To: acct1(2)}, schema.StatusEmptyContent},
		{"oversized content", schema.CmdC2CSend, &pb.C2CSendRequest{To: acct1(2), Content: big}, schema.StatusContentTooLarge},
		{"long client id", schema.CmdC2CSend, &pb.C2CSendRequest{To: acct1(2), Content: []byte("x"), ClientMsgId: strings.Repeat("x", 65)}, schema.StatusBadArgument},
	}
	for _, tc := range cases {
		id := tc.req.ClientMsgId
		if id == "" {
			id = sdk.NewClientMsgID()
		}
		_, err := alice.SendC2CWithID(ctxb, tc.req.To, 0, id, tc.req.Content)
		if statusOf(err) != tc.want {
			t.Errorf("%s: %v, want status %d", tc.name, err, tc.want)
		}
	}
	// Bodies that are not valid protobuf (a length running past the end).
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 4, 1)
	for i, cmd := range []schema.Cmd{schema.CmdC2CSend, schema.CmdOfflinePull, schema.CmdOfflineCount, schema.CmdHistorySync, schema.CmdC2CAck} {
		seq := uint32(10 + i)
		r.writeBytes(schema.AppendFrame(nil, &schema.Header{Cmd: cmd, Seq: seq}, []byte{0x0a, 0x10, 'a'}))
		if h := r.readError(schema.StatusBadBody); h.Seq != seq {
			t.Errorf("%s: error for seq %d, want %d", cmd, h.Seq, seq)
		}
	}
	// Page sizes and limits out of range.
	if err := bob.Request(ctxb, schema.CmdOfflinePull, 0, &pb.OfflinePullRequest{PageSize: 1 << 31}, nil); statusOf(err) != schema.StatusBadArgument {
		t.Errorf("huge page: %v", err)
	}
	if err := bob.Request(ctxb, schema.CmdHistorySync, 0, &pb.HistorySyncRequest{Limit: 100000}, nil); statusOf(err) != schema.StatusBadArgument {
		t.Errorf("huge history limit: %v", err)
	}
	if err := bob.Request(ctxb, schema.CmdHistorySync, 0, &pb.HistorySyncRequest{Peer: acct1(0)}, nil); statusOf(err) != schema.StatusBadRecipient {
		t.Errorf("history peer uid 0: %v", err)
	}
	// An ack of msgids the terminal never got removes nothing.
	ok, err := alice.SendC2C(ctxb, acct1(3), 0, []byte("for carol"))
	if err != nil {
		t.Fatal(err)
	}
	var ack pb.C2CAckResponse
	if err := bob.Request(ctxb, schema.CmdC2CAck, 0, &pb.C2CAckRequest{Msgids: []uint64{ok.Msgid, 12345}}, &ack); err != nil || ack.Acked != 0 {
		t.Fatalf("foreign ack: %+v %v", &ack, err)
	}
	var carol received
	chatter(t, p, 101, 3, &carol, nil, nil)
	eventually(t, 5*time.Second, "carol still gets her message", func() bool { return carol.len() == 1 })
	// Nothing was stored for bob, and both connections still work.
	if n := inboxCount(t, bob); n != 0 || phone.len() != 0 {
		t.Fatalf("bad requests reached bob: inbox %d, delivered %d", n, phone.len())
	}
	if _, err := alice.SendC2C(ctxb, acct1(2), 0, []byte("fine")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "a good message after the bad ones", func() bool { return phone.len() == 1 })
}
