package scenario

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

func TestParseNotifies(t *testing.T) {
	body, _ := proto.Marshal(&pb.S2CNotify{PushId: 1 << 40, Msgtype: 3, Content: []byte("hello"), SentAtMs: 99, NeedAck: true})
	id, content, needAck, ok := parseS2CNotify(body)
	if !ok || id != 1<<40 || string(content) != "hello" || !needAck {
		t.Fatalf("s2c: %v %q %v %v", id, content, needAck, ok)
	}
	if _, _, _, ok := parseS2CNotify(body[:len(body)-3]); ok {
		t.Fatal("a cut s2c body parsed")
	}
	gn := &pb.GroupNotify{GroupId: 77, Messages: []*pb.C2CMessage{
		{Msgid: 1, Seq: 5, Content: []byte("a"), From: &pb.User{Account: 1, Uid: 2}, GroupId: 77},
		{Msgid: 2, Seq: 6, Event: &pb.GroupEvent{}, GroupId: 77},
	}}
	body, _ = proto.Marshal(gn)
	var got []string
	ok = parseGroupNotify(body, func(gid, seq uint64, content []byte, event bool) {
		got = append(got, string(content))
		if gid != 77 || (seq != 5 && seq != 6) || event != (seq == 6) {
			t.Errorf("message gid %d seq %d event %v", gid, seq, event)
		}
	})
	if !ok || len(got) != 2 || got[0] != "a" {
		t.Fatalf("group: ok %v, %q", ok, got)
	}
}

// fakeGateway logs lean clients in and lets a test talk to each.
type fakeGateway struct {
	t      *testing.T
	ln     net.Listener
	kaMs   uint32
	mu     sync.Mutex
	conns  map[uint64]net.Conn // by uid
	frames chan fakeFrame      // what the clients sent after login
}

type fakeFrame struct {
	uid uint64
	h   schema.Header
	b   []byte
}

func newFakeGateway(t *testing.T, kaMs uint32) *fakeGateway {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &fakeGateway{t: t, ln: ln, kaMs: kaMs, conns: map[uint64]net.Conn{}, frames: make(chan fakeFrame, 10000)}
	go g.accept()
	t.Cleanup(func() {
		_ = ln.Close()
		g.mu.Lock()
		for _, c := range g.conns {
			_ = c.Close()
		}
		g.mu.Unlock()
	})
	return g
}

func (g *fakeGateway) accept() {
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		go g.serve(c)
	}
}

func (g *fakeGateway) serve(c net.Conn) {
	dec := schema.NewDecoder(c, 1<<20)
	var f schema.Frame
	if err := dec.ReadFrame(&f); err != nil || f.Cmd != schema.CmdLogin {
		_ = c.Close()
		return
	}
	uid := f.UID
	body, _ := proto.Marshal(&pb.LoginResponse{KeepaliveMs: g.kaMs})
	h := schema.Header{Cmd: schema.CmdLogin, Seq: f.Seq, UID: uid, AppCode: f.AppCode}
	h.SetKind(schema.KindResponse)
	g.mu.Lock()
	g.conns[uid] = c
	g.mu.Unlock()
	if _, err := c.Write(schema.AppendFrame(nil, &h, body)); err != nil {
		return
	}
	for {
		if err := dec.ReadFrame(&f); err != nil {
			return
		}
		g.frames <- fakeFrame{uid: uid, h: f.Header, b: bytes.Clone(f.Body)}
	}
}

func (g *fakeGateway) conn(uid uint64) net.Conn {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.conns[uid]
}

func notify(cmd schema.Cmd, m proto.Message) []byte {
	body, _ := proto.Marshal(m)
	h := schema.Header{Cmd: cmd}
	h.SetKind(schema.KindNotify)
	return schema.AppendFrame(nil, &h, body)
}

// next returns the next frame of cmd a client sent, skipping others.
func (g *fakeGateway) next(cmd schema.Cmd, within time.Duration) (fakeFrame, bool) {
	deadline := time.After(within)
	for {
		select {
		case f := <-g.frames:
			if f.h.Cmd == cmd {
				return f, true
			}
		case <-deadline:
			return fakeFrame{}, false
		}
	}
}

func testLeanFleet(t *testing.T) {
	g := newFakeGateway(t, 40)
	var mu sync.Mutex
	got := map[uint64][]string{} // push ids' contents by connection uid
	var groupMsgs atomic.Int64
	uids := []uint64{101, 102, 103}
	f, err := DialLean(context.Background(), LeanOptions{Addrs: []string{g.ln.Addr().String()}, AppCode: 7, Secret: "s", UIDs: uids,
		LoginConc: 2, Loops: 2, GroupAckDelay: 30 * time.Millisecond,
		OnS2C: func(conn, _ int, id uint64, content []byte) {
			mu.Lock()
			got[uids[conn]] = append(got[uids[conn]], string(content)) // copied: content is the loop's buffer
			mu.Unlock()
		},
		OnGroup: func(_, _ int, gid, seq uint64, _ []byte, event bool) {
			if gid == 77 && !event {
				groupMsgs.Add(1)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	// Five pushes in one write: read together, acknowledged in one frame.
	var burst []byte
	for i := range uint64(5) {
		burst = append(burst, notify(schema.CmdS2C, &pb.S2CNotify{PushId: 1000 + i, Content: []byte{'a' + byte(i)}, NeedAck: true})...)
	}
	burst = append(burst, notify(schema.CmdS2C, &pb.S2CNotify{PushId: 2000, Content: []byte("no ack")})...)
	if _, err := g.conn(101).Write(burst); err != nil {
		t.Fatal(err)
	}
	ack, ok := g.next(schema.CmdS2CAck, 2*time.Second)
	if !ok || ack.uid != 101 || ack.h.Kind() != schema.KindNotify {
		t.Fatalf("no s2c-ack from 101: %+v", ack)
	}
	var a pb.S2CAck
	if err := proto.Unmarshal(ack.b, &a); err != nil {
		t.Fatal(err)
	}
	if len(a.PushIds) != 5 || a.PushIds[0] != 1000 || a.PushIds[4] != 1004 {
		t.Fatalf("one ack for the read, want push ids 1000..1004: %v", a.PushIds)
	}

	// A frame cut in three writes, the cut inside the header and the body.
	fr := notify(schema.CmdS2C, &pb.S2CNotify{PushId: 3000, Content: bytes.Repeat([]byte("x"), 300), NeedAck: true})
	c := g.conn(102)
	for _, part := range [][]byte{fr[:10], fr[10:100], fr[100:]} {
		if _, err := c.Write(part); err != nil {
			t.Fatal(err)
		}
		time.Sleep(15 * time.Millisecond)
	}
	if ack, ok := g.next(schema.CmdS2CAck, 2*time.Second); !ok || ack.uid != 102 {
		t.Fatalf("no ack of the cut frame: %+v", ack)
	}

	// Group messages: the cursor moves to the highest seq after the delay.
	gn := &pb.GroupNotify{GroupId: 77, Messages: []*pb.C2CMessage{{Msgid: 1, Seq: 5, Content: []byte("m")}, {Msgid: 2, Seq: 6, Content: []byte("n")}}}
	if _, err := g.conn(103).Write(notify(schema.CmdGroupNotify, gn)); err != nil {
		t.Fatal(err)
	}
	gack, ok := g.next(schema.CmdGroupAck, 2*time.Second)
	if !ok || gack.uid != 103 || gack.h.Kind() != schema.KindRequest || gack.h.Seq == 0 {
		t.Fatalf("no group-ack request from 103: %+v", gack)
	}
	var req pb.GroupAckRequest
	if err := proto.Unmarshal(gack.b, &req); err != nil || len(req.Cursors) != 1 || req.Cursors[0].GroupId != 77 || req.Cursors[0].Seq != 6 {
		t.Fatalf("group ack %+v (%v), want group 77 to seq 6", &req, err)
	}
	if groupMsgs.Load() != 2 {
		t.Fatalf("%d group messages counted, want 2", groupMsgs.Load())
	}

	// Keepalives at the advertised interval.
	if _, ok := g.next(schema.CmdKeepalive, 2*time.Second); !ok {
		t.Fatal("no keepalive")
	}

	mu.Lock()
	if len(got[101]) != 6 || got[101][0] != "a" || got[101][5] != "no ack" || len(got[102]) != 1 || len(got[102][0]) != 300 {
		t.Errorf("contents seen: %v", got)
	}
	mu.Unlock()

	// A connection the server closes counts as dropped.
	_ = g.conn(101).Close()
	deadline := time.Now().Add(2 * time.Second)
	for f.Stats().Dropped == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	st := f.Stats()
	if st.Dropped != 1 || st.Conns != 3 || st.Messages != 9 || st.AckedIDs != 6 || st.AckFrames != 2 || st.GroupAcks != 1 || st.Keepalives == 0 || st.BadFrames != 0 {
		t.Errorf("stats %+v", st)
	}
	if st.FramesPerRead() <= 1 {
		t.Errorf("frames per read %.2f: the burst came in one read", st.FramesPerRead())
	}
	_ = f.Close()
	if f.Stats().Dropped != 1 {
		t.Errorf("closing the fleet counted drops: %+v", f.Stats())
	}
}

func TestLeanFleet(t *testing.T) {
	t.Run(runtime.GOOS, testLeanFleet)
	t.Run("goroutines", func(t *testing.T) {
		old := leanEngineFor
		leanEngineFor = func(f *LeanFleet, _ int) (leanEngine, error) { return newGoEngine(f), nil }
		defer func() { leanEngineFor = old }()
		testLeanFleet(t)
	})
}

func TestLeanFleetLoginFails(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // refuse every login
				dec := schema.NewDecoder(c, 1<<20)
				var f schema.Frame
				if dec.ReadFrame(&f) == nil {
					body, _ := proto.Marshal(&pb.Error{Code: 2001, Message: "token invalid"})
					h := schema.Header{Cmd: f.Cmd, Seq: f.Seq, Status: 2001}
					h.SetKind(schema.KindResponse)
					_, _ = c.Write(schema.AppendFrame(nil, &h, body))
				}
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	_, err = DialLean(context.Background(), LeanOptions{Addrs: []string{ln.Addr().String()}, Secret: "s", UIDs: []uint64{1, 2, 3}})
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != 2001 {
		t.Fatalf("err %v, want the login's status 2001", err)
	}
}
