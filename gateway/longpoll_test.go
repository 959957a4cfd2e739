package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// startWebServer runs a gateway (goroutine engine: the long-poll sessions
// do not use the engine) with a web listener on a loopback port.
func startWebServer(t testing.TB, mod func(*Options)) *Server {
	t.Helper()
	return startServer(t, EngineGoroutine, func(o *Options) {
		o.WebAddr = "127.0.0.1:0"
		if mod != nil {
			mod(o)
		}
	})
}

// lpClient speaks the long-poll transport by hand.
type lpClient struct {
	t    testing.TB
	base string
	hc   *http.Client
	sess string
	rest []byte // frames of a poll not yet read
}

func newLPClient(t testing.TB, s *Server) *lpClient {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(hc.CloseIdleConnections)
	return &lpClient{t: t, base: "http://" + s.WebAddr().String(), hc: hc}
}

// post sends a request and returns the status and body.
func (c *lpClient) post(path string, body []byte, hdr map[string]string) (int, []byte) {
	c.t.Helper()
	req, err := http.NewRequest(http.MethodPost, c.base+path, bytes.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		c.t.Fatalf("POST %s: reading the body: %v", path, err)
	}
	return res.StatusCode, b
}

// open opens a session and checks the answer's shape.
func (c *lpClient) open() lpOpened {
	c.t.Helper()
	code, body := c.post("/lp/open", nil, nil)
	if code != http.StatusOK {
		c.t.Fatalf("open: %d %s", code, body)
	}
	var o lpOpened
	if err := json.Unmarshal(body, &o); err != nil {
		c.t.Fatalf("open: %v in %s", err, body)
	}
	if len(o.Session) != 32 || o.PollMS <= 0 {
		c.t.Fatalf("open answered %+v", o)
	}
	c.sess = o.Session
	return o
}

func (c *lpClient) send(frames ...[]byte) int {
	c.t.Helper()
	code, _ := c.post("/lp/send?s="+c.sess, bytes.Join(frames, nil), nil)
	return code
}

func (c *lpClient) mustSend(frames ...[]byte) {
	c.t.Helper()
	if code := c.send(frames...); code != http.StatusNoContent {
		c.t.Fatalf("send: %d, want 204", code)
	}
}

// poll issues one poll and returns its status and body.
func (c *lpClient) poll() (int, []byte) {
	c.t.Helper()
	return c.post("/lp/poll?s="+c.sess, nil, nil)
}

// read returns the next frame, polling as needed, failing after 5s.
func (c *lpClient) read() (schema.Header, []byte) {
	c.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(c.rest) == 0 {
		if time.Now().After(deadline) {
			c.t.Fatal("no frame within 5s")
		}
		code, body := c.poll()
		if code != http.StatusOK {
			c.t.Fatalf("poll: %d %s", code, body)
		}
		c.rest = body
	}
	return c.next()
}

// next takes a frame from what the last poll returned.
func (c *lpClient) next() (schema.Header, []byte) {
	c.t.Helper()
	h, err := schema.ParseHeader(c.rest, 1<<20)
	if err != nil {
		c.t.Fatalf("poll body: %v", err)
	}
	end := schema.HeaderLen + int(h.BodyLen)
	if len(c.rest) < end {
		c.t.Fatalf("poll body ends inside a frame: %d of %d bytes", len(c.rest), end)
	}
	body := c.rest[schema.HeaderLen:end]
	c.rest = c.rest[end:]
	return h, body
}

func (c *lpClient) expect(seq uint32, st schema.Status) []byte {
	c.t.Helper()
	h, body := c.read()
	if h.Kind() != schema.KindResponse || h.Seq != seq || h.Status != st {
		c.t.Fatalf("got %s %s seq %d status %s, want response seq %d status %s", h.Kind(), h.Cmd, h.Seq, h.Status, seq, st)
	}
	return body
}

func (c *lpClient) login(uid uint64) {
	c.t.Helper()
	c.mustSend(loginFrame(uid, 1))
	c.expect(1, schema.StatusOK)
}

// expectGone checks the session answers 404 within d.
func (c *lpClient) expectGone(d time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for {
		code, body := c.poll()
		if code == http.StatusNotFound {
			return
		}
		if code != http.StatusOK {
			c.t.Fatalf("poll: %d %s, want 404", code, body)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("session still open after %s", d)
		}
	}
}

func TestLongPollLoginKeepaliveLogout(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	c.open()
	if s.Conns() != 1 {
		t.Fatalf("conns %d, want 1 (a session is a connection)", s.Conns())
	}
	var lr pb.LoginResponse
	c.mustSend(loginFrame(7, 1))
	if err := proto.Unmarshal(c.expect(1, schema.StatusOK), &lr); err != nil || lr.IdleTimeoutMs == 0 {
		t.Fatalf("login response %v (%v)", &lr, err)
	}
	// Two frames in one send, answered in order through one or more polls.
	c.mustSend(keepaliveFrame(2), keepaliveFrame(3))
	c.expect(2, schema.StatusOK)
	c.expect(3, schema.StatusOK)
	c.mustSend(logoutFrame(4))
	c.expect(4, schema.StatusOK)
	c.expectGone(2 * time.Second)
	if code := c.send(keepaliveFrame(5)); code != http.StatusNotFound {
		t.Fatalf("send after logout: %d, want 404", code)
	}
	eventually(t, 2*time.Second, "no connections", func() bool { return s.Conns() == 0 })
}

func TestLongPollNotLoggedIn(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	c.open()
	c.mustSend(keepaliveFrame(9))
	c.expect(9, schema.StatusNotLoggedIn)
	c.expectGone(2 * time.Second)
}

func TestLongPollUnknownSession(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	for _, path := range []string{
		"/lp/poll", "/lp/poll?s=", "/lp/poll?s=nothex", "/lp/poll?s=" + strings.Repeat("0", 32),
		"/lp/send?s=" + strings.Repeat("ab", 16), "/lp/close?s=" + strings.Repeat("ab", 16), "/lp/nothing",
	} {
		if code, body := c.post(path, nil, nil); code != http.StatusNotFound {
			t.Errorf("%s: %d %s, want 404", path, code, body)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, c.base+"/lp/open", nil)
	res, err := c.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET /lp/open: %d, want 405", res.StatusCode)
	}
	// A closed session is unknown.
	c.open()
	if code, _ := c.post("/lp/close?s="+c.sess, nil, nil); code != http.StatusNoContent {
		t.Fatalf("close: %d, want 204", code)
	}
	if code, _ := c.poll(); code != http.StatusNotFound {
		t.Fatalf("poll of a closed session: %d, want 404", code)
	}
	if s.Conns() != 0 {
		t.Fatalf("conns %d after close, want 0", s.Conns())
	}
}

func TestLongPollSecondPollConflict(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.PollTimeout = 5 * time.Second })
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	type result struct {
		code int
		body []byte
	}
	first := make(chan result, 1)
	go func() {
		code, body := c.post("/lp/poll?s="+c.sess, nil, nil)
		first <- result{code, body}
	}()
	lc := s.conn(onlyConn(t, s))
	eventually(t, 2*time.Second, "the first poll pending", func() bool {
		lc.mu.Lock()
		defer lc.mu.Unlock()
		return lc.io.(*lpConn).poll != nil
	})
	if code, body := c.poll(); code != http.StatusConflict {
		t.Fatalf("second poll: %d %s, want 409", code, body)
	}
	// The first poll still waits and takes the next frame.
	c.mustSend(keepaliveFrame(2))
	r := <-first
	if r.code != http.StatusOK {
		t.Fatalf("first poll: %d %s", r.code, r.body)
	}
	c.rest = r.body
	if h, _ := c.next(); h.Seq != 2 || h.Cmd != schema.CmdKeepalive {
		t.Fatalf("first poll got %s seq %d, want the keepalive response", h.Cmd, h.Seq)
	}
}

func TestLongPollTimesOutEmpty(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.PollTimeout = 150 * time.Millisecond })
	c := newLPClient(t, s)
	if o := c.open(); o.PollMS != 150 {
		t.Fatalf("poll_ms %d, want 150", o.PollMS)
	}
	c.login(1)
	start := time.Now()
	code, body := c.poll()
	if code != http.StatusOK || len(body) != 0 {
		t.Fatalf("poll: %d with %d bytes, want 200 empty", code, len(body))
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("empty poll answered after %s, want about 150ms", d)
	}
}

// Frames queued while no poll is pending wait, in order, for the next one.
func TestLongPollHeldInOrder(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	id := onlyConn(t, s)
	for i := range 5 {
		c.mustSend(keepaliveFrame(uint32(10 + i)))
		queued := []bool{false}
		if err := s.Push(context.Background(), []uint64{id}, schema.CmdS2C, uint32(i), 0, []byte{byte(i)}, queued); err != nil || !queued[0] {
			t.Fatalf("push %d: queued %v, %v", i, queued, err)
		}
	}
	code, body := c.poll()
	if code != http.StatusOK {
		t.Fatalf("poll: %d", code)
	}
	c.rest = body
	for i := range 5 {
		if h, _ := c.next(); h.Kind() != schema.KindResponse || h.Seq != uint32(10+i) {
			t.Fatalf("frame %d: %s seq %d, want the response of seq %d", 2*i, h.Kind(), h.Seq, 10+i)
		}
		if h, b := c.next(); h.Kind() != schema.KindNotify || h.MsgType != uint32(i) || !bytes.Equal(b, []byte{byte(i)}) {
			t.Fatalf("frame %d: %s msgtype %d, want notify %d", 2*i+1, h.Kind(), h.MsgType, i)
		}
	}
	if len(c.rest) != 0 {
		t.Fatalf("%d bytes after the frames", len(c.rest))
	}
}

// A send whose body does not end on a frame boundary queues nothing.
func TestLongPollPartialFrame(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.PollTimeout = 100 * time.Millisecond })
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	ka := keepaliveFrame(2)
	for _, body := range [][]byte{ka[:10], ka[:len(ka)-1], append(append([]byte(nil), ka...), ka[:schema.HeaderLen+1]...), {}} {
		if code := c.send(body); code != http.StatusBadRequest {
			t.Fatalf("send of %d bytes: %d, want 400", len(body), code)
		}
	}
	if code, body := c.poll(); code != http.StatusOK || len(body) != 0 {
		t.Fatalf("poll after refused sends: %d with %d bytes, want nothing queued", code, len(body))
	}
	c.mustSend(keepaliveFrame(3))
	c.expect(3, schema.StatusOK)
}

// A bad header is answered as on a socket: an error frame, then the close.
func TestLongPollBadFrame(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	bad := keepaliveFrame(2)
	bad[0] = 'Z'
	c.mustSend(keepaliveFrame(1), bad, []byte("whatever follows"))
	c.expect(1, schema.StatusOK)
	c.expect(2, schema.StatusBadFrame)
	c.expectGone(2 * time.Second)
}

func TestLongPollLoginTimeout(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.LoginTimeout = 100 * time.Millisecond })
	c := newLPClient(t, s)
	c.open()
	h, _ := c.read()
	if h.Status != schema.StatusLoginTimeout {
		t.Fatalf("got %s status %s, want login timeout", h.Cmd, h.Status)
	}
	c.expectGone(2 * time.Second)
}

// A session nobody polls is closed after the idle timeout and its session
// unregistered, like a silent connection.
func TestLongPollIdleClosed(t *testing.T) {
	s := startWebServer(t, func(o *Options) {
		o.IdleTimeout = 300 * time.Millisecond
		o.KeepaliveInterval = 100 * time.Millisecond
	})
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	// Keepalives alone do not keep a session that is never polled.
	stop := time.Now().Add(time.Second)
	for s.Conns() > 0 && time.Now().Before(stop) {
		if code := c.send(keepaliveFrame(2)); code != http.StatusNoContent && code != http.StatusNotFound {
			t.Fatalf("send: %d", code)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s.Conns() != 0 {
		t.Fatal("a session without polls was not closed after the idle timeout")
	}
	if code, _ := c.poll(); code != http.StatusNotFound {
		t.Fatalf("poll of an idle-closed session: %d, want 404", code)
	}
}

// A session that polls but sends nothing is closed too, as on a socket.
func TestLongPollIdleNoFrames(t *testing.T) {
	s := startWebServer(t, func(o *Options) {
		o.IdleTimeout = 300 * time.Millisecond
		o.KeepaliveInterval = 100 * time.Millisecond
		o.PollTimeout = 50 * time.Millisecond
	})
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	c.expectGone(2 * time.Second)
}

func TestLongPollKickout(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	id := onlyConn(t, s)
	// Kicked with no poll pending: the kickout waits for the next poll.
	if err := s.Kick(context.Background(), id, &pb.Kickout{Reason: pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE}, 0); err != nil {
		t.Fatal(err)
	}
	h, body := c.read()
	var k pb.Kickout
	if h.Cmd != schema.CmdKickout || proto.Unmarshal(body, &k) != nil || k.Reason != pb.KickReason_KICK_REASON_LOGIN_ELSEWHERE {
		t.Fatalf("got %s %v, want the kickout", h.Cmd, &k)
	}
	c.expectGone(time.Second)
}

// A kickout reaches a pending poll at once.
func TestLongPollKickoutPending(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.PollTimeout = 5 * time.Second })
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	id := onlyConn(t, s)
	go func() {
		lc := s.conn(id)
		for lc != nil {
			lc.mu.Lock()
			pending := lc.io.(*lpConn).poll != nil
			lc.mu.Unlock()
			if pending {
				_ = s.Kick(context.Background(), id, &pb.Kickout{Reason: pb.KickReason_KICK_REASON_ADMIN}, 0)
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	start := time.Now()
	h, _ := c.read()
	if h.Cmd != schema.CmdKickout || time.Since(start) > 3*time.Second {
		t.Fatalf("got %s after %s, want the kickout at once", h.Cmd, time.Since(start))
	}
	c.expectGone(time.Second)
}

func TestLongPollSlowConsumer(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.MaxQueueBytes = 4096 })
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	id := onlyConn(t, s)
	body := make([]byte, 1000)
	queued := []bool{false}
	n := 0
	for ; n < 10; n++ {
		_ = s.Push(context.Background(), []uint64{id}, schema.CmdS2C, 0, 0, body, queued)
		if !queued[0] {
			break
		}
	}
	if n == 10 {
		t.Fatal("10 KB held for a session that never polls, over a 4 KB queue")
	}
	if code, _ := c.poll(); code != http.StatusNotFound {
		t.Fatalf("poll after the slow-consumer close: %d, want 404", code)
	}
}

func TestLongPollMaxConns(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.MaxConns = 1 })
	c := newLPClient(t, s)
	c.open()
	code, body := c.post("/lp/open", nil, nil)
	var r lpRefused
	if code != http.StatusServiceUnavailable || json.Unmarshal(body, &r) != nil || r.Code != uint16(schema.StatusTooManyConns) {
		t.Fatalf("open over max conns: %d %s, want 503 with code 3002", code, body)
	}
}

// Shutdown hands GoAway to a pending poll and then ends the session, which
// no poll can reach once the web listener has stopped.
func TestLongPollShutdownGoAway(t *testing.T) {
	s := startWebServer(t, func(o *Options) { o.PollTimeout = 5 * time.Second })
	c := newLPClient(t, s)
	c.open()
	c.login(1)
	idle := newLPClient(t, s)
	idle.open() // a second session with no poll pending
	var h schema.Header
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		code, body := c.poll()
		if code == http.StatusOK && len(body) >= schema.HeaderLen {
			h, _ = schema.ParseHeader(body, 1<<20)
		}
	}()
	lc := s.conn(onlyLoggedIn(t, s))
	eventually(t, 2*time.Second, "the poll pending", func() bool {
		lc.mu.Lock()
		defer lc.mu.Unlock()
		return lc.io.(*lpConn).poll != nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	wg.Wait()
	if h.Cmd != schema.CmdGoAway {
		t.Fatalf("pending poll got %s, want goaway", h.Cmd)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("shutdown waited %s for long-poll sessions no poll can reach", d)
	}
}

// onlyLoggedIn returns the id of the one logged-in connection s holds.
func onlyLoggedIn(t testing.TB, s *Server) uint64 {
	t.Helper()
	var ids []uint64
	s.each(func(c *conn) {
		if c.state.Load() == stateLoggedIn {
			ids = append(ids, c.id)
		}
	})
	if len(ids) != 1 {
		t.Fatalf("%d logged-in connections, want 1", len(ids))
	}
	return ids[0]
}

func TestLongPollOrigin(t *testing.T) {
	s := startWebServer(t, nil)
	c := newLPClient(t, s)
	if code, _ := c.post("/lp/open", nil, map[string]string{"Origin": "https://evil.example"}); code != http.StatusForbidden {
		t.Fatalf("open from another origin: %d, want 403", code)
	}
	c.open()
	if code, _ := c.post("/lp/poll?s="+c.sess, nil, map[string]string{"Origin": "https://evil.example"}); code != http.StatusForbidden {
		t.Fatalf("poll from another origin: %d, want 403", code)
	}
	if code, _ := c.post("/lp/close?s="+c.sess, nil, map[string]string{"Origin": c.base}); code != http.StatusNoContent {
		t.Fatalf("close from the gateway's own origin: %d, want 204", code)
	}
}

// A page of another allowed origin gets CORS answers, preflight included.
func TestLongPollCORS(t *testing.T) {
	const page = "https://chat.example.com"
	s := startWebServer(t, func(o *Options) { o.WebOrigins = []string{page} })
	c := newLPClient(t, s)
	req, _ := http.NewRequest(http.MethodOptions, c.base+"/lp/send?s=x", nil)
	req.Header.Set("Origin", page)
	req.Header.Set("Access-Control-Request-Method", "POST")
	res, err := c.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNoContent || res.Header.Get("Access-Control-Allow-Origin") != page ||
		!strings.Contains(res.Header.Get("Access-Control-Allow-Methods"), "POST") {
		t.Fatalf("preflight: %d %v", res.StatusCode, res.Header)
	}
	hreq, _ := http.NewRequest(http.MethodPost, c.base+"/lp/open", nil)
	hreq.Header.Set("Origin", page)
	res, err = c.hc.Do(hreq)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK || res.Header.Get("Access-Control-Allow-Origin") != page {
		t.Fatalf("open from %s: %d %v", page, res.StatusCode, res.Header)
	}
}
