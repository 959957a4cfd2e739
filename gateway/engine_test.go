package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
)

// Every test here runs on each engine: they share the protocol code, so
// they must behave the same on the wire.

func counter(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

// TestFramesOneByteAtATime: frames that arrive one byte per segment (a
// header split 40 ways, a body split byte by byte) are served like whole
// ones.
func TestFramesOneByteAtATime(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		trickle := func(b []byte) {
			for i := range b {
				c.write(b[i : i+1])
				time.Sleep(200 * time.Microsecond)
			}
		}
		trickle(loginFrame(7, 1))
		c.expect(1, schema.StatusOK)
		trickle(keepaliveFrame(2))
		c.expect(2, schema.StatusOK)
		trickle(logoutFrame(3))
		c.expect(3, schema.StatusOK)
		c.expectClosed(2 * time.Second)
	})
}

// TestRandomSplits: a stream of frames of many sizes, cut at random points
// and sent piece by piece, is answered frame by frame.
func TestRandomSplits(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		rng := rand.New(rand.NewPCG(3, 4))
		stream := loginFrame(7, 1)
		want := []schema.Status{schema.StatusOK}
		for seq := uint32(2); seq < 60; seq++ {
			if seq%3 == 0 {
				stream = append(stream, keepaliveFrame(seq)...)
				want = append(want, schema.StatusOK)
				continue
			}
			body := make([]byte, rng.IntN(600))
			stream = schema.AppendFrame(stream, &schema.Header{Cmd: 0x7777, Seq: seq}, body)
			want = append(want, schema.StatusUnknownCmd)
		}
		go func() {
			for len(stream) > 0 {
				n := min(1+rng.IntN(120), len(stream))
				_, _ = c.nc.Write(stream[:n])
				stream = stream[n:]
				time.Sleep(300 * time.Microsecond)
			}
		}()
		for i, st := range want {
			c.expect(uint32(i+1), st)
		}
	})
}

// TestBodySplitAcrossReads: a body far larger than one segment, sent in
// uneven pieces with pauses, is reassembled before it is served.
func TestBodySplitAcrossReads(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		c.login(7)
		body := bytes.Repeat([]byte{0xAB}, 40<<10)
		frame := schema.AppendFrame(nil, &schema.Header{Cmd: 0x7777, Seq: 2}, body)
		for _, cut := range [][2]int{{0, 3}, {3, 41}, {41, 9000}, {9000, len(frame) - 1}, {len(frame) - 1, len(frame)}} {
			c.write(frame[cut[0]:cut[1]])
			time.Sleep(20 * time.Millisecond)
		}
		c.expect(2, schema.StatusUnknownCmd)
		c.write(keepaliveFrame(3)) // the stream is still in step
		c.expect(3, schema.StatusOK)
	})
}

// TestPipelinedFrames: a client that sends login, requests and logout in
// one write gets every answer in order (the epoll engine serves login on a
// goroutine and must keep the bytes read behind it) and then the close.
func TestPipelinedFrames(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		c.write(bytes.Join([][]byte{loginFrame(7, 1), keepaliveFrame(2), keepaliveFrame(3), logoutFrame(4), keepaliveFrame(5)}, nil))
		for seq := uint32(1); seq <= 4; seq++ {
			c.expect(seq, schema.StatusOK)
		}
		c.expectClosed(2 * time.Second) // nothing after the logout is served
		eventually(t, 2*time.Second, "connection released", func() bool { return s.Conns() == 0 })
	})
}

// TestFinalResponseBeforeClose: a refused login and a frame before login
// are answered before the connection closes.
func TestFinalResponseBeforeClose(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		c.write(encodeFrame(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 7, Seq: 9}, &pb.LoginRequest{Token: "nope"}))
		c.expect(9, schema.StatusTokenMalformed)
		c.expectClosed(2 * time.Second)

		c = dialClient(t, s)
		c.write(keepaliveFrame(4))
		c.expect(4, schema.StatusNotLoggedIn)
		c.expectClosed(2 * time.Second)

		for _, trickle := range []bool{false, true} {
			c = dialClient(t, s)
			junk := []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789abcdef")
			if trickle { // the bad header comes byte by byte
				for i := range schema.HeaderLen {
					c.write(junk[i : i+1])
					time.Sleep(100 * time.Microsecond)
				}
			} else {
				c.write(junk)
			}
			h, _ := c.read()
			if h.Status != schema.StatusBadFrame {
				t.Fatalf("status %s, want bad frame", h.Status)
			}
			c.expectClosed(2 * time.Second)
		}
		eventually(t, 2*time.Second, "connections released", func() bool { return s.Conns() == 0 })
	})
}

// TestKickout: a second login of the same terminal kicks the first
// connection, which gets the Kickout notify and then the close.
func TestKickout(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		a := dialClient(t, s)
		a.login(7)
		b := dialClient(t, s)
		b.login(7)
		h, body := a.read()
		var k pb.Kickout
		if h.Kind() != schema.KindNotify || h.Cmd != schema.CmdKickout || proto.Unmarshal(body, &k) != nil {
			t.Fatalf("got %s %s, want the kickout notify", h.Kind(), h.Cmd)
		}
		a.expectClosed(2 * time.Second)
		b.write(keepaliveFrame(2))
		b.expect(2, schema.StatusOK)
		if got := counter(s.m.kicked); got != 1 {
			t.Fatalf("kicked %v, want 1", got)
		}
	})
}

// TestTimeouts: no login within the login timeout gets an error and the
// close; a logged-in connection silent past the idle timeout is closed;
// keepalives keep one open. The timeouts are far below the wheel's
// default one-second tick.
func TestTimeouts(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) {
			o.LoginTimeout = 200 * time.Millisecond
			o.IdleTimeout = 300 * time.Millisecond
		})
		start := time.Now()
		c := dialClient(t, s)
		c.expect(0, schema.StatusLoginTimeout)
		c.expectClosed(time.Second)
		if d := time.Since(start); d < 200*time.Millisecond || d > time.Second {
			t.Fatalf("login timeout took %s", d)
		}

		idle := dialClient(t, s)
		idle.login(8)
		busy := dialClient(t, s)
		busy.login(9)
		for i := range 8 { // 800ms of keepalives every 100ms
			time.Sleep(100 * time.Millisecond)
			busy.write(keepaliveFrame(uint32(10 + i)))
			busy.expect(uint32(10+i), schema.StatusOK)
		}
		idle.expectClosed(time.Millisecond) // long closed by now
		if got := counter(s.m.closed.WithLabelValues("idle_timeout")); got != 1 {
			t.Fatalf("idle timeouts %v, want 1", got)
		}
		if got := counter(s.m.closed.WithLabelValues("login_timeout")); got != 1 {
			t.Fatalf("login timeouts %v, want 1", got)
		}
		if s.Conns() != 1 {
			t.Fatalf("%d connections held, want only the busy one", s.Conns())
		}
	})
}

// dialSmallBuffer dials with a small receive buffer, so that a client that
// stops reading fills the server's socket quickly.
func dialSmallBuffer(t *testing.T, s *Server) *client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
	}}
	nc, err := d.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &client{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
}

// push queues frame i of size bytes on connection id; ErrUnknownConn means
// the connection did not take it.
func push(t *testing.T, s *Server, id uint64, i int, size int) error {
	body := make([]byte, size)
	binary.BigEndian.PutUint32(body, uint32(i))
	var queued [1]bool
	if err := s.Push(context.Background(), []uint64{id}, schema.CmdS2C, uint32(i), uint64(i)+1, body, queued[:]); err != nil {
		t.Fatal(err)
	}
	if !queued[0] {
		return ErrUnknownConn
	}
	return nil
}

// TestStalledWriteResumes: a client that stops reading fills its socket
// (the epoll engine's writev meets EAGAIN and waits for EPOLLOUT); when it
// reads again every queued frame arrives whole and in order.
func TestStalledWriteResumes(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) { o.MaxQueueBytes = 8 << 20 })
		c := dialSmallBuffer(t, s)
		c.login(7)
		id := onlyConn(t, s)
		const n, size = 300, 16 << 10 // 4.8 MB: far more than the socket buffers hold
		for i := range n {
			if err := push(t, s, id, i, size); err != nil {
				t.Fatal(err)
			}
		}
		if engine == EngineEpoll {
			eventually(t, 2*time.Second, "the socket to fill", func() bool { return writeStalled(s, id) })
		}
		time.Sleep(100 * time.Millisecond)
		for i := range n {
			h, body := c.read()
			if h.Cmd != schema.CmdS2C || h.MsgType != uint32(i) || len(body) != size || binary.BigEndian.Uint32(body) != uint32(i) {
				t.Fatalf("frame %d: got %s msgtype %d, %d bytes", i, h.Cmd, h.MsgType, len(body))
			}
		}
		c.write(keepaliveFrame(2))
		c.expect(2, schema.StatusOK)
		if writeStalled(s, id) {
			t.Fatal("still waiting for the socket after the queue drained")
		}
	})
}

// TestSlowConsumer: a client that stops reading while frames keep coming is
// closed once its queue passes MaxQueueBytes.
func TestSlowConsumer(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) { o.MaxQueueBytes = 1 << 20 })
		c := dialSmallBuffer(t, s)
		c.login(7)
		id := onlyConn(t, s)
		for i := 0; ; i++ {
			if i > 10000 {
				t.Fatal("never closed as a slow consumer")
			}
			if err := push(t, s, id, i, 16<<10); err != nil {
				break // ErrUnknownConn: closed
			}
		}
		if got := counter(s.m.closed.WithLabelValues("slow_consumer")); got != 1 {
			t.Fatalf("slow consumers %v, want 1", got)
		}
		eventually(t, 2*time.Second, "connection released", func() bool { return s.Conns() == 0 })
		c.expectClosed(5 * time.Second)
	})
}

// TestWriteTimeout: a client that stops reading for longer than the write
// timeout is closed even though its queue stays under the limit.
func TestWriteTimeout(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) { o.WriteTimeout = 300 * time.Millisecond })
		c := dialSmallBuffer(t, s)
		c.login(7)
		id := onlyConn(t, s)
		start := time.Now()
		for i := range 200 { // 3.2 MB: fills the sockets, under the 4 MiB queue limit
			if err := push(t, s, id, i, 16<<10); err != nil {
				t.Fatalf("push %d: %v", i, err)
			}
		}
		eventually(t, 3*time.Second, "the stalled connection closed", func() bool { return s.Conns() == 0 })
		if d := time.Since(start); d < 300*time.Millisecond {
			t.Fatalf("closed after %s, before the write timeout", d)
		}
	})
}

// TestMaxConns: a connection over the limit gets StatusTooManyConns and the
// close; when one leaves, there is room again.
func TestMaxConns(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) { o.MaxConns = 2 })
		a := dialClient(t, s)
		a.login(1)
		b := dialClient(t, s)
		b.login(2)
		c := dialClient(t, s)
		c.expect(0, schema.StatusTooManyConns)
		c.expectClosed(2 * time.Second)
		b.write(logoutFrame(2))
		b.expect(2, schema.StatusOK)
		eventually(t, 2*time.Second, "room freed", func() bool { return s.Conns() == 1 })
		d := dialClient(t, s)
		d.login(3)
		if got := counter(s.m.rejected.WithLabelValues(schema.StatusTooManyConns.String())); got != 1 {
			t.Fatalf("rejected %v, want 1", got)
		}
	})
}

// TestShutdown: Shutdown sends GoAway to every connection, waits for them
// to leave, closes the stragglers when its context ends, and is idempotent.
func TestShutdown(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		polite := dialClient(t, s)
		polite.login(1)
		stubborn := dialClient(t, s)
		stubborn.login(2)
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- s.Shutdown(ctx) }()
		for _, c := range []*client{polite, stubborn} {
			h, _ := c.read()
			if h.Cmd != schema.CmdGoAway {
				t.Fatalf("got %s, want goaway", h.Cmd)
			}
		}
		polite.write(logoutFrame(2))
		polite.expect(2, schema.StatusOK)
		polite.expectClosed(time.Second)
		if err := <-done; err == nil {
			t.Fatal("Shutdown returned nil though a connection outlived its context")
		}
		stubborn.expectClosed(time.Second)
		if s.Conns() != 0 {
			t.Fatalf("%d connections after Shutdown", s.Conns())
		}
		if err := s.Shutdown(context.Background()); err != nil {
			t.Fatalf("second Shutdown: %v", err)
		}
		if _, err := net.DialTimeout("tcp", s.Addr().String(), time.Second); err == nil {
			t.Fatal("still accepting after Shutdown")
		}
	})
}

// BenchmarkKeepalive measures request round trips through each engine:
// 64 clients, each with one keepalive in flight at a time.
func BenchmarkKeepalive(b *testing.B) {
	for _, engine := range testEngines {
		b.Run(engine, func(b *testing.B) {
			s := startServer(b, engine, nil)
			const clients = 64
			cs := make([]*client, clients)
			for i := range cs {
				cs[i] = dialClient(b, s)
				cs[i].login(uint64(i + 1))
			}
			frame := keepaliveFrame(2)
			b.ResetTimer()
			done := make(chan struct{}, clients)
			for i, c := range cs {
				n := b.N / clients
				if i < b.N%clients {
					n++
				}
				go func() {
					defer func() { done <- struct{}{} }()
					var f schema.Frame
					for range n {
						if _, err := c.nc.Write(frame); err != nil {
							return
						}
						if err := c.dec.ReadFrame(&f); err != nil {
							return
						}
						f.Release()
					}
				}()
			}
			for range clients {
				<-done
			}
		})
	}
}
