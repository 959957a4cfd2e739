package sdk

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// orderedServer emulates the platform's side of ordered sends: a send
// naming a predecessor that is not stored gets 3005; the others are
// stored (once per client id) in the order they arrive, unless fail says
// to answer this try with an error.
type orderedServer struct {
	mu     sync.Mutex
	stored []string          // client ids in the order they were stored
	msgid  map[string]uint64 // client id -> msgid
	tries  []*pb.C2CSendRequest
	flags  []uint8
	fail   func(req *pb.C2CSendRequest, try int) schema.Status
	hold   chan struct{} // when set, the first send waits for it
}

func (o *orderedServer) handle(t *testing.T) func(h schema.Header, body []byte) (schema.Status, proto.Message, bool) {
	return func(h schema.Header, body []byte) (schema.Status, proto.Message, bool) {
		if h.Cmd != schema.CmdC2CSend {
			resp, _ := answer(h.Cmd)
			return schema.StatusOK, resp, false
		}
		req := new(pb.C2CSendRequest)
		if err := proto.Unmarshal(body, req); err != nil {
			t.Errorf("send request: %v", err)
		}
		o.mu.Lock()
		hold := o.hold
		o.hold = nil
		o.mu.Unlock()
		if hold != nil {
			<-hold
		}
		o.mu.Lock()
		defer o.mu.Unlock()
		o.tries = append(o.tries, req)
		o.flags = append(o.flags, h.Flags)
		n := 0
		for _, r := range o.tries {
			if r.ClientMsgId == req.ClientMsgId {
				n++
			}
		}
		if o.fail != nil {
			if st := o.fail(req, n); st != schema.StatusOK {
				return st, nil, false
			}
		}
		if id, ok := o.msgid[req.ClientMsgId]; ok {
			return schema.StatusOK, &pb.C2CSendResponse{Msgid: id, Duplicate: true}, false
		}
		if p := req.AfterClientMsgId; p != "" {
			if _, ok := o.msgid[p]; !ok {
				return schema.StatusOutOfOrder, nil, false
			}
		}
		id := uint64(1000 + len(o.stored))
		if id <= req.AfterMsgid {
			t.Errorf("send %s: floor %d above what this server mints", req.ClientMsgId, req.AfterMsgid)
		}
		o.msgid[req.ClientMsgId] = id
		o.stored = append(o.stored, req.ClientMsgId)
		return schema.StatusOK, &pb.C2CSendResponse{Msgid: id}, false
	}
}

func orderedClient(t *testing.T, o *orderedServer) *Client {
	t.Helper()
	fs := newFakeServer(t, o.handle(t))
	c, err := Dial(context.Background(), Options{Addrs: []string{fs.addr()}, SendBackoffMin: time.Millisecond, SendBackoffMax: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if _, err := c.Login(context.Background(), Credentials{AppCode: 1, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestSendsPipelined: consecutive SendC2CAsync calls are all written
// before the first is answered, flagged ordered, each naming the one
// before it, and are stored in call order.
func TestSendsPipelined(t *testing.T) {
	hold := make(chan struct{})
	o := &orderedServer{msgid: map[string]uint64{}, hold: hold}
	c := orderedClient(t, o)
	ctx := context.Background()
	var sends []*AsyncSend
	var ids []string
	written := make(chan struct{})
	go func() {
		defer close(written)
		for i := range 8 {
			a := c.SendC2CAsync(ctx, &pb.User{Account: 1, Uid: 3}, 1, []byte{byte(i)})
			sends, ids = append(sends, a), append(ids, a.ClientMsgID)
		}
	}()
	// All eight calls return while the server holds the first answer:
	// they do not wait for it.
	select {
	case <-written:
	case <-time.After(5 * time.Second):
		t.Fatal("SendC2CAsync waited for the answer to an earlier send")
	}
	close(hold)
	for i, a := range sends {
		resp, err := a.Wait(ctx)
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if resp.Msgid != uint64(1000+i) {
			t.Fatalf("send %d answered msgid %d, want %d", i, resp.Msgid, 1000+i)
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if !slices.Equal(o.stored, ids) {
		t.Fatalf("stored %v, want call order %v", o.stored, ids)
	}
	if len(o.tries) != len(ids) {
		t.Fatalf("%d tries for %d sends: none should have been retried", len(o.tries), len(ids))
	}
	for i, r := range o.tries {
		want := ""
		if i > 0 {
			want = ids[i-1]
		}
		if r.AfterClientMsgId != want || o.flags[i]&schema.FlagOrdered == 0 {
			t.Fatalf("try %d names %q (flags %#x), want %q and the ordered flag", i, r.AfterClientMsgId, o.flags[i], want)
		}
	}
}

// TestOrderedRetries: when a send fails, the sends written after it are
// refused (3005) and go again after it, one after another, so the store
// order is the call order; a send that fails for good is no predecessor.
func TestOrderedRetries(t *testing.T) {
	o := &orderedServer{msgid: map[string]uint64{}}
	var ids []string
	o.fail = func(req *pb.C2CSendRequest, try int) schema.Status {
		switch {
		case req.ClientMsgId == ids[1] && try == 1:
			return schema.StatusUnavailable // retried
		case req.ClientMsgId == ids[3]:
			return schema.StatusContentTooLarge // final
		}
		return schema.StatusOK
	}
	c := orderedClient(t, o)
	ctx := context.Background()
	for range 6 {
		ids = append(ids, NewClientMsgID())
	}
	var sends []*AsyncSend
	for i, id := range ids {
		sends = append(sends, c.sendOrdered(ctx, &pb.C2CSendRequest{To: &pb.User{Account: 1, Uid: 3}, ClientMsgId: id, Content: []byte{byte(i)}}, 1))
	}
	for i, a := range sends {
		_, err := a.Wait(ctx)
		if (err != nil) != (i == 3) {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	want := []string{ids[0], ids[1], ids[2], ids[4], ids[5]}
	o.mu.Lock()
	defer o.mu.Unlock()
	if !slices.Equal(o.stored, want) {
		t.Fatalf("stored %v, want %v", o.stored, want)
	}
}

// TestReceiptsExpanded: a receipt the server sent for several messages
// reaches OnReceipt once per msgid, in order; a receipt of one as it is.
func TestReceiptsExpanded(t *testing.T) {
	fs := newFakeServer(t, func(h schema.Header, _ []byte) (schema.Status, proto.Message, bool) {
		resp, _ := answer(h.Cmd)
		return schema.StatusOK, resp, false
	})
	got := make(chan *pb.C2CReceipt, 8)
	c, err := Dial(context.Background(), Options{Addrs: []string{fs.addr()}, OnReceipt: func(r *pb.C2CReceipt) { got <- r }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Login(context.Background(), Credentials{AppCode: 1, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
	by := &pb.User{Account: 1, Uid: 9}
	fs.push(schema.CmdC2CReceipt, &pb.C2CReceipt{Msgid: 5, By: by, ByAppcode: 101, AtMs: 77, Msgids: []uint64{5, 6, 8}})
	fs.push(schema.CmdC2CReceipt, &pb.C2CReceipt{Msgid: 9, By: by, ByAppcode: 101, AtMs: 78})
	for _, want := range []uint64{5, 6, 8, 9} {
		select {
		case r := <-got:
			if r.Msgid != want || len(r.Msgids) != 0 || r.By.GetUid() != 9 || r.ByAppcode != 101 {
				t.Fatalf("receipt %v, want msgid %d by 1/9 on 101 with no msgids list", r, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no receipt for %d", want)
		}
	}
}

// TestSendC2CJoinsChainOnlyBehindAsync: a SendC2C made while no ordered
// send is in flight goes unflagged (concurrent calls run side by side);
// one made while a SendC2CAsync is in flight queues behind it, naming it.
func TestSendC2CJoinsChainOnlyBehindAsync(t *testing.T) {
	o := &orderedServer{msgid: map[string]uint64{}}
	c := orderedClient(t, o)
	ctx := context.Background()
	to := &pb.User{Account: 1, Uid: 3}
	if _, err := c.SendC2C(ctx, to, 1, []byte("plain")); err != nil {
		t.Fatal(err)
	}
	hold := make(chan struct{})
	o.mu.Lock()
	o.hold = hold
	o.mu.Unlock()
	a := c.SendC2CAsync(ctx, to, 1, []byte("async"))
	done := make(chan error, 1)
	go func() {
		_, err := c.SendC2C(ctx, to, 1, []byte("behind"))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let "behind" be written
	close(hold)
	if _, err := a.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.tries) != 3 {
		t.Fatalf("%d tries, want 3", len(o.tries))
	}
	if o.flags[0]&schema.FlagOrdered != 0 || o.tries[0].AfterClientMsgId != "" {
		t.Fatalf("a SendC2C with nothing in flight went ordered (flags %#x, after %q)", o.flags[0], o.tries[0].AfterClientMsgId)
	}
	if o.flags[2]&schema.FlagOrdered == 0 || o.tries[2].AfterClientMsgId != a.ClientMsgID {
		t.Fatalf("a SendC2C behind an async send: flags %#x, after %q; want ordered after %q", o.flags[2], o.tries[2].AfterClientMsgId, a.ClientMsgID)
	}
	if !slices.Equal(o.stored, []string{o.tries[0].ClientMsgId, a.ClientMsgID, o.tries[2].ClientMsgId}) {
		t.Fatalf("stored %v, not in call order", o.stored)
	}
}
