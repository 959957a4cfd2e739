package rpc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// pair returns two links joined by a loopback TCP connection.
func pair(t *testing.T, ha, hb Handler) (*Link, *Link) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	ca, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cb := <-acc
	a, b := NewLink(context.Background(), ca, ha, nil), NewLink(context.Background(), cb, hb, nil)
	t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
	return a, b
}

// echo answers a ping with its own body reversed, so that a response cannot
// be mistaken for its request; any other command is an error.
func echo(_ context.Context, _ *Link, f *schema.Frame) ([]byte, error) {
	if f.Cmd != schema.RPCPing {
		return nil, schema.Errorf(schema.StatusUnknownCmd, "no %s here", f.Cmd)
	}
	out := make([]byte, len(f.Body))
	for i, b := range f.Body {
		out[len(out)-1-i] = b
	}
	return out, nil
}

func reversed(b []byte) []byte {
	out := make([]byte, len(b))
	for i := range b {
		out[len(b)-1-i] = b[i]
	}
	return out
}

// TestLinkManyInFlightBothWays: thousands of calls in flight at once from
// both ends of one link each get their own response.
func TestLinkManyInFlightBothWays(t *testing.T) {
	a, b := pair(t, echo, echo)
	const per = 2000
	var wg sync.WaitGroup
	errs := make(chan error, 2*per)
	for _, l := range []*Link{a, b} {
		for i := range per {
			wg.Add(1)
			go func() {
				defer wg.Done()
				body := make([]byte, 8+i%300)
				binary.BigEndian.PutUint64(body, uint64(i))
				got, err := l.CallRaw(context.Background(), schema.Header{Cmd: schema.RPCPing}, body)
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, reversed(body)) {
					errs <- errors.New("response of another call")
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestLinkErrorStatus: a handler's *schema.Error arrives as the same
// status and message; any other error as StatusInternal.
func TestLinkErrorStatus(t *testing.T) {
	a, _ := pair(t, echo, func(_ context.Context, _ *Link, f *schema.Frame) ([]byte, error) {
		if f.Cmd == schema.RPCPing {
			return nil, schema.Errorf(schema.StatusBadRecipient, "nobody")
		}
		return nil, errors.New("boom")
	})
	_, err := a.CallRaw(context.Background(), schema.Header{Cmd: schema.RPCPing}, nil)
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusBadRecipient || se.Message != "nobody" {
		t.Fatalf("err %v, want status bad recipient, message nobody", err)
	}
	_, err = a.CallRaw(context.Background(), schema.Header{Cmd: schema.RPCLogin}, nil)
	if !errors.As(err, &se) || se.Status != schema.StatusInternal {
		t.Fatalf("err %v, want internal", err)
	}
}

// TestLinkCloseFailsCalls: calls waiting on a link that breaks fail at once
// with a retryable error, and so do later calls.
func TestLinkCloseFailsCalls(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	a, b := pair(t, echo, func(ctx context.Context, _ *Link, _ *schema.Frame) ([]byte, error) {
		select {
		case <-block:
		case <-ctx.Done():
		}
		return nil, nil
	})
	errc := make(chan error, 10)
	for range 10 {
		go func() {
			_, err := a.CallRaw(context.Background(), schema.Header{Cmd: schema.RPCPing}, nil)
			errc <- err
		}()
	}
	time.Sleep(50 * time.Millisecond)
	_ = b.Close()
	for range 10 {
		select {
		case err := <-errc:
			var se *schema.Error
			if !errors.As(err, &se) || !se.Retryable() {
				t.Fatalf("err %v, want a retryable status", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a call still waits on a closed link")
		}
	}
	select {
	case <-a.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the other end did not notice the close")
	}
	if _, err := a.CallRaw(context.Background(), schema.Header{Cmd: schema.RPCPing}, nil); err == nil {
		t.Fatal("call on a closed link succeeded")
	}
}

// TestLinkCallTimeout: a call whose context ends gets StatusTimeout, and
// the late response is dropped without harm.
func TestLinkCallTimeout(t *testing.T) {
	a, _ := pair(t, echo, func(context.Context, *Link, *schema.Frame) ([]byte, error) {
		time.Sleep(200 * time.Millisecond)
		return []byte("late"), nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := a.CallRaw(ctx, schema.Header{Cmd: schema.RPCPing}, nil)
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusTimeout {
		t.Fatalf("err %v, want timeout", err)
	}
	time.Sleep(300 * time.Millisecond)
	if a.Err() != nil {
		t.Fatalf("link broke on a late response: %v", a.Err())
	}
}

// testService is a logic node with one app and an in-process router.
func testService(t testing.TB) (*logic.Service, *router.Memory) {
	t.Helper()
	r := router.NewMemory()
	svc, err := logic.New(logic.Options{Router: r, Apps: []logic.App{{AppCode: 101, Name: "a", Account: 1, Secrets: []string{"0123456789abcdef0123"}}}})
	if err != nil {
		t.Fatal(err)
	}
	return svc, r
}

// fakeGate records what logic asks of the gateway.
type fakeGate struct {
	mu       sync.Mutex
	pushed   map[uint64][][]byte
	kicked   []uint64
	sessions []router.Session
	logids   []uint64 // of every push and kick
}

func (g *fakeGate) Sessions() []router.Session {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]router.Session(nil), g.sessions...)
}

func (g *fakeGate) Kick(_ context.Context, conn uint64, _ *pb.Kickout, logid uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.logids = append(g.logids, logid)
	if _, ok := g.pushed[conn]; !ok {
		return errors.New("unknown conn")
	}
	g.kicked = append(g.kicked, conn)
	return nil
}

func (g *fakeGate) Push(_ context.Context, conns []uint64, _ schema.Cmd, _ uint32, logid uint64, body []byte, queued []bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.logids = append(g.logids, logid)
	for i, c := range conns {
		if _, ok := g.pushed[c]; ok {
			g.pushed[c] = append(g.pushed[c], append([]byte(nil), body...))
			queued[i] = true
		}
	}
	return nil
}

// startPair runs a logic Server and a gateway Client linked over loopback.
func startPair(t *testing.T) (*logic.Service, *router.Memory, *Client, *fakeGate, *Server) {
	t.Helper()
	svc, r := testService(t)
	srv := NewServer(svc, ServerOptions{Node: "logic-1", Version: "test", LocalRouter: true})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	g := &fakeGate{pushed: map[uint64][][]byte{}}
	c := NewClient(ClientOptions{Version: "test"})
	c.Configure("gate-1", "127.0.0.1:7070", g)
	c.SetAddrs([]string{ln.Addr().String()})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); srv.Close(context.Background()) })
	return svc, r, c, g, srv
}

// TestClientServerSession: a login through the client is authenticated by
// logic, lands in the router under the gateway's id, a second login of the
// terminal kicks the first through the link, and a logout removes it.
func TestClientServerSession(t *testing.T) {
	_, r, c, g, _ := startPair(t)
	ctx := context.Background()
	tok := logic.MintToken("0123456789abcdef0123", 101, 7, time.Now().Add(time.Hour))
	if _, err := c.Login(ctx, logic.LoginInput{AppCode: 101, UID: 7, Token: "bad", Conn: 1}); err == nil {
		t.Fatal("a bad token logged in")
	} else if se := new(schema.Error); !errors.As(err, &se) || se.Status != schema.StatusTokenMalformed && se.Status != schema.StatusTokenInvalid {
		t.Fatalf("bad token: %v", err)
	}
	g.mu.Lock()
	g.pushed[1], g.pushed[2] = nil, nil
	g.mu.Unlock()
	first, err := c.Login(ctx, logic.LoginInput{AppCode: 101, UID: 7, Token: tok, Conn: 1, DeviceID: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if first.Session.Gate != "gate-1" || first.Session.Conn != 1 || first.Session.Account != 1 {
		t.Fatalf("session %+v", first.Session)
	}
	second, err := c.Login(ctx, logic.LoginInput{AppCode: 101, UID: 7, Token: tok, Conn: 2, DeviceID: "d2"})
	if err != nil || second.Evicted != 1 {
		t.Fatalf("second login: %+v %v", second, err)
	}
	g.mu.Lock()
	kicked := append([]uint64(nil), g.kicked...)
	g.mu.Unlock()
	if len(kicked) != 1 || kicked[0] != 1 {
		t.Fatalf("kicked %v, want [1]", kicked)
	}
	ss, _ := r.Lookup(ctx, router.User{Account: 1, UID: 7})
	if len(ss) != 1 || !ss[0].Same(&second.Session) || ss[0].DeviceID != "d2" {
		t.Fatalf("router holds %+v", ss)
	}
	if err := c.Logout(ctx, second.Session); err != nil {
		t.Fatal(err)
	}
	if ss, _ := r.Lookup(ctx, router.User{Account: 1, UID: 7}); len(ss) != 0 {
		t.Fatalf("router still holds %+v after logout", ss)
	}
}

// TestServerRefusesForeignSession: a gateway cannot end another gateway's
// sessions over its link.
func TestServerRefusesForeignSession(t *testing.T) {
	_, _, c, _, _ := startPair(t)
	err := c.Logout(context.Background(), router.Session{Account: 1, AppCode: 101, UID: 7, Gate: "gate-2", Conn: 1, Epoch: 1})
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusBadArgument {
		t.Fatalf("err %v, want bad argument", err)
	}
}

// TestServerNeedsHello: a link whose first frame is not a hello is closed.
func TestServerNeedsHello(t *testing.T) {
	_, _, _, _, srv := startPair(t)
	srv.mu.Lock()
	addr := srv.ln.Addr().String()
	srv.mu.Unlock()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	l := NewLink(context.Background(), nc, echo, nil)
	defer l.Close()
	_, err = l.Call(context.Background(), schema.Header{Cmd: schema.RPCLogin}, &pb.RPCLogin{Appcode: 101, Uid: 1}, nil)
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusNotLoggedIn && se.Status != schema.StatusUnavailable {
		t.Fatalf("err %v, want not logged in or a closed link", err)
	}
	select {
	case <-l.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the server kept a link that sent no hello")
	}
}

// TestClientRedials: when the logic node restarts on the same address the
// client's link comes back by itself.
func TestClientRedials(t *testing.T) {
	svc, _ := testService(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	srv := NewServer(svc, ServerOptions{Node: "logic-1", Version: "test", LocalRouter: true})
	go func() { _ = srv.Serve(ln) }()
	c := NewClient(ClientOptions{})
	c.Configure("gate-1", "x", &fakeGate{pushed: map[uint64][][]byte{}})
	c.SetAddrs([]string{addr})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Close(context.Background())
	deadline := time.Now().Add(5 * time.Second)
	for c.Links() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the client still counts a closed link")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := c.Handle(ctx, router.Session{Gate: "gate-1"}, &schema.Header{Cmd: schema.CmdC2CSend}, nil); err == nil {
		t.Fatal("a call with no logic node succeeded")
	}
	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv2 := NewServer(svc, ServerOptions{Node: "logic-1", Version: "test", LocalRouter: true})
	go func() { _ = srv2.Serve(ln2) }()
	defer srv2.Close(context.Background())
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	// and it serves: an unknown command comes back as a status, not a hang
	_, err = c.Handle(ctx, router.Session{Gate: "gate-1"}, &schema.Header{Cmd: schema.CmdKeepalive}, nil)
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusUnknownCmd {
		t.Fatalf("err %v, want unknown command", err)
	}
}

// TestPushOverLink: logic's Gate for a remote gateway pushes once for many
// connections and reports which took it.
func TestPushOverLink(t *testing.T) {
	svc, _, _, g, srv := startPair(t)
	_ = svc
	g.mu.Lock()
	g.pushed[10], g.pushed[11] = nil, nil
	g.mu.Unlock()
	var l *Link
	srv.mu.Lock()
	for x := range srv.links {
		l = x
	}
	srv.mu.Unlock()
	queued := make([]bool, 3)
	if err := (remoteGate{l}).Push(context.Background(), []uint64{10, 99, 11}, schema.CmdS2C, 5, 0xfeedbeef12345, []byte("hi"), queued); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	logids := slices.Clone(g.logids)
	g.mu.Unlock()
	if len(logids) != 1 || logids[0] != 0xfeedbeef12345 {
		t.Fatalf("the gateway saw logids %x, want the push's feedbeef12345", logids)
	}
	if !queued[0] || queued[1] || !queued[2] {
		t.Fatalf("queued %v, want [true false true]", queued)
	}
	err := (remoteGate{l}).Kick(context.Background(), 99, &pb.Kickout{}, 7)
	var se *schema.Error
	if !errors.As(err, &se) || se.Status != schema.StatusUnknownConn {
		t.Fatalf("kick of an unknown conn: %v", err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.pushed[10]) != 1 || string(g.pushed[10][0]) != "hi" || len(g.pushed[11]) != 1 {
		t.Fatalf("pushed %v", g.pushed)
	}
}

// FuzzLinkInput feeds arbitrary bytes to a logic node's RPC port: it may
// close the link, never panic or hang.
func FuzzLinkInput(f *testing.F) {
	hello, _ := proto.Marshal(&pb.RPCHello{Gate: "g"})
	var seed []byte
	h := schema.Header{Cmd: schema.RPCHello}
	seed = schema.AppendFrame(seed, &h, hello)
	f.Add(seed)
	h2 := schema.Header{Cmd: schema.RPCHandle, Seq: 2}
	body, _ := proto.Marshal(&pb.RPCHandle{Header: make([]byte, 40), Session: &pb.RPCSession{Gate: "g"}})
	f.Add(schema.AppendFrame(append([]byte(nil), seed...), &h2, body))
	h3 := schema.Header{Cmd: schema.RPCLogin, Seq: 3}
	f.Add(schema.AppendFrame(append([]byte(nil), seed...), &h3, []byte{0xff, 0xff}))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	svc, _ := testService(f)
	srv := NewServer(svc, ServerOptions{Node: "logic-1", Version: "test", LocalRouter: true})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		l := NewLink(context.Background(), b, srv.serve, nil)
		done := make(chan struct{})
		go func() { // drain whatever the server answers
			buf := make([]byte, 4096)
			for {
				if _, err := a.Read(buf); err != nil {
					close(done)
					return
				}
			}
		}()
		_ = a.SetWriteDeadline(time.Now().Add(2 * time.Second))
		_, _ = a.Write(in)
		time.Sleep(time.Millisecond)
		_ = a.Close()
		select {
		case <-l.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("link did not close after its peer did")
		}
		<-done
	})
}

// TestLocalRouterAnnounce: with the router in the logic process, a
// gateway whose link breaks has its sessions purged, and announces them
// again on its new link; one that never comes back stays purged.
func TestLocalRouterAnnounce(t *testing.T) {
	_, r, c, g, srv := startPair(t)
	ctx := context.Background()
	tok := logic.MintToken("0123456789abcdef0123", 101, 7, time.Now().Add(time.Hour))
	res, err := c.Login(ctx, logic.LoginInput{AppCode: 101, UID: 7, Token: tok, Conn: 5})
	if err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	g.sessions = []router.Session{res.Session}
	g.mu.Unlock()
	srv.mu.Lock()
	for l := range srv.links {
		_ = l.Close()
	}
	srv.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ss, _ := r.Lookup(ctx, router.User{Account: 1, UID: 7})
		if c.Links() == 1 && len(ss) == 1 && ss[0].Same(&res.Session) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("session not announced again after the link came back: %+v, links %d", ss, c.Links())
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.Close()
	for {
		ss, _ := r.Lookup(ctx, router.User{Account: 1, UID: 7})
		if len(ss) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gone gateway's session is still in the router: %+v", ss)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestDisconnectWaitsForALink: a disconnect that finds no logic node is
// kept and delivered once a link is up, so the session leaves the router.
func TestDisconnectWaitsForALink(t *testing.T) {
	svc, r := testService(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	sess := router.Session{Account: 1, AppCode: 101, UID: 7, Gate: "gate-1", Conn: 3, Epoch: 1}
	if _, err := r.Register(context.Background(), sess, 1); err != nil {
		t.Fatal(err)
	}
	c := NewClient(ClientOptions{})
	c.Configure("gate-1", "x", &fakeGate{pushed: map[uint64][][]byte{}})
	defer c.Close()
	c.Disconnected(context.Background(), sess)
	if c.Gone() != 1 {
		t.Fatalf("%d disconnects kept, want 1", c.Gone())
	}
	c.SetAddrs([]string{addr})
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(svc, ServerOptions{Node: "logic-1", Version: "test"})
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close(context.Background())
	deadline := time.Now().Add(10 * time.Second)
	for {
		ss, _ := r.Lookup(context.Background(), router.User{Account: 1, UID: 7})
		if len(ss) == 0 && c.Gone() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the kept disconnect was not delivered: router %+v, kept %d", ss, c.Gone())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHelloSecret: a logic node with a cluster secret links only gateways
// that sign their hello with the same secret and a sane clock.
func TestHelloSecret(t *testing.T) {
	svc, _ := testService(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(svc, ServerOptions{Node: "logic-1", Secret: "s3cret-0123456789"})
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close(context.Background())
	try := func(secret string) error {
		c := NewClient(ClientOptions{Secret: secret})
		c.Configure("gate-"+secret, "x", &fakeGate{pushed: map[uint64][][]byte{}})
		defer c.Close()
		_, err := c.dial(context.Background(), ln.Addr().String())
		return err
	}
	if err := try("s3cret-0123456789"); err != nil {
		t.Fatalf("the right secret: %v", err)
	}
	for _, bad := range []string{"", "wrong-secret-0123"} {
		var se *schema.Error
		if err := try(bad); !errors.As(err, &se) || se.Status != schema.StatusTokenInvalid {
			t.Fatalf("secret %q: %v, want token invalid", bad, err)
		}
	}
	stale := &pb.RPCHello{Gate: "g"}
	signHello(stale, "s3cret-0123456789", time.Now().Add(-time.Hour))
	if err := checkHello(stale, "s3cret-0123456789", time.Now()); err == nil {
		t.Fatal("an hour-old hello passed")
	}
}
