package platform

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// headerBytes encodes h as a bare 40-byte header (no body follows).
func headerBytes(h schema.Header) []byte {
	b := make([]byte, schema.HeaderLen)
	h.Put(b)
	return b
}

// stillServes proves the server kept serving everyone else: a fresh
// connection logs in and gets a keepalive answered.
func stillServes(t *testing.T, p *Platform) {
	t.Helper()
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 9999, 1)
	r.send(schema.Header{Cmd: schema.CmdKeepalive, Seq: 2}, &pb.KeepaliveRequest{})
	if h, _ := r.read(); h.Status != schema.StatusOK || h.Seq != 2 {
		t.Fatalf("keepalive after bad input: %+v", h)
	}
}

func TestBadFramesCloseTheConnection(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Gateway.MaxBody = 1024 })
	login := schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 7, Seq: 5}
	cases := []struct {
		name  string
		bytes func() []byte
		want  schema.Status
	}{
		{"bad magic", func() []byte {
			b := headerBytes(login)
			b[0], b[1] = 'G', 'E' // an HTTP client, say
			return b
		}, schema.StatusBadFrame},
		{"unknown version", func() []byte {
			h := login
			h.Version = 9
			return headerBytes(h)
		}, schema.StatusBadVersion},
		{"reserved flag bits", func() []byte {
			h := login
			h.Flags = 0x80
			return headerBytes(h)
		}, schema.StatusBadFrame},
		{"body over the maximum", func() []byte {
			h := login
			h.BodyLen = 1025
			return headerBytes(h)
		}, schema.StatusBodyTooLarge},
		{"huge body length", func() []byte {
			h := login
			h.BodyLen = 0xFFFFFFFF
			return headerBytes(h)
		}, schema.StatusBodyTooLarge},
		{"frame before login", func() []byte {
			return schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdKeepalive, Seq: 5}, nil)
		}, schema.StatusNotLoggedIn},
		{"unknown command before login", func() []byte {
			return schema.AppendFrame(nil, &schema.Header{Cmd: 0x7777, Seq: 5}, nil)
		}, schema.StatusNotLoggedIn},
		{"garbage login body", func() []byte {
			return schema.AppendFrame(nil, &login, []byte{0xff, 0xff, 0xff, 0xff, 0x0f})
		}, schema.StatusBadBody},
		{"login as a response", func() []byte {
			h := login
			h.SetKind(schema.KindResponse)
			return schema.AppendFrame(nil, &h, nil)
		}, schema.StatusNotLoggedIn},
		{"unknown appcode", func() []byte {
			h := login
			h.AppCode = 999
			body := mustMarshal(t, &pb.LoginRequest{Token: token(999, 7)})
			return schema.AppendFrame(nil, &h, body)
		}, schema.StatusUnknownAppCode},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, p.GatewayAddr())
			r.writeBytes(tc.bytes())
			h := r.readError(tc.want)
			if h.Seq != 5 && tc.want != schema.StatusBadFrame {
				t.Errorf("error response seq %d, want the request's 5", h.Seq)
			}
			r.expectClosed(2 * time.Second)
		})
	}
	stillServes(t, p)
	eventually(t, 2*time.Second, "only the probe connection left", func() bool { return p.Gateway.Conns() == 1 })
}

func TestTruncatedFrames(t *testing.T) {
	p := start(t, nil)
	full := schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 8, Seq: 1},
		mustMarshal(t, &pb.LoginRequest{Token: token(101, 8)}))
	for _, n := range []int{1, 20, schema.HeaderLen - 1, schema.HeaderLen, schema.HeaderLen + 3, len(full) - 1} {
		r := dialRaw(t, p.GatewayAddr())
		r.writeBytes(full[:n])
		// The peer half-closes mid-frame: the server must drop the
		// connection, not wait for the rest or treat it as a login.
		if err := r.nc.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		r.expectClosed(2 * time.Second)
	}
	eventually(t, 2*time.Second, "truncated connections dropped", func() bool { return p.Gateway.Conns() == 0 })
	if n := len(sessions(t, p, 1, 8)); n != 0 {
		t.Fatalf("a truncated login registered %d sessions", n)
	}

	// A truncated frame followed by silence runs into the login deadline.
	p2 := start(t, func(c *config.Config) { c.Gateway.LoginTimeout = 200 * time.Millisecond })
	r := dialRaw(t, p2.GatewayAddr())
	r.writeBytes(full[:schema.HeaderLen+2])
	r.expectClosed(3 * time.Second)
	stillServes(t, p)
}

func TestLoginDeadline(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Gateway.LoginTimeout = 300 * time.Millisecond })
	var rs []*raw
	for range 20 {
		rs = append(rs, dialRaw(t, p.GatewayAddr()))
	}
	eventually(t, 2*time.Second, "20 connections held", func() bool { return p.Gateway.Conns() == 20 })
	began := time.Now()
	for _, r := range rs {
		r.readError(schema.StatusLoginTimeout)
		r.expectClosed(2 * time.Second)
	}
	if el := time.Since(began); el < 200*time.Millisecond {
		t.Fatalf("closed after %s, before the 300ms login deadline", el)
	}
	eventually(t, 2*time.Second, "silent connections dropped", func() bool { return p.Gateway.Conns() == 0 })
	stillServes(t, p)
}

func TestBadRequestsAfterLoginKeepTheConnection(t *testing.T) {
	p := start(t, nil)
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 11, 1)
	steps := []struct {
		name string
		h    schema.Header
		want schema.Status
	}{
		{"unknown command", schema.Header{Cmd: 0x7777, Seq: 2}, schema.StatusUnknownCmd},
		{"other uid", schema.Header{Cmd: schema.CmdKeepalive, UID: 12, Seq: 3}, schema.StatusUIDMismatch},
		{"other appcode", schema.Header{Cmd: schema.CmdKeepalive, AppCode: 102, Seq: 4}, schema.StatusUIDMismatch},
		{"second login", schema.Header{Cmd: schema.CmdLogin, Seq: 5}, schema.StatusAlreadyLogged},
	}
	for _, s := range steps {
		r.send(s.h, nil)
		if h := r.readError(s.want); h.Seq != s.h.Seq {
			t.Fatalf("%s: response seq %d, want %d", s.name, h.Seq, s.h.Seq)
		}
	}
	// A response sent by a client is refused too.
	h := schema.Header{Cmd: schema.CmdKeepalive, Seq: 6}
	h.SetKind(schema.KindResponse)
	r.send(h, nil)
	r.readError(schema.StatusBadKind)
	// The connection is still logged in and served.
	r.send(schema.Header{Cmd: schema.CmdKeepalive, Seq: 7}, &pb.KeepaliveRequest{})
	if h, _ := r.read(); h.Status != schema.StatusOK || h.Seq != 7 {
		t.Fatalf("keepalive after bad requests: %+v", h)
	}
	if n := len(sessions(t, p, 1, 11)); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
}

// TestPipelinedRequests sends many requests in one write and checks every
// seq is answered exactly once.
func TestPipelinedRequests(t *testing.T) {
	p := start(t, nil)
	r := dialRaw(t, p.GatewayAddr())
	r.login(101, 13, 1)
	const n = 500
	var batch []byte
	for i := range n {
		body := mustMarshal(t, &pb.KeepaliveRequest{ClientTimeMs: int64(i)})
		batch = schema.AppendFrame(batch, &schema.Header{Cmd: schema.CmdKeepalive, Seq: uint32(100 + i)}, body)
	}
	r.writeBytes(batch)
	seen := make(map[uint32]bool, n)
	for range n {
		h, _ := r.read()
		if h.Status != schema.StatusOK || h.Cmd != schema.CmdKeepalive || h.Kind() != schema.KindResponse {
			t.Fatalf("response %+v", h)
		}
		if h.Seq < 100 || h.Seq >= 100+n || seen[h.Seq] {
			t.Fatalf("unexpected or repeated seq %d", h.Seq)
		}
		seen[h.Seq] = true
	}
}

// TestMaxConnsRefusesCleanly fills the gateway to its configured maximum,
// then opens connections faster than it accepts them: every extra one gets
// StatusTooManyConns and a close, the held ones keep working, and room
// freed by a leaving client is usable again.
func TestMaxConnsRefusesCleanly(t *testing.T) {
	const limit = 20
	p := start(t, func(c *config.Config) { c.Gateway.MaxConns = limit })
	held := make([]*raw, 0, limit)
	for i := range limit {
		r := dialRaw(t, p.GatewayAddr())
		r.login(101, uint64(1000+i), 1)
		held = append(held, r)
	}
	const flood = 200
	var refused, other atomic.Int32
	var wg sync.WaitGroup
	for range flood {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc, err := net.DialTimeout("tcp", p.GatewayAddr(), 5*time.Second)
			if err != nil {
				other.Add(1)
				return
			}
			defer nc.Close()
			_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			dec := schema.NewDecoder(nc, 4096)
			var f schema.Frame
			if err := dec.ReadFrame(&f); err != nil || f.Status != schema.StatusTooManyConns || f.Kind() != schema.KindResponse {
				other.Add(1)
				return
			}
			f.Release()
			refused.Add(1)
		}()
	}
	wg.Wait()
	if refused.Load() != flood || other.Load() != 0 {
		t.Fatalf("of %d extra connections %d were refused with %d and %d got something else", flood, refused.Load(), schema.StatusTooManyConns, other.Load())
	}
	for i, r := range held {
		r.send(schema.Header{Cmd: schema.CmdKeepalive, Seq: 2}, &pb.KeepaliveRequest{})
		if h, _ := r.read(); h.Status != schema.StatusOK {
			t.Fatalf("held connection %d: %+v", i, h)
		}
	}
	_ = held[0].nc.Close()
	eventually(t, 2*time.Second, "room freed", func() bool { return p.Gateway.Conns() == limit-1 })
	stillServes(t, p)
}

func mustMarshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
