package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// wsClient speaks frames by hand over a WebSocket, as a browser would.
type wsClient struct {
	t      testing.TB
	nc     net.Conn
	queued []schema.Frame // frames of a message read and not yet returned
	pongs  []string       // payloads of the pongs read
}

func startWSServer(t testing.TB, mod func(*Options)) *Server {
	return startServer(t, EngineEpoll, func(o *Options) {
		o.WebAddr = "127.0.0.1:0"
		if mod != nil {
			mod(o)
		}
	})
}

func dialWS(t testing.TB, s *Server, header http.Header) (*wsClient, error) {
	t.Helper()
	d := ws.Dialer{Timeout: 5 * time.Second, Header: ws.HandshakeHeaderHTTP(header)}
	nc, br, _, err := d.Dial(context.Background(), "ws://"+s.WebAddr().String()+"/ws")
	if err != nil {
		return nil, err
	}
	if br != nil {
		t.Fatal("the server sent bytes before the client spoke")
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &wsClient{t: t, nc: nc}, nil
}

func mustDialWS(t testing.TB, s *Server) *wsClient {
	t.Helper()
	c, err := dialWS(t, s, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// send writes one masked frame of op with payload p.
func (c *wsClient) sendFrame(op ws.OpCode, fin bool, p []byte) {
	c.t.Helper()
	_ = c.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	f := ws.MaskFrame(ws.NewFrame(op, fin, append([]byte(nil), p...)))
	if err := ws.WriteFrame(c.nc, f); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// send writes frames as one binary message.
func (c *wsClient) send(frames ...[]byte) {
	c.t.Helper()
	c.sendFrame(ws.OpBinary, true, bytes.Join(frames, nil))
}

// next reads the next WebSocket frame, failing after 5s.
func (c *wsClient) next() (ws.Header, []byte, error) {
	_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	h, err := ws.ReadHeader(c.nc)
	if err != nil {
		return h, nil, err
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(c.nc, p); err != nil {
		return h, nil, err
	}
	if h.Masked {
		c.t.Fatal("a server frame is masked")
	}
	return h, p, nil
}

// read returns the next protocol frame.
func (c *wsClient) read() (schema.Header, []byte) {
	c.t.Helper()
	for len(c.queued) == 0 {
		h, p, err := c.next()
		if err != nil {
			c.t.Fatalf("read: %v", err)
		}
		switch h.OpCode {
		case ws.OpBinary:
			if !h.Fin {
				c.t.Fatal("the server fragments messages")
			}
			dec := schema.NewDecoder(bytes.NewReader(p), 1<<20)
			for {
				var f schema.Frame
				err := dec.ReadFrame(&f)
				if err == io.EOF {
					break
				}
				if err != nil {
					c.t.Fatalf("a message does not hold whole frames: %v", err)
				}
				f.Body = append([]byte(nil), f.Body...)
				c.queued = append(c.queued, f)
			}
		case ws.OpPong:
			c.pongs = append(c.pongs, string(p))
		case ws.OpClose:
			c.t.Fatalf("closed with %d %q", binary.BigEndian.Uint16(p), p[2:])
		default:
			c.t.Fatalf("unexpected opcode %d", h.OpCode)
		}
	}
	f := c.queued[0]
	c.queued = c.queued[1:]
	return f.Header, f.Body
}

func (c *wsClient) expect(seq uint32, st schema.Status) []byte {
	c.t.Helper()
	h, body := c.read()
	if h.Kind() != schema.KindResponse || h.Seq != seq || h.Status != st {
		c.t.Fatalf("got %s %s seq %d status %s, want response seq %d status %s", h.Kind(), h.Cmd, h.Seq, h.Status, seq, st)
	}
	return body
}

// expectClose reads until the server's close frame and checks its code,
// then that the socket ends.
func (c *wsClient) expectClose(code ws.StatusCode) {
	c.t.Helper()
	if len(c.queued) > 0 {
		c.t.Fatalf("frames left before the close: %v", c.queued[0].Header)
	}
	h, p, err := c.next()
	if err != nil {
		c.t.Fatalf("no close frame: %v", err)
	}
	if h.OpCode != ws.OpClose || len(p) < 2 {
		c.t.Fatalf("got opcode %d, want a close frame", h.OpCode)
	}
	if got := ws.StatusCode(binary.BigEndian.Uint16(p)); got != code {
		c.t.Fatalf("close code %d %q, want %d", got, p[2:], code)
	}
	if _, _, err := c.next(); err == nil {
		c.t.Fatal("the socket is still open after the close frame")
	}
}

func TestWSLoginKeepaliveLogout(t *testing.T) {
	s := startWSServer(t, nil)
	c := mustDialWS(t, s)
	// The login and a keepalive behind it in one message.
	c.send(loginFrame(7, 1), keepaliveFrame(2))
	var lr pb.LoginResponse
	if err := proto.Unmarshal(c.expect(1, schema.StatusOK), &lr); err != nil || lr.MaxBody != s.opts.MaxBody {
		t.Fatalf("login response %v (%v)", &lr, err)
	}
	c.expect(2, schema.StatusOK)
	// Several frames in one message, and one frame over two fragments.
	c.send(keepaliveFrame(3), keepaliveFrame(4))
	ka := keepaliveFrame(5)
	c.sendFrame(ws.OpBinary, false, ka[:10])
	c.sendFrame(ws.OpPing, true, []byte("hi"))
	c.sendFrame(ws.OpContinuation, true, ka[10:])
	for _, seq := range []uint32{3, 4, 5} {
		c.expect(seq, schema.StatusOK)
	}
	if len(c.pongs) != 1 || c.pongs[0] != "hi" {
		t.Fatalf("pongs %q, want one of \"hi\"", c.pongs)
	}
	c.send(logoutFrame(6))
	for {
		h, _ := c.read()
		if h.Seq == 6 {
			break
		}
	}
	c.expectClose(ws.StatusNormalClosure)
}

func TestWSBadInput(t *testing.T) {
	s := startWSServer(t, func(o *Options) { o.MaxBody = 1024 })
	big := encodeFrame(schema.Header{Cmd: schema.CmdKeepalive, Seq: 9}, &pb.KeepaliveRequest{})
	binary.BigEndian.PutUint32(big[36:], 4096) // a header announcing a body over the limit
	for _, tc := range []struct {
		name string
		send func(c *wsClient)
		st   schema.Status
		code ws.StatusCode
	}{
		{"text", func(c *wsClient) { c.sendFrame(ws.OpText, true, []byte("hello")) }, schema.StatusBadFrame, ws.StatusUnsupportedData},
		{"split frame", func(c *wsClient) {
			c.send(loginFrame(7, 1)[:50]) // the rest would come in the next message
		}, schema.StatusBadFrame, ws.StatusUnsupportedData},
		{"split header", func(c *wsClient) { c.send(loginFrame(7, 1)[:20]) }, schema.StatusBadFrame, ws.StatusUnsupportedData},
		{"message too big", func(c *wsClient) { c.send(make([]byte, 2000)) }, schema.StatusBodyTooLarge, ws.StatusMessageTooBig},
		{"body too big", func(c *wsClient) { c.send(big[:schema.HeaderLen]) }, schema.StatusBodyTooLarge, ws.StatusMessageTooBig},
		{"bad magic", func(c *wsClient) { c.send(make([]byte, 40)) }, schema.StatusBadFrame, ws.StatusUnsupportedData},
		{"not logged in", func(c *wsClient) { c.send(keepaliveFrame(1)) }, schema.StatusNotLoggedIn, ws.StatusPolicyViolation},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := mustDialWS(t, s)
			tc.send(c)
			h, _ := c.read()
			if h.Status != tc.st {
				t.Fatalf("status %s, want %s", h.Status, tc.st)
			}
			c.expectClose(tc.code)
		})
	}
	t.Run("unmasked", func(t *testing.T) {
		c := mustDialWS(t, s)
		if err := ws.WriteFrame(c.nc, ws.NewBinaryFrame(loginFrame(7, 1))); err != nil {
			t.Fatal(err)
		}
		c.expectClose(ws.StatusProtocolError)
	})
}

func TestWSOrigin(t *testing.T) {
	s := startWSServer(t, nil)
	if _, err := dialWS(t, s, http.Header{"Origin": {"https://evil.example"}}); err == nil {
		t.Fatal("a foreign origin was let in")
	} else if hs, ok := err.(ws.StatusError); !ok || int(hs) != http.StatusForbidden {
		t.Fatalf("got %v, want 403", err)
	}
	if _, err := dialWS(t, s, http.Header{"Origin": {"http://" + s.WebAddr().String()}}); err != nil {
		t.Fatalf("same-host origin refused: %v", err)
	}
	s2 := startWSServer(t, func(o *Options) { o.WebOrigins = []string{"https://chat.example"} })
	if _, err := dialWS(t, s2, http.Header{"Origin": {"https://chat.example"}}); err != nil {
		t.Fatalf("listed origin refused: %v", err)
	}
	if _, err := dialWS(t, s2, http.Header{"Origin": {"http://" + s2.WebAddr().String()}}); err == nil {
		t.Fatal("an unlisted origin was let in")
	}
	resp, err := http.Post("http://"+s2.WebAddr().String()+"/lp/open", "application/octet-stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("POST", "http://"+s2.WebAddr().String()+"/lp/open", nil)
	req.Header.Set("Origin", "https://evil.example")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("long-poll from a foreign origin: %d, want 403", resp.StatusCode)
	}
}

func TestWSLoginDeadline(t *testing.T) {
	s := startWSServer(t, func(o *Options) { o.LoginTimeout = 200 * time.Millisecond })
	c := mustDialWS(t, s)
	h, _ := c.read()
	if h.Status != schema.StatusLoginTimeout {
		t.Fatalf("status %s, want login timeout", h.Status)
	}
	c.expectClose(ws.StatusNormalClosure)
}

func TestWSDrain(t *testing.T) {
	s := startWSServer(t, nil)
	c := mustDialWS(t, s)
	c.send(loginFrame(7, 1))
	c.expect(1, schema.StatusOK)
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	h, _ := c.read()
	if h.Cmd != schema.CmdGoAway || h.Kind() != schema.KindNotify {
		t.Fatalf("got %s %s, want a goaway notify", h.Kind(), h.Cmd)
	}
	// A login during the drain is refused (on a connection accepted before).
	_ = c.nc.Close()
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if _, err := dialWS(t, s, nil); err == nil {
		t.Fatal("a drained gateway upgraded a WebSocket")
	}
}
