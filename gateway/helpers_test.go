package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

const testSecret = "gateway-test-secret-0123456789"

// forEachEngine runs fn as a subtest per engine this platform has.
func forEachEngine(t *testing.T, fn func(t *testing.T, engine string)) {
	for _, e := range testEngines {
		t.Run(e, func(t *testing.T) { fn(t, e) })
	}
}

// newTestLogic returns the real logic service over an in-memory router,
// with appcode 101 (one session per terminal).
func newTestLogic(t testing.TB) *logic.Service {
	t.Helper()
	svc, err := logic.New(logic.Options{
		Apps:   []logic.App{{AppCode: 101, Account: 1, Secrets: []string{testSecret}}},
		Router: router.NewMemory(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// startServer runs a gateway of the engine on a loopback port until the
// test ends.
func startServer(t testing.TB, engine string, mod func(*Options)) *Server {
	t.Helper()
	svc := newTestLogic(t)
	o := Options{Addr: "127.0.0.1:0", Engine: engine}
	if mod != nil {
		mod(&o)
	}
	s, err := New(o, svc)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Options().Engine; got != engine {
		t.Fatalf("engine %q, want %q", got, engine)
	}
	svc.AttachGate(s.ID(), s)
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return s
}

func encodeFrame(h schema.Header, m proto.Message) []byte {
	var body []byte
	if m != nil {
		body, _ = proto.Marshal(m)
	}
	return schema.AppendFrame(nil, &h, body)
}

func loginFrame(uid uint64, seq uint32) []byte {
	return encodeFrame(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: seq},
		&pb.LoginRequest{Token: logic.MintToken(testSecret, 101, uid, time.Now().Add(time.Hour)), DeviceId: "d"})
}

func keepaliveFrame(seq uint32) []byte {
	return encodeFrame(schema.Header{Cmd: schema.CmdKeepalive, Seq: seq}, &pb.KeepaliveRequest{ClientTimeMs: 1})
}

func logoutFrame(seq uint32) []byte {
	return encodeFrame(schema.Header{Cmd: schema.CmdLogout, Seq: seq}, &pb.LogoutRequest{})
}

// client speaks frames by hand over a socket.
type client struct {
	t   testing.TB
	nc  net.Conn
	dec *schema.Decoder
}

func dialClient(t testing.TB, s *Server) *client {
	t.Helper()
	nc, err := net.DialTimeout("tcp", s.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &client{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	_ = c.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// read returns the next frame, failing the test after 5s.
func (c *client) read() (schema.Header, []byte) {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	var f schema.Frame
	if err := c.dec.ReadFrame(&f); err != nil {
		c.t.Fatalf("read: %v", err)
	}
	body := append([]byte(nil), f.Body...)
	f.Release()
	return f.Header, body
}

// expect reads a response and checks its seq and status.
func (c *client) expect(seq uint32, st schema.Status) []byte {
	c.t.Helper()
	h, body := c.read()
	if h.Kind() != schema.KindResponse || h.Seq != seq || h.Status != st {
		c.t.Fatalf("got %s %s seq %d status %s, want response seq %d status %s", h.Kind(), h.Cmd, h.Seq, h.Status, seq, st)
	}
	if st != schema.StatusOK {
		var e pb.Error
		if err := proto.Unmarshal(body, &e); err != nil || e.Code != uint32(st) {
			c.t.Fatalf("error body %v does not carry code %d (%v)", &e, st, err)
		}
	}
	return body
}

// expectClosed checks the server closes the connection within d, after
// any frames still in flight.
func (c *client) expectClosed(d time.Duration) {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(d))
	var f schema.Frame
	for {
		err := c.dec.ReadFrame(&f)
		f.Release()
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
			return
		}
		c.t.Fatalf("connection not closed by the server within %s: %v", d, err)
	}
}

// login logs the client in as uid.
func (c *client) login(uid uint64) {
	c.t.Helper()
	c.write(loginFrame(uid, 1))
	c.expect(1, schema.StatusOK)
}

// onlyConn returns the id of the one connection s holds.
func onlyConn(t testing.TB, s *Server) uint64 {
	t.Helper()
	var ids []uint64
	s.each(func(c *conn) { ids = append(ids, c.id) })
	if len(ids) != 1 {
		t.Fatalf("server holds %d connections, want 1", len(ids))
	}
	return ids[0]
}

// eventually polls cond until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
