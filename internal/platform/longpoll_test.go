package platform

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// lpRaw is a long-poll client written against PROTOCOL.md with net/http
// only, as a browser's script would speak it.
type lpRaw struct {
	t    testing.TB
	base string
	hc   *http.Client
	sess string
	rest []byte // frames of the last poll not yet read
	seq  uint32
}

func dialLP(t testing.TB, p *Platform) *lpRaw {
	t.Helper()
	a := p.Gateway.WebAddr()
	if a == nil {
		t.Fatal("the gateway has no web listener")
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(hc.CloseIdleConnections)
	return &lpRaw{t: t, base: "http://" + a.String(), hc: hc}
}

func (c *lpRaw) post(path string, body []byte, origin string) (int, []byte) {
	c.t.Helper()
	req, err := http.NewRequest(http.MethodPost, c.base+path, bytes.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	if origin != "" {
		req.Header.Set("Origin", origin)
	}
	res, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		c.t.Fatalf("POST %s: %v", path, err)
	}
	return res.StatusCode, b
}

func (c *lpRaw) open() {
	c.t.Helper()
	code, body := c.post("/lp/open", nil, "")
	var o struct {
		Session string `json:"session"`
		PollMS  int64  `json:"poll_ms"`
	}
	if code != http.StatusOK || json.Unmarshal(body, &o) != nil || o.Session == "" || o.PollMS <= 0 {
		c.t.Fatalf("open: %d %s", code, body)
	}
	c.sess = o.Session
}

// request sends one request frame and returns its seq.
func (c *lpRaw) request(cmd schema.Cmd, h schema.Header, m proto.Message) uint32 {
	c.t.Helper()
	c.seq++
	h.Cmd, h.Seq = cmd, c.seq
	c.sendFrame(h, m)
	return c.seq
}

func (c *lpRaw) sendFrame(h schema.Header, m proto.Message) {
	c.t.Helper()
	body, err := proto.Marshal(m)
	if err != nil {
		c.t.Fatal(err)
	}
	if code, b := c.post("/lp/send?s="+c.sess, schema.AppendFrame(nil, &h, body), ""); code != http.StatusNoContent {
		c.t.Fatalf("send: %d %s", code, b)
	}
}

// read returns the next frame, polling as needed; it fails after 5s.
func (c *lpRaw) read() (schema.Header, []byte) {
	c.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(c.rest) == 0 {
		if time.Now().After(deadline) {
			c.t.Fatal("no frame within 5s")
		}
		code, body := c.post("/lp/poll?s="+c.sess, nil, "")
		if code != http.StatusOK {
			c.t.Fatalf("poll: %d %s", code, body)
		}
		c.rest = body
	}
	h, err := schema.ParseHeader(c.rest, 1<<20)
	if err != nil || len(c.rest) < schema.HeaderLen+int(h.BodyLen) {
		c.t.Fatalf("poll body: %v (%d bytes)", err, len(c.rest))
	}
	body := c.rest[schema.HeaderLen : schema.HeaderLen+int(h.BodyLen)]
	c.rest = c.rest[schema.HeaderLen+int(h.BodyLen):]
	return h, body
}

// readCmd reads frames until one of cmd (a notify or the response to seq
// when seq is not 0) arrives, unmarshals it into m and returns its header.
func (c *lpRaw) readCmd(cmd schema.Cmd, seq uint32, m proto.Message) schema.Header {
	c.t.Helper()
	for {
		h, body := c.read()
		if h.Cmd != cmd || (seq != 0 && h.Seq != seq) {
			continue
		}
		if h.Status != schema.StatusOK {
			c.t.Fatalf("%s seq %d: status %s", h.Cmd, h.Seq, h.Status)
		}
		if err := proto.Unmarshal(body, m); err != nil {
			c.t.Fatalf("%s body: %v", cmd, err)
		}
		return h
	}
}

func (c *lpRaw) login(appcode uint32, uid uint64) {
	c.t.Helper()
	seq := c.request(schema.CmdLogin, schema.Header{AppCode: appcode, UID: uid},
		&pb.LoginRequest{Token: token(appcode, uid), DeviceId: "browser"})
	var lr pb.LoginResponse
	c.readCmd(schema.CmdLogin, seq, &lr)
}

// gone checks the session answers 404 within d.
func (c *lpRaw) gone(d time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for {
		code, _ := c.post("/lp/poll?s="+c.sess, nil, "")
		if code == http.StatusNotFound {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("session still open after %s (poll %d)", d, code)
		}
	}
}

// TestLongPollC2C: a browser on long-poll and an SDK client on TCP chat
// both ways; each acks and the other gets a delivered receipt.
func TestLongPollC2C(t *testing.T) {
	p := start(t, nil)
	var bobGot received
	var bobRc receipts
	bob := chatter(t, p, 101, 2, &bobGot, &bobRc, nil)

	alice := dialLP(t, p)
	alice.open()
	alice.login(201, 1) // support-web, account 2
	to := &pb.User{Account: 1, Uid: 2}
	seq := alice.request(schema.CmdC2CSend, schema.Header{MsgType: 7},
		&pb.C2CSendRequest{To: to, ClientMsgId: "lp-1", Content: []byte("hello from the browser")})
	var sr pb.C2CSendResponse
	alice.readCmd(schema.CmdC2CSend, seq, &sr)
	if sr.Msgid == 0 {
		t.Fatalf("send response %v", &sr)
	}
	eventually(t, 5*time.Second, "bob's message", func() bool { return bobGot.len() == 1 })
	if got := bobGot.contents()[0]; got != "hello from the browser" {
		t.Fatalf("bob got %q", got)
	}
	// The SDK acks after OnC2C: the browser gets the receipt.
	var rc pb.C2CReceipt
	alice.readCmd(schema.CmdC2CReceipt, 0, &rc)
	if rc.Msgid != sr.Msgid || rc.ByAppcode != 101 {
		t.Fatalf("receipt %v, want msgid %d by appcode 101", &rc, sr.Msgid)
	}

	if _, err := bob.SendC2C(ctxb, &pb.User{Account: 2, Uid: 1}, 7, []byte("hello from tcp")); err != nil {
		t.Fatal(err)
	}
	var n pb.C2CNotify
	alice.readCmd(schema.CmdC2CNotify, 0, &n)
	if len(n.Messages) != 1 || string(n.Messages[0].Content) != "hello from tcp" {
		t.Fatalf("notify %v", &n)
	}
	ack := alice.request(schema.CmdC2CAck, schema.Header{}, &pb.C2CAckRequest{Msgids: []uint64{n.Messages[0].Msgid}})
	var ar pb.C2CAckResponse
	alice.readCmd(schema.CmdC2CAck, ack, &ar)
	eventually(t, 5*time.Second, "bob's receipt", func() bool { return bobRc.len() >= 1 })
}

// TestLongPollIdleLogout: a session nobody polls is closed after the idle
// timeout and its session leaves the router, as a silent TCP connection's.
func TestLongPollIdleLogout(t *testing.T) {
	p := start(t, func(c *config.Config) {
		c.Gateway.IdleTimeout = 400 * time.Millisecond
		c.Gateway.KeepaliveInterval = 100 * time.Millisecond
	})
	c := dialLP(t, p)
	c.open()
	c.login(101, 9)
	listed := func() int {
		ss, err := p.Router.Lookup(ctxb, router.User{Account: 1, UID: 9})
		if err != nil {
			t.Fatal(err)
		}
		return len(ss)
	}
	if listed() != 1 {
		t.Fatal("the router does not list the long-poll session after login")
	}
	eventually(t, 5*time.Second, "the idle session unregistered", func() bool { return listed() == 0 })
	c.gone(time.Second)
	if n := p.Gateway.Conns(); n != 0 {
		t.Fatalf("gateway holds %d connections, want 0", n)
	}
}

// TestLongPollKickout: a login of the same terminal over TCP kicks the
// long-poll session, which reads the kickout in a poll and is closed.
func TestLongPollKickout(t *testing.T) {
	p := start(t, nil)
	c := dialLP(t, p)
	c.open()
	c.login(101, 5)
	login(t, p, 101, 5, nil)
	var k pb.Kickout
	c.readCmd(schema.CmdKickout, 0, &k)
	if k.Reason != pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE {
		t.Fatalf("kickout reason %s", k.Reason)
	}
	c.gone(5 * time.Second)
}

// TestLongPollErrors: a poll of no session (404), two polls at once (409)
// and a poll that times out empty, on the platform's web listener.
func TestLongPollErrors(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Gateway.PollTimeout = 300 * time.Millisecond })
	c := dialLP(t, p)
	if code, _ := c.post("/lp/poll?s=0123456789abcdef0123456789abcdef", nil, ""); code != http.StatusNotFound {
		t.Fatalf("poll of no session: %d, want 404", code)
	}
	c.open()
	c.login(101, 3)
	first := make(chan int, 1)
	start := time.Now()
	go func() {
		code, body := c.post("/lp/poll?s="+c.sess, nil, "")
		if len(body) != 0 {
			code = -len(body)
		}
		first <- code
	}()
	// The second poll may reach the gateway first: then the first one is
	// the one refused. Either way exactly one of them answers 409.
	time.Sleep(50 * time.Millisecond)
	second, _ := c.post("/lp/poll?s="+c.sess, nil, "")
	f := <-first
	if !(second == http.StatusConflict && f == http.StatusOK) && !(f == http.StatusConflict && second == http.StatusOK) {
		t.Fatalf("two polls answered %d and %d, want one 409 and one empty 200", f, second)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("the pending poll answered after %s, want the 300ms poll timeout", d)
	}
}

// TestLongPollOrigin: the web listener's origin check applies to /lp/.
func TestLongPollOrigin(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Gateway.WebOrigins = []string{"https://chat.example.com"} })
	c := dialLP(t, p)
	if code, _ := c.post("/lp/open", nil, "https://evil.example.com"); code != http.StatusForbidden {
		t.Fatalf("open from another origin: %d, want 403", code)
	}
	if code, _ := c.post("/lp/open", nil, "https://chat.example.com"); code != http.StatusOK {
		t.Fatalf("open from an allowed origin: %d, want 200", code)
	}
}
