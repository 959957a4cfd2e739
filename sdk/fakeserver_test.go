package sdk

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// fakeServer speaks the frame protocol on a loopback listener and answers
// each request with what handle returns: a status, a body (for StatusOK)
// and whether to close the connection after the answer.
type fakeServer struct {
	t      *testing.T
	ln     net.Listener
	handle func(h schema.Header, body []byte) (schema.Status, proto.Message, bool)
	notify func(h schema.Header, body []byte) // the client's notifies (acks); nil drops them

	mu    sync.Mutex
	conns []net.Conn
	wmu   sync.Mutex // serialises the writes of answers and pushes
}

func newFakeServer(t *testing.T, handle func(h schema.Header, body []byte) (schema.Status, proto.Message, bool)) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fs := &fakeServer{t: t, ln: ln, handle: handle}
	go fs.serve()
	t.Cleanup(func() { _ = ln.Close(); fs.cutAll() })
	return fs
}

func (fs *fakeServer) addr() string { return fs.ln.Addr().String() }

func (fs *fakeServer) serve() {
	for {
		nc, err := fs.ln.Accept()
		if err != nil {
			return
		}
		fs.mu.Lock()
		fs.conns = append(fs.conns, nc)
		fs.mu.Unlock()
		go fs.conn(nc)
	}
}

func (fs *fakeServer) conn(nc net.Conn) {
	defer nc.Close()
	dec := schema.NewDecoder(bufio.NewReader(nc), 1<<20)
	var f schema.Frame
	for {
		if err := dec.ReadFrame(&f); err != nil {
			return
		}
		h := f.Header
		body := append([]byte(nil), f.Body...)
		f.Release()
		if h.Kind() != schema.KindRequest {
			if h.Kind() == schema.KindNotify && fs.notify != nil {
				fs.notify(h, body)
			}
			continue // acks and other notifies
		}
		st, resp, closeAfter := fs.handle(h, body)
		var out []byte
		if st != schema.StatusOK {
			out = schema.ErrorBody(st, "fake: "+st.String())
		} else if resp != nil {
			out, _ = proto.Marshal(resp)
		}
		h.Status = st
		h.SetKind(schema.KindResponse)
		fs.wmu.Lock()
		_, err := nc.Write(schema.AppendFrame(nil, &h, out))
		fs.wmu.Unlock()
		if err != nil || closeAfter {
			return
		}
	}
}

// push sends a notify of cmd with body m on every connection.
func (fs *fakeServer) push(cmd schema.Cmd, m proto.Message) {
	body, _ := proto.Marshal(m)
	h := schema.Header{Cmd: cmd}
	h.SetKind(schema.KindNotify)
	frame := schema.AppendFrame(nil, &h, body)
	fs.mu.Lock()
	conns := slices.Clone(fs.conns)
	fs.mu.Unlock()
	fs.wmu.Lock()
	defer fs.wmu.Unlock()
	for _, c := range conns {
		_, _ = c.Write(frame)
	}
}

// cutAll closes every connection the server accepted.
func (fs *fakeServer) cutAll() {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for _, c := range fs.conns {
		_ = c.Close()
	}
	fs.conns = nil
}

// answer is the usual reply of the fake server to cmd, or false.
func answer(cmd schema.Cmd) (proto.Message, bool) {
	switch cmd {
	case schema.CmdLogin:
		return &pb.LoginResponse{KeepaliveMs: 60000}, true
	case schema.CmdKeepalive:
		return &pb.KeepaliveResponse{}, true
	case schema.CmdOfflinePull:
		return &pb.OfflinePullResponse{}, true
	}
	return nil, false
}

// memState is a StateStore in memory that checks the send floor only grows.
type memState struct {
	t     *testing.T
	mu    sync.Mutex
	shown []uint64
	sent  uint64
}

func (m *memState) Load() (SavedState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return SavedState{Shown: slices.Clone(m.shown), SentMsgid: m.sent}, nil
}

func (m *memState) SaveShown(ids []uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.shown = append(m.shown, ids...)
	return nil
}

func (m *memState) SaveSent(msgid uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if msgid <= m.sent {
		m.t.Errorf("SaveSent(%d) after %d: the floor went down", msgid, m.sent)
	}
	m.sent = msgid
	return nil
}

// TestSendCarriesAfterMsgid: every send and every retry carries the
// highest msgid the client was answered for, which never goes down (a
// duplicate answered with an older msgid leaves it), and a client started
// with the same State goes on from it.
func TestSendCarriesAfterMsgid(t *testing.T) {
	var mu sync.Mutex
	var got []uint64 // after_msgid of every try, in arrival order
	answers := []uint64{100, 0, 50, 200, 300}
	fs := newFakeServer(t, func(h schema.Header, body []byte) (schema.Status, proto.Message, bool) {
		if h.Cmd != schema.CmdC2CSend {
			resp, _ := answer(h.Cmd)
			return schema.StatusOK, resp, false
		}
		var req pb.C2CSendRequest
		if err := proto.Unmarshal(body, &req); err != nil {
			t.Errorf("send request: %v", err)
		}
		mu.Lock()
		defer mu.Unlock()
		got = append(got, req.AfterMsgid)
		id := answers[0]
		answers = answers[1:]
		if id == 0 {
			return schema.StatusUnavailable, nil, false // retried by the SDK
		}
		return schema.StatusOK, &pb.C2CSendResponse{Msgid: id, Duplicate: id == 50}, false
	})
	st := &memState{t: t}
	run := func(sends int) {
		c, err := Dial(context.Background(), Options{Addrs: []string{fs.addr()}, State: st, SendBackoffMin: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Login(context.Background(), Credentials{AppCode: 1, UID: 2, Token: "t"}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < sends; i++ {
			if _, err := c.SendC2C(context.Background(), &pb.User{Account: 1, Uid: 3}, 1, []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
	}
	run(3) // answered 100; 5002 then 50 (a duplicate); 200
	run(1) // a new client on the same state: answered 300
	want := []uint64{0, 100, 100, 100, 200}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(got, want) {
		t.Fatalf("after_msgid of the tries %v, want %v", got, want)
	}
	if st.sent != 300 {
		t.Fatalf("state holds the floor %d, want 300", st.sent)
	}
}

// TestReconnectBackoffWhileServerBusy: while the server answers logins
// with a retryable status (the logic tier restarting), the reconnect
// backoff stays within a couple of seconds instead of growing towards
// BackoffMax (30s by default), so the client is back soon after the server
// can serve. The jitter is taken at its largest to make the waits exact.
func TestReconnectBackoffWhileServerBusy(t *testing.T) {
	saved := jitter
	jitter = func(d time.Duration) time.Duration { return d }
	t.Cleanup(func() { jitter = saved })

	const refusals = 7
	var mu sync.Mutex
	var logins []time.Time
	fs := newFakeServer(t, func(h schema.Header, body []byte) (schema.Status, proto.Message, bool) {
		if h.Cmd == schema.CmdLogin {
			mu.Lock()
			logins = append(logins, time.Now())
			n := len(logins)
			mu.Unlock()
			if n > 1 && n <= 1+refusals {
				return schema.StatusUnavailable, nil, true
			}
		}
		resp, _ := answer(h.Cmd)
		return schema.StatusOK, resp, false
	})
	online := make(chan struct{}, 16)
	c, err := Dial(context.Background(), Options{
		Addrs:      []string{fs.addr()},
		BackoffMin: 50 * time.Millisecond, // BackoffMax: the default 30s
		OnState: func(s State, _ error) {
			if s == StateOnline {
				online <- struct{}{}
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Login(context.Background(), Credentials{AppCode: 1, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
	<-online
	fs.cutAll()
	select {
	case <-online:
	case <-time.After(20 * time.Second):
		t.Fatal("not back online within 20s")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(logins) != 2+refusals {
		t.Fatalf("%d logins, want %d", len(logins), 2+refusals)
	}
	if gap := logins[len(logins)-1].Sub(logins[len(logins)-2]); gap > 2500*time.Millisecond {
		t.Fatalf("logged in %s after the last refusal, want at most ~2s", gap)
	}
}

// TestFileState: the file keeps the shown ids (the last keep of them) and
// the highest send floor across opens, drops a torn last line, and stays
// bounded.
func TestFileState(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	s, err := FileState(path, 4)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SaveShown([]uint64{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveSent(70); err != nil {
		t.Fatal(err)
	}
	_ = s.SaveSent(60) // lower: ignored
	if err := s.SaveShown([]uint64{4, 5}); err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	// a crash in the middle of a write leaves a torn last line
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("s 99")
	_ = f.Close()

	s, err = FileState(path, 4)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := s.Load()
	if !slices.Equal(st.Shown, []uint64{2, 3, 4, 5}) || st.SentMsgid != 70 {
		t.Fatalf("loaded %+v, want shown [2 3 4 5] and floor 70", st)
	}
	if err := s.SaveShown([]uint64{6}); err != nil {
		t.Fatal(err)
	}
	for id := uint64(7); id < 100; id++ {
		if err := s.SaveShown([]uint64{id}); err != nil {
			t.Fatal(err)
		}
	}
	_ = s.Close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if lines := bytes.Count(b, []byte("\n")); lines > 2*4+1 {
		t.Fatalf("state file holds %d lines, want at most %d", lines, 2*4+1)
	}
	s, err = FileState(path, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	st, _ = s.Load()
	if !slices.Equal(st.Shown, []uint64{96, 97, 98, 99}) || st.SentMsgid != 70 {
		t.Fatalf("loaded %+v, want shown [96 97 98 99] and floor 70", st)
	}
}

// TestPushAcksBatched: live pushes that come within PushAckDelay are
// acknowledged in one s2c-ack, not one per AckDelay, and not before the
// delay has passed since the last push ack went out; Close sends what
// waits.
func TestPushAcksBatched(t *testing.T) {
	type ack struct {
		at  time.Time
		ids []uint64
	}
	var mu sync.Mutex
	var acks []ack
	fs := newFakeServer(t, func(h schema.Header, _ []byte) (schema.Status, proto.Message, bool) {
		resp, _ := answer(h.Cmd)
		return schema.StatusOK, resp, false
	})
	fs.notify = func(h schema.Header, body []byte) {
		if h.Cmd != schema.CmdS2CAck {
			return
		}
		var m pb.S2CAck
		if err := proto.Unmarshal(body, &m); err != nil {
			t.Errorf("s2c-ack: %v", err)
		}
		mu.Lock()
		acks = append(acks, ack{time.Now(), m.PushIds})
		mu.Unlock()
	}
	got := make(chan uint64, 16)
	c, err := Dial(context.Background(), Options{Addrs: []string{fs.addr()}, AckDelay: 5 * time.Millisecond,
		PushAckDelay: 300 * time.Millisecond, OnS2C: func(n *pb.S2CNotify) { got <- n.PushId }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Login(context.Background(), Credentials{AppCode: 1, UID: 2, Token: "t"}); err != nil {
		t.Fatal(err)
	}
	// The first push is acked at the next tick (no push ack went out yet);
	// the next four, 20 ms apart, wait for the delay and go together.
	start := time.Now()
	for id := uint64(1); id <= 5; id++ {
		fs.push(schema.CmdS2C, &pb.S2CNotify{PushId: id, NeedAck: true, Content: []byte("x")})
		if n := <-got; n != id {
			t.Fatalf("push %d delivered as %d", id, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	fs.push(schema.CmdS2C, &pb.S2CNotify{PushId: 6, NeedAck: true})
	<-got
	deadline := time.Now().Add(3 * time.Second)
	for {
		mu.Lock()
		n := 0
		for _, a := range acks {
			n += len(a.ids)
		}
		done := n >= 5
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = c.Close() // sends push 6 if it still waits
	var all []uint64
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		all = all[:0]
		for _, a := range acks {
			all = append(all, a.ids...)
		}
		mu.Unlock()
		if len(all) >= 6 || time.Now().After(deadline) {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(all)
	if !slices.Equal(all, []uint64{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("acked %v, want pushes 1-6 once each", all)
	}
	if len(acks) > 3 {
		t.Fatalf("%d s2c-ack frames for 6 pushes, want at most 3: %v", len(acks), acks)
	}
	if len(acks) >= 2 && acks[1].at.Sub(acks[0].at) < 250*time.Millisecond {
		t.Fatalf("second push ack %v after the first, want about PushAckDelay (300ms); started %v", acks[1].at.Sub(acks[0].at), acks[0].at.Sub(start))
	}
}
