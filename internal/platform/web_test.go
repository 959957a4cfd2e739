package platform

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/imd-dev/imd/gateway"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// wsPeer is a browser-like client: frames over a WebSocket, by hand.
type wsPeer struct {
	t      *testing.T
	nc     net.Conn
	queued []schema.Frame
}

func dialWSPeer(t *testing.T, p *Platform) *wsPeer {
	t.Helper()
	nc, _, _, err := ws.Dialer{Timeout: 5 * time.Second}.Dial(context.Background(), "ws://"+p.Gateway.WebAddr().String()+"/ws")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &wsPeer{t: t, nc: nc}
}

func (c *wsPeer) send(h schema.Header, m proto.Message) {
	c.t.Helper()
	body, _ := proto.Marshal(m)
	f := ws.MaskFrame(ws.NewBinaryFrame(schema.AppendFrame(nil, &h, body)))
	if err := ws.WriteFrame(c.nc, f); err != nil {
		c.t.Fatal(err)
	}
}

// next returns the next protocol frame, unpacking binary messages.
func (c *wsPeer) next() schema.Frame {
	c.t.Helper()
	for len(c.queued) == 0 {
		_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		h, err := ws.ReadHeader(c.nc)
		if err != nil {
			c.t.Fatal(err)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.nc, p); err != nil {
			c.t.Fatal(err)
		}
		if h.OpCode != ws.OpBinary {
			c.t.Fatalf("opcode %d", h.OpCode)
		}
		for len(p) > 0 {
			fh, err := schema.ParseHeader(p, 1<<20)
			if err != nil {
				c.t.Fatal(err)
			}
			n := schema.HeaderLen + int(fh.BodyLen)
			c.queued = append(c.queued, schema.Frame{Header: fh, Body: p[schema.HeaderLen:n]})
			p = p[n:]
		}
	}
	f := c.queued[0]
	c.queued = c.queued[1:]
	return f
}

// TestWebSocketC2C has a browser-like WebSocket client and a Go SDK client
// over TCP chat both ways through one platform.
func TestWebSocketC2C(t *testing.T) {
	p := start(t, nil)
	if os.Getenv("IMD_GATEWAY_ENGINE") == gateway.EngineGoroutine {
		// WebSocket lives in the epoll engine (the default on Linux); the
		// goroutine engine refuses the upgrade plainly, as documented.
		resp, err := http.Get("http://" + p.Gateway.WebAddr().String() + "/ws")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotImplemented {
			t.Fatalf("GET /ws on the goroutine engine: HTTP %d, want 501", resp.StatusCode)
		}
		return
	}
	web := dialWSPeer(t, p)
	web.send(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 1, Seq: 1}, &pb.LoginRequest{Token: token(101, 1), DeviceId: "browser"})
	if f := web.next(); f.Cmd != schema.CmdLogin || f.Status != schema.StatusOK {
		t.Fatalf("login: %s status %s", f.Cmd, f.Status)
	}
	var bobGot received
	bob := chatter(t, p, 101, 2, &bobGot, nil, nil)

	if _, err := bob.SendC2C(ctxb, acct1(1), 0, []byte("hello browser")); err != nil {
		t.Fatal(err)
	}
	for {
		f := web.next()
		if f.Cmd != schema.CmdC2CNotify {
			continue
		}
		var n pb.C2CNotify
		if err := proto.Unmarshal(f.Body, &n); err != nil {
			t.Fatal(err)
		}
		if len(n.Messages) != 1 || string(n.Messages[0].Content) != "hello browser" || n.Messages[0].From.GetUid() != 2 {
			t.Fatalf("notify %v", &n)
		}
		break
	}

	web.send(schema.Header{Cmd: schema.CmdC2CSend, Seq: 2}, &pb.C2CSendRequest{To: acct1(2), Content: []byte("hello sdk"), ClientMsgId: "web-1"})
	for {
		f := web.next()
		if f.Kind() == schema.KindResponse && f.Seq == 2 {
			if f.Status != schema.StatusOK {
				t.Fatalf("send: status %s", f.Status)
			}
			break
		}
	}
	eventually(t, 5*time.Second, "the SDK client got the browser's message", func() bool { return bobGot.len() == 1 })
	if got := bobGot.contents(); got[0] != "hello sdk" {
		t.Fatalf("sdk got %q", got)
	}
}
